"""`--model proxy`: a Qwen3-VL-shaped stand-in for the real checkpoints, small enough for a CPU.

The embedded `tiny` model has a 500-token vocabulary, 8 px patches and head_dim 32, so code that
only breaks at real scale passes on it. This model keeps what a real Qwen3-VL-*-Instruct folder
has that the project's code touches, and shrinks only widths and depths:
  vocabulary      151,936 rows (the checkpoints' size), special tokens at their real ids:
                  <|endoftext|> 151643 (pad), <|im_start|> 151644, <|im_end|> 151645 (eos),
                  <|vision_start|> 151652, <|vision_end|> 151653, <|vision_pad|> 151654,
                  <|image_pad|> 151655, <|video_pad|> 151656, and <think> 151667 / </think> 151668
                  as *ordinary* tokens (decoding with skip_special_tokens keeps them); ids past
                  151668 exist in the model but not in the tokenizer, as in the real checkpoints
  tokenizer       Qwen's pipeline (NFC, its split regex, byte-level BPE), class Qwen2Tokenizer;
                  the BPE merges are trained here on the task's text (the real merges are 11 MB),
                  and ids below 151643 that no merge reaches are placeholders
  chat template   Qwen3-VL Instruct's, stored as the hub folders store it: only in
                  chat_template.json (model.load_processor must find it there)
  images          Qwen2-VL image processing as configured for Qwen3-VL: 16 px patches, 2x2
                  merge, mean/std 0.5, at least 65,536 pixels (256 x 256), dynamic resolution
  M-RoPE          head_dim 128, mrope_section [24, 20, 20], interleaved; DeepStack on
Not the same: 2 layers, text width 64, vision width 32, random weights (it writes noise).
The template reproduces the real one's output for system / user / assistant turns with string or
list content; tool calls and the add_vision_id option are left out.

Built deterministically and cached like the embedded models (model.resolve_model("proxy")).
tests/test_proxy.py checks the facts above; bench/gpu_smoke.py runs every stage on it.
Importing this module does no work.
"""
import hashlib
import json
import os
import shutil

import torch

VOCAB = 151936  # rows of the embedding and the LM head in every Qwen3-VL checkpoint
BASE = 151643  # ids below this belong to the BPE model; the added tokens follow
# (id, content, special) as the real tokenizer_config.json lists them
ADDED = [(151643, "<|endoftext|>", True), (151644, "<|im_start|>", True),
         (151645, "<|im_end|>", True), (151646, "<|object_ref_start|>", True),
         (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
         (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True),
         (151651, "<|quad_end|>", True), (151652, "<|vision_start|>", True),
         (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
         (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True),
         (151657, "<tool_call>", False), (151658, "</tool_call>", False),
         (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
         (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
         (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
         (151665, "<tool_response>", False), (151666, "</tool_response>", False),
         (151667, "<think>", False), (151668, "</think>", False)]
# Qwen2/3's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3-VL Instruct's template, restricted to what this project sends (no tools). The system
# message is written only when it comes first; a user turn's image / video items become the
# vision placeholders the processor expands; other roles' list content keeps its text items.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role in ['user', 'assistant'] or (message.role == 'system' and loop.first) -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if message.role == 'user' and (item.type == 'image' or 'image' in item"
    " or 'image_url' in item) -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif message.role == 'user' and (item.type == 'video' or 'video' in item) -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=128, intermediate_size=128, max_position_embeddings=8192,
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                 mrope_section=[24, 20, 20], mrope_interleaved=True))
VISION = dict(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
              deepstack_visual_indexes=[0, 1])
IMAGES = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
              image_std=[0.5, 0.5, 0.5], min_pixels=65536, max_pixels=16777216)
RECIPE_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt


def _tokenizer_json(corpus):
    """tokenizer.json text: Qwen's pipeline, BPE merges trained on corpus, the vocabulary padded
    with unreachable placeholders up to BASE so the added tokens land on their real ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    # placeholders: several characters long, so no byte and no merge ever produces one
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), BASE)})
    spec["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=s) for i, c, s in ADDED]
    return json.dumps(spec, ensure_ascii=False)


def _tokenizer_config():
    """tokenizer_config.json as the real folders have it, without a chat template (theirs is in
    chat_template.json)."""
    return {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
            "add_bos_token": False, "add_prefix_space": False, "errors": "replace",
            "clean_up_tokenization_spaces": False, "split_special_tokens": False,
            "model_max_length": 262144,
            "additional_special_tokens": [c for _, c, s in ADDED if s and c != "<|endoftext|>"],
            "added_tokens_decoder": {str(i): dict(content=c, special=s, single_word=False,
                                                  lstrip=False, rstrip=False, normalized=False)
                                     for i, c, s in ADDED}}


def build(cache_dir, seed=0):
    """Build (or reuse) the proxy folder under cache_dir -> its path. Every rank calls it at the
    same point (model.load_model); rank 0 writes while the others wait, as build_embedded."""
    from transformers import (Qwen2VLImageProcessorPil, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    import task
    from common import barrier, get_rank, publish_build
    from data import SYSTEM_PROMPT
    recipe = [TEXT, VISION, IMAGES, CHAT_TEMPLATE, seed, RECIPE_VERSION]
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"proxy-seed{seed}-{key}")
    if get_rank() != 0 or os.path.exists(os.path.join(path, "model.safetensors")):
        barrier()
        return path

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, pad_token_id=151643, bos_token_id=151643,
                         eos_token_id=151645, **TEXT),
        vision_config=dict(out_hidden_size=TEXT["hidden_size"], **VISION),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = 151645
    model.generation_config.pad_token_id = 151643
    corpus = task.corpus(seed=seed, n=300) + [SYSTEM_PROMPT] * 20

    def write(tmp):
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(_tokenizer_json(corpus))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(_tokenizer_config(), f, indent=1)
        with open(os.path.join(tmp, "chat_template.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE}, f)
        Qwen2VLImageProcessorPil(**IMAGES).save_pretrained(tmp)

    tmp = f"{path}.tmp{os.getpid()}"  # per process: parallel test runs may build at once
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    publish_build(tmp, path)
    barrier()
    return path
