"""Loading the policy (and, later, the discriminator's backbone): one place for every model a stage
can run on.

`--model` accepts
  tiny | small                 the embedded defaults: the real Qwen3VLForConditionalGeneration class
                               built from a small config with random weights, a BPE tokenizer trained
                               here on the synthetic task's text, and a processor built without hub
                               files. Built deterministically from a seed, cached under cache/.
  Qwen3-VL-2B | -4B | -8B      aliases of the official Qwen/Qwen3-VL-*-Instruct ids
  any hub id or local folder   e.g. one of our checkpoints (full weights or a LoRA adapter)

Options: full fine-tune, --lora (peft LoRA on the language model), --qlora (bitsandbytes nf4 base +
LoRA), --attn sdpa|eager|flash_attention_2, gradient checkpointing, bf16 where the device supports
it (else fp32). The vision tower and its projector (the "merger") are frozen unless asked otherwise.

Facts this file relies on (measured, see ../shared/MEASURED.md):
- torchvision from PyPI does not import beside torch 2.13, and without it the stock Qwen3VLProcessor
  cannot be built (it wants a video processor). We never use video, so `ImageProcessor` below is an
  image-only subclass, and every processor is loaded through `load_processor`.
- A random policy happily samples <|image_pad|>; re-scoring such a sequence fails with "Image
  features and image tokens do not match". `vision_token_ids` lists the ids generation must suppress.

Importing this module does no work.
"""
import hashlib
import importlib.util
import json
import os
import shutil

import torch

CACHE_DIR = os.environ.get("NANOPRISM_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache"))
BUILD_VERSION = 6  # bump when the embedded recipe changes, so stale caches are rebuilt

HUB_ALIASES = {
    "Qwen3-VL-2B": "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen3-VL-4B": "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen3-VL-8B": "Qwen/Qwen3-VL-8B-Instruct",
}

# The embedded presets. `tiny` is the shape that learned the counting task best in MEASURED.md
# (text 128 wide x 2 layers, vision 64 wide x 2 blocks, 8 px patches): 96 px images become 12x12
# patches, merged 2x2 into 36 image tokens. `small` (~5M parameters) is for the longer reproduction.
PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=384),
        vision=dict(hidden_size=64, depth=2, num_heads=4, intermediate_size=256, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=[0])),
    "small": dict(
        text=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=32, intermediate_size=768),
        vision=dict(hidden_size=128, depth=3, num_heads=4, intermediate_size=512, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=[1])),
}

# Qwen's special tokens, in Qwen's order, plus the three answer tags as single tokens (a tiny model
# learns the format much faster when `<caption>` is one token rather than five).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]

# A Qwen-style chat template. Message content is a string in which images already appear as
# <|vision_start|><|image_pad|><|vision_end|> (data.py puts them there), or a list of typed items.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# -----------------------------------------------------------------------------------------------
# Processor (image-only; see the module docstring)


def _image_only_processor_class():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class ImageProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without the video processor (which needs torchvision)."""

        # ProcessorMixin reads its sub-processors off this signature: with no `video_processor`
        # parameter here, none is required (or checked against torchvision's classes).
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    return ImageProcessor


def load_processor(path):
    """Tokenizer + image processor from a folder or hub id, joined in our image-only processor.

    Built from its parts so the same code loads the official Qwen folders and ours, with or without
    torchvision installed."""
    from transformers import AutoImageProcessor, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    # Padding side is not fixed here: data.py pads training batches right and prompts left, per call.
    return _image_only_processor_class()(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def vision_token_ids(tokenizer):
    """Ids that must never be sampled: a sampled <|image_pad|> breaks every later forward."""
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    vocab = tokenizer.get_vocab()
    return [vocab[n] for n in names if n in vocab]


# -----------------------------------------------------------------------------------------------
# The embedded models: tokenizer trained on the task's text, config from a preset, random weights.


def _train_tokenizer(corpus, vocab_size):
    """A byte-level BPE (Qwen's tokenizer is byte-level BPE too) trained on the task corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.add_tokens(TAG_TOKENS)  # ordinary (non-special) tokens: decoding keeps them
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_embedded(preset="tiny", seed=0, cache_dir=CACHE_DIR, image_size=96):
    """Build (or reuse from cache) the embedded model folder for `preset`; return its path.

    Deterministic: the corpus, the tokenizer and the weights all come from `seed`. The cache key
    hashes the recipe, so editing PRESETS or BUILD_VERSION rebuilds instead of reusing stale files."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    import task
    spec = PRESETS[preset]
    key = hashlib.sha256(json.dumps([spec, seed, image_size, BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{preset}-seed{seed}-{key}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path

    # The chat roles and the system prompt (which opens every prompt) are weighted up in the corpus
    # so BPE merges them into few tokens: prompts get ~100 tokens shorter, every step gets faster.
    from data import SYSTEM_PROMPT
    corpus = task.corpus(seed=seed) + ["system user assistant"] * 50 + [SYSTEM_PROMPT] * 200
    tokenizer = _train_tokenizer(corpus, vocab_size=512)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec["text"]["head_dim"]
    # M-RoPE splits each head's rotary frequencies between (time, height, width); the three parts
    # must add up to head_dim / 2. Qwen3-VL-4B uses [24, 20, 20] for head_dim 128: same proportions.
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope,
                                              mrope_interleaved=True),
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], **spec["text"]),
        vision_config=dict(out_hidden_size=spec["text"]["hidden_size"], spatial_merge_size=2,
                           temporal_patch_size=2, **spec["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    # The image processor must cut the same patches the vision tower expects: patch 8, merge 2, so
    # image sides must be multiples of 16 (ours are multiples of 32). Pixels bounds keep 96 px as is.
    patch = spec["vision"]["patch_size"]
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                               min_pixels=(2 * patch) ** 2, max_pixels=512 * 512,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a half-built folder is never picked up as the cache
    except OSError:
        # Under torchrun every rank builds on a cold cache; the first rename wins and the others'
        # identical builds (same seed, same recipe) are thrown away.
        if not os.path.exists(os.path.join(path, "config.json")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(name, seed=0):
    """Turn a --model value into a local folder or hub id (building the embedded model if asked)."""
    if name in PRESETS:
        return build_embedded(name, seed=seed)
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    return name


# -----------------------------------------------------------------------------------------------
# Loading a policy for training


def pick_dtype(device, dtype="auto"):
    """bf16 where the device supports it, else fp32 (CPU bf16 matmuls are slow and lossy here)."""
    if dtype != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_model(name, device, *, dtype="auto", attn="sdpa", lora=False, qlora=False, lora_r=16,
               lora_alpha=32, grad_ckpt=False, train_vision=False, seed=0, trust_remote_code=False):
    """Return (model, processor, path). `name` is anything `--model` accepts (module docstring).

    A folder holding adapter_config.json is one of our LoRA checkpoints: its base is loaded first,
    then the adapter on top, trainable (so --resume continues a LoRA run)."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars drown our own progress bar
    path = resolve_model(name, seed=seed)
    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise SystemExit(f"error: model folder {path} not found")
    adapter = os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))
    base_path = json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"] if adapter else path

    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise SystemExit("error: --attn flash_attention_2 needs the flash-attn package (CUDA only): pip install flash-attn")
    kwargs = dict(dtype=pick_dtype(device, dtype), attn_implementation=attn, trust_remote_code=trust_remote_code)
    if qlora:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SystemExit("error: --qlora needs the bitsandbytes package: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig
        # nf4 + double quantisation as in the QLoRA paper (arXiv 2305.14314). The vision tower stays
        # in full precision: it is frozen and small, and its patch embedding is a Conv3d that
        # bitsandbytes cannot quantise. The name must be the full module path `model.visual`.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"], llm_int8_skip_modules=["model.visual", "lm_head"])
        kwargs["device_map"] = {"": device}  # bitsandbytes quantises while loading, onto this device
    try:
        model = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs)
        # an adapter folder saved without its processor uses the base model's
        no_processor = adapter and not os.path.exists(os.path.join(path, "tokenizer_config.json"))
        processor = load_processor(base_path if no_processor else path)
    except OSError as e:
        raise SystemExit(f"error: cannot load model {name!r} from {base_path!r}: {str(e).splitlines()[0]}")
    if not qlora:
        model.to(device)

    if not train_vision:
        # The vision tower and the merger (projector) are frozen, as in the paper's SFT.
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if qlora:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, path, is_trainable=True)
    elif lora or qlora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model, processor, path


def load_policy(cfg, device, log=print):
    """The policy of a stage: load_model with the stage config's options, from out_dir's latest
    checkpoint when cfg.resume -> (model, processor, resume_from or None). Logs its size. `--vision
    auto` trains the tower only when it has never been trained (the random-init presets: a frozen
    random encoder cannot learn to see); any trained tower stays frozen, as in the paper."""
    from common import latest_checkpoint
    resume_from = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    model, processor, _ = load_model(resume_from or cfg.model, device, dtype=cfg.dtype, attn=cfg.attn, lora=cfg.lora,
                                     qlora=cfg.qlora, lora_r=cfg.lora_r, grad_ckpt=cfg.grad_ckpt, seed=cfg.seed,
                                     train_vision=cfg.vision == "trained" or (cfg.vision == "auto" and cfg.model in PRESETS))
    total, trainable = count_params(model)
    log(f"model: {cfg.model} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable)"
        + (f", resuming from {resume_from}" if resume_from else ""))
    return model, processor, resume_from


def wrap_distributed(model, device, strategy="ddp"):
    """Wrap for data-parallel training under torchrun; returns the model unchanged single-process.

    DDP keeps a full replica per rank and averages gradients in backward. FSDP2 (sharding each
    vision block and language layer) is the seam issue 6 fills; asking for it now says so."""
    from common import is_dist
    if not is_dist():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise SystemExit(f"error: --dist {strategy} is not implemented yet (FSDP2 is planned); use --dist ddp")


def unwrap(model):
    """The plain model under a DDP wrapper (generate and save_pretrained live there)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def hf_model(model):
    """The transformers model itself, under DDP and peft wrappers (for its helper methods such as
    get_rope_index and get_image_features; peft's wrapper forwards calls but not those)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_pretrained(model, processor, path):
    """Weights (safetensors) and the processor's parts in a Hugging Face folder. We save the tokenizer
    and image processor separately, not our image-only processor class, so the folder stays a plain
    Qwen3-VL folder (load_processor rebuilds ours from the parts)."""
    unwrap(model).save_pretrained(path, safe_serialization=True)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# -----------------------------------------------------------------------------------------------
# Generation for evaluation (the RL stages batch their own rollouts in rollout.py)


@torch.no_grad()
def generate(model, processor, rows, max_new_tokens=128, batch_size=32, do_sample=False, temperature=1.0):
    """Decoded responses for prompt rows (data.load_prompts format), `batch_size` prompts a call.

    Greedy by default (pass@1 evaluation). Vision tokens are suppressed (module docstring); decoding
    drops special tokens such as <|im_end|> but keeps the answer tags, which are ordinary tokens."""
    from data import encode_prompts
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample else dict(do_sample=False)
    texts = []
    for i in range(0, len(rows), batch_size):
        enc = encode_prompts(rows[i:i + batch_size], processor).to(device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, suppress_tokens=vision_token_ids(tok), use_cache=True,
                             eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                             **sampling)  # (b, prompt_len + new)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return texts
