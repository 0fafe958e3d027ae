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
Data parallelism: wrap_distributed (DDP, or FSDP2 with `gathered` for generation and
full_state_dict / optimizer_state for checkpoints). Adapters: `python model.py merge --adapter A
--out B` folds a LoRA / QLoRA adapter into a full checkpoint (merge_adapter, at the end).

Facts this file relies on (measured: docs/measured.md):
- torchvision from PyPI does not import beside torch 2.13, and without it the stock Qwen3VLProcessor
  cannot be built (it wants a video processor). We never use video, so `ImageProcessor` below is an
  image-only subclass, and every processor is loaded through `load_processor`.
- A random policy happily samples <|image_pad|>; re-scoring such a sequence fails with "Image
  features and image tokens do not match". `vision_token_ids` lists the ids generation must suppress.

Importing this module does no work.
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Literal

import torch

CACHE_DIR = os.environ.get("NANOPRISM_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache"))
BUILD_VERSION = 6  # bump when the embedded recipe changes, so stale caches are rebuilt

HUB_ALIASES = {
    "Qwen3-VL-2B": "Qwen/Qwen3-VL-2B-Instruct",
    "Qwen3-VL-4B": "Qwen/Qwen3-VL-4B-Instruct",
    "Qwen3-VL-8B": "Qwen/Qwen3-VL-8B-Instruct",
}

# The embedded random-init shapes. `tiny-random` is the shape that learned the counting task best
# (docs/measured.md#what-a-tiny-model-learns-on-2-cores: text 128 wide x 2 layers, vision 64 wide
# x 2 blocks, 8 px patches): 96 px images become 12x12 patches, merged 2x2 into 36 image tokens.
# `small-random` (~5M parameters) is for the longer reproduction. `tiny` and `small` are these,
# pretrained to see (PRETRAINED, pretrain.py).
PRESETS = {
    "tiny-random": dict(
        text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=384),
        vision=dict(hidden_size=64, depth=2, num_heads=4, intermediate_size=256, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=[0])),
    "small-random": dict(
        text=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=32, intermediate_size=768),
        vision=dict(hidden_size=128, depth=3, num_heads=4, intermediate_size=512, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=[1])),
}
# The default bases: pretrained on generic perception data of the task's world (pretrain.py), as the
# paper's Qwen3-VL already sees before SFT. NANOPRISM_BASE=random maps them to the random-init
# builds (the tests do: those build in a second, the pretrained ones in minutes).
PRETRAINED = {"tiny": "tiny-random", "small": "small-random"}


def preset_name(name):
    """--model value -> itself, or the random-init preset when NANOPRISM_BASE=random."""
    if name in PRETRAINED and os.environ.get("NANOPRISM_BASE", "pretrained") == "random":
        return PRETRAINED[name]
    return name


def random_init(name):
    """True for the random-init embedded models: their (random) vision tower must be trained."""
    return preset_name(name) in PRESETS

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
    torchvision installed. The chat template: transformers reads the tokenizer's own
    (tokenizer_config.json or chat_template.jinja); the official Qwen3-VL folders ship theirs only
    as the processor's chat_template.json, which is the fallback."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import cached_file
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    if tokenizer.chat_template is None:
        found = cached_file(path, "chat_template.json", _raise_exceptions_for_missing_entries=False)
        if found is None:
            raise SystemExit(f"error: {path} has no chat template (tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json)")
        with open(found) as f:
            tokenizer.chat_template = json.load(f)["chat_template"]
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


def build_embedded(preset="tiny-random", seed=0, cache_dir=CACHE_DIR, image_size=96):
    """Build (or reuse from cache) the embedded model folder for `preset`; return its path.

    Deterministic: the corpus, the tokenizer and the weights all come from `seed`. The cache key
    hashes the recipe, so editing PRESETS or BUILD_VERSION rebuilds instead of reusing stale files."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    import task
    preset = PRETRAINED.get(preset, preset)  # "tiny" means its shape here: random weights
    spec = PRESETS[preset]
    key = hashlib.sha256(json.dumps([spec, seed, image_size, BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{preset}-seed{seed}-{key}")
    # Under torchrun rank 0 builds and the others wait: transformers' save_pretrained writes nothing
    # on a rank other than 0 once torch.distributed is initialised, so their folders would lack the
    # weights. Every rank calls this function at the same point (load_model), so the barrier pairs up.
    from common import barrier, get_rank, publish_build
    if get_rank() != 0 or os.path.exists(os.path.join(path, "model.safetensors")):
        barrier()
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
    publish_build(tmp, path)
    barrier()
    return path


def resolve_model(name, seed=0):
    """Turn a --model value into a local folder or hub id (building the embedded model if asked)."""
    name = preset_name(name)
    if name in PRETRAINED:
        # one base for every training seed, as the paper starts every run from one Qwen3-VL; the
        # policy and the discriminator's backbone are then the same weights
        import pretrain
        return pretrain.build(name, seed=0)
    if name in PRESETS:
        return build_embedded(name, seed=seed)
    if name == "proxy":  # the real-vocabulary Qwen3-VL stand-in (proxy.py)
        import proxy
        return proxy.build(CACHE_DIR, seed=seed)
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
               lora_alpha=32, grad_ckpt=False, train_vision=False, seed=0, trust_remote_code=False,
               meta=False):
    """Return (model, processor, path). `name` is anything `--model` accepts (module docstring).

    A folder holding adapter_config.json is one of our LoRA checkpoints: its base is loaded first,
    then the adapter on top, trainable (so --resume continues a LoRA run).
    meta: build the architecture on the meta device and read no weights (the ranks but 0 under
    FSDP: wrap_distributed fills their shards from rank 0's copy); adapters and 4-bit loads
    always read their weights."""
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
    meta = meta and not (adapter or qlora)
    try:
        if meta:  # shapes only: no rank but 0 holds a full copy of the weights
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(config, **kwargs)
        else:
            model = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs)
        # an adapter folder saved without its processor uses the base model's
        no_processor = adapter and not os.path.exists(os.path.join(path, "tokenizer_config.json"))
        processor = load_processor(base_path if no_processor else path)
    except OSError as e:
        raise SystemExit(f"error: cannot load model {name!r} from {base_path!r}: {str(e).splitlines()[0]}")
    if meta:
        pass
    elif not qlora:
        model.to(device)
    else:
        import bitsandbytes as bnb
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a 4-bit weight the first time it
                # runs without gradients (every rollout), and the repacked kernel has no backward:
                # the LoRA gradients through that layer would silently vanish from then on
                module.support_avx512bf16_for_cpu = False

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
        # fresh adapters drawn from `seed`: identical on every rank (the RL stages have no DDP wrapper
        # to broadcast them), and the caller's per-rank sampling RNG is left untouched
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                     target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return model, processor, path


def pick_dist(cfg, world, log=print):
    """--dist auto -> "fsdp" or "ddp". Under torchrun, models of 1B+ parameters are sharded: a
    full replica of a 4B policy with fp32 weights, gradients and AdamW states needs ~70 GB per
    rank before any activation (python model.py memory), so DDP does not fit an 80 GB GPU. The
    embedded toys and the proxy keep DDP. The count is exact, from the architecture built on the
    meta device (memory.py), with no weights loaded."""
    if cfg.dist != "auto" or world == 1:  # single-process runs take no wrapper at all
        return cfg.dist if cfg.dist != "auto" else "ddp"
    import memory
    n = memory.parameter_count(cfg.model)
    choice = "fsdp" if n >= 1e9 else "ddp"
    log(f"--dist auto: {choice} ({n / 1e9:.2f}B parameters on {world} ranks)")
    return choice


def check_memory(stage, cfg, world, device, log=print):
    """On a GPU, before any weight is loaded: the run's peak memory per GPU estimated from its
    flags (memory.preflight, the estimate `python model.py memory` prints) against the GPU's
    size; a run that would not fit stops with a one-line error naming the flags that make it
    fit, instead of an out-of-memory error an hour in. Not on the CPU (no fixed memory to fit)."""
    if device.type != "cuda":
        return
    import memory
    memory.preflight(stage, cfg, world, torch.cuda.get_device_properties(device).total_memory
                     / memory.GB, log)


def stage_dtype(cfg, trains_all_weights=None):
    """--dtype as a stage loads a model it trains. AdamW on bf16 weights rounds most updates of
    a 1e-6 learning rate away (a bf16 weight has 8 significant bits), so trained weights and
    their optimizer states stay fp32:
      fsdp under torchrun   fp32 shards, bf16 compute (wrap_distributed's mixed precision)
      full fine-tuning      auto = fp32 weights and compute; an explicit bf16 is refused
      LoRA / QLoRA          auto = bf16 base where supported (frozen), fp32 adapters (peft)
    trains_all_weights: None = the policy's own setting (not --lora / --qlora); the
    discriminator, always trained in full, passes True."""
    from common import is_dist
    full = not (cfg.lora or cfg.qlora) if trains_all_weights is None else trains_all_weights
    if cfg.dist == "fsdp" and is_dist():
        return "fp32" if cfg.dtype == "auto" else cfg.dtype
    if full and cfg.dtype == "bf16":
        raise SystemExit("error: --dtype bf16 with full fine-tuning keeps bf16 weights and AdamW "
                         "states, which round small updates away; use --dtype auto (fp32), "
                         "--lora / --qlora, or --dist fsdp (fp32 shards, bf16 compute)")
    return "fp32" if full and cfg.dtype == "auto" else cfg.dtype


def load_policy(cfg, device, log=print):
    """The policy of a stage: load_model with the stage config's options, from out_dir's latest
    checkpoint when cfg.resume -> (model, processor, resume_from or None). Logs its size. `--vision
    auto` trains the tower only when it has never been trained (the random-init presets: a frozen
    random encoder cannot learn to see); any trained tower stays frozen, as in the paper."""
    from common import latest_checkpoint
    resume_from = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    train_vision = cfg.vision == "trained" or (cfg.vision == "auto" and random_init(cfg.model))
    model, processor, _ = load_model(resume_from or cfg.model, device, dtype=stage_dtype(cfg),
                                     attn=cfg.attn, lora=cfg.lora, qlora=cfg.qlora,
                                     lora_r=cfg.lora_r, grad_ckpt=cfg.grad_ckpt, seed=cfg.seed,
                                     train_vision=train_vision, meta=meta_load(cfg))
    set_image_size(processor, cfg)
    total, trainable = count_params(model)
    log(f"model: {cfg.model} ({total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable)"
        + (f", resuming from {resume_from}" if resume_from else ""))
    return model, processor, resume_from


def meta_load(cfg):
    """Under torchrun with --dist fsdp, every rank but 0 builds its models on the meta device
    (shapes, no storage) and gets its shards from rank 0's weights in wrap_distributed: one full
    copy on the node instead of one per rank (8 x 17.7 GB of fp32 for the 4B policy)."""
    from common import get_rank, is_dist
    return cfg.dist == "fsdp" and is_dist() and get_rank() != 0


def set_image_size(processor, cfg):
    """--min_pixels / --max_pixels on a processor: each image is resized (aspect kept, sides
    multiples of patch x merge) to between these many pixels, which bounds its image tokens
    (pixels / (patch x merge)^2: 16,384 tokens at the 16,777,216 cap for Qwen3-VL). Stages
    without the flags keep the folder's own settings."""
    lo, hi = getattr(cfg, "min_pixels", None), getattr(cfg, "max_pixels", None)
    if lo is None and hi is None:
        return
    size = processor.image_processor.size
    processor.image_processor.size = {"shortest_edge": lo or size.shortest_edge,
                                      "longest_edge": hi or size.longest_edge}


def wrap_distributed(model, device, strategy="ddp", grads="mean", cpu_offload=False,
                     mixed_precision=None):
    """Data parallelism under torchrun; returns the model unchanged single-process.

    ddp   a full replica per rank, gradients averaged in backward (DDP's wrapper).
    fsdp  FSDP2: each vision block and each language layer is its own shard unit, then the root
          takes what is left (embeddings, norms, LM head, projector, value head). A rank holds
          1/world of every weight, gradient and optimizer state; a unit's full weights exist
          only while it runs (all-gathered in forward and again in backward). On CUDA the sharded
          weights stay fp32 (load with --dtype auto: fp32 under fsdp) and compute runs in bf16
          (MixedPrecisionPolicy); --cpu_offload keeps the shards and optimizer states in CPU RAM.
          grads: "mean" averages over ranks (as DDP: sft.py, the discriminator), "sum" adds them
          (the RL stages, whose losses are already divided by global token counts).
          mixed_precision: None = bf16 compute on CUDA only; True forces it (the CPU tests of the
          CUDA path). A module named `value_head` (the discriminator's) is its own unit that
          keeps fp32 weights: a score is one dot product, and rounding it to bf16 costs precision
          for nothing.

    Under fsdp: sampling and evaluation run inside `gathered(model)`; checkpoints go through
    save_pretrained / optimizer_state, which gather the full tensors on rank 0; and every rank
    must run the same number of forwards (each one is a collective), see even_split."""
    from common import is_dist
    if not is_dist():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise SystemExit("error: --qlora cannot be combined with --dist fsdp here (4-bit weights are not "
                         "sharded); use --lora with fsdp, or --qlora with ddp / one GPU")
    from common import any_rank, get_rank
    from torch.distributed.device_mesh import init_device_mesh
    # rank 0's full weights, kept for the other ranks if they were built on the meta device
    full = model.state_dict() if any_rank(_on_meta(model)) and get_rank() == 0 else None
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    kwargs = {"mesh": init_device_mesh(device.type, (torch.distributed.get_world_size(),))}
    fp32 = None
    if device.type == "cuda" if mixed_precision is None else mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # the units: elements of a ModuleList called blocks (vision) or layers (language model), found
    # by name so the same code shards the policy, a peft-wrapped policy and the discriminator
    units = [m for name, m in model.named_modules() if re.search(r"(^|\.)(blocks|layers)\.\d+$", name)]
    heads = [m for name, m in model.named_modules() if name.split(".")[-1] == "value_head"]
    for unit in heads:  # fp32 weights, and its input cast to fp32 by FSDP (cast_forward_inputs)
        fully_shard(unit, **(dict(kwargs, mp_policy=fp32) if fp32 else kwargs))
    for unit in units + [model]:
        fully_shard(unit, **kwargs)
    units = heads + units
    _fill_from_rank0(model, full, device)
    for unit in units + [model]:
        unit.set_gradient_divide_factor(1.0 if grads == "sum" else float(torch.distributed.get_world_size()))
        unit.set_force_sum_reduction_for_comms(True)  # scale apart from the sum: gloo has no PREMUL_SUM
        # A parameter that got no gradient on one rank (an unused expert) still joins the
        # reduce-scatter as zeros, so every rank sends the same sizes
        unit.set_reduce_scatter_unused_params(True)
    if hasattr(model, "generate"):
        # generate() calls the vision tower before the root's forward; registering it makes it
        # run FSDP's root hooks first, as a forward does
        register_fsdp_forward_method(model, "generate")
    return model


def _on_meta(model):
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _fill_from_rank0(model, full, device):
    """After fully_shard: ranks whose model was built on meta (meta_load) allocate their shards
    and every shard is filled from rank 0's full state dict (broadcast, one tensor at a time);
    buffers, which the state dict may leave out (rotary frequencies are not saved), are
    broadcast from rank 0 too. Every rank calls it; a no-op when no rank is on meta."""
    from common import any_rank
    if not any_rank(_on_meta(model)):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if _on_meta(model):
        model.to_empty(device=device)
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True,
                                                                     broadcast_from_rank0=True))
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Under FSDP: every unit's full weights on every rank for the duration, kept between forwards.

    Sampling and evaluation run many forwards whose number differs per rank (responses end at
    different lengths); with the weights gathered once up front, those forwards need no
    collective and ranks never wait on each other. Costs the full model's memory for the
    duration, as generation under ZeRO-3 does in other trainers. A no-op without FSDP, and when
    already inside."""
    from torch.distributed.fsdp import FSDPModule
    model = unwrap(model)
    if not is_sharded(model) or getattr(model, "_gathered", False):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    model._gathered = True
    try:
        yield
    finally:
        model._gathered = False
        for unit in units:
            unit.reshard()
            # training again: units free their weights after forward, the root keeps its own
            # (FSDP's default: the root's are needed again first in backward)
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def input_device(model):
    """The device a model's inputs go to (its parameters' device; under FSDP the mesh's)."""
    p = next(unwrap(model).parameters())
    if getattr(p, "device_mesh", None) is not None and p.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return p.device


def even_split(pieces):
    """Under FSDP every rank must call a model the same number of times (each forward and
    backward is a collective). Pad a rank's list of micro-batches with copies of its first one up
    to the largest count over ranks -> (pieces, real), real[i] False for a padding copy, whose
    loss the caller multiplies by 0 (it must still join the backward). Single-process: unchanged.
    (DDP and the manual gradient all-reduce would not need it; it costs them nothing when the
    counts already agree, which is the usual case.)"""
    from common import all_reduce_max, is_dist
    if not is_dist():
        return pieces, [True] * len(pieces)
    most = int(all_reduce_max(torch.tensor(len(pieces), device="cpu")).item())
    return pieces + pieces[:1] * (most - len(pieces)), [True] * len(pieces) + [False] * (most - len(pieces))


def unwrap(model):
    """The plain model under a DDP wrapper (generate and save_pretrained live there). FSDP2 keeps
    the module itself (its class is swapped for a sharded subclass), so there is nothing to unwrap."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def hf_model(model):
    """The transformers model itself, under DDP and peft wrappers (for its helper methods such as
    get_rope_index and get_image_features; peft's wrapper forwards calls but not those)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def full_state_dict(model):
    """Every rank calls this. Under FSDP: the full tensors gathered onto rank 0's CPU (the other
    ranks get {}); otherwise None (the model's own state_dict is already whole)."""
    if not is_sharded(unwrap(model)):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (the LM head and the embeddings of the small Qwen3-VLs) come back as two equal
    # copies; alias them again so save_pretrained recognises the tie and stores one.
    first = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in first and name in state and first[id(p)] in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def save_pretrained(model, processor, path):
    """Weights (safetensors) and the processor's parts in a Hugging Face folder. Every rank calls
    this (under FSDP the shards are gathered first); rank 0 writes. We save the tokenizer and image
    processor separately, not our image-only processor class, so the folder stays a plain Qwen3-VL
    folder (load_processor rebuilds ours from the parts)."""
    from common import get_rank
    state = full_state_dict(model)
    if get_rank() != 0:
        return
    unwrap(model).save_pretrained(path, safe_serialization=True, state_dict=state)
    # names the processor class, so AutoProcessor also builds the whole processor from an adapter
    # folder (which has no config.json to tell it the model type)
    processor.image_processor.processor_class = "Qwen3VLProcessor"
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


def optimizer_state(model, optimizer):
    """Every rank calls this -> what goes into trainer_state.pt. Under FSDP the full state keyed by
    parameter name, gathered on rank 0 (so a run can resume on another number of GPUs)."""
    if not is_sharded(unwrap(model)):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state):
    """optimizer_state's output back into the optimizer (each rank keeps its shard under FSDP)."""
    if not is_sharded(unwrap(model)):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# -----------------------------------------------------------------------------------------------
# Generation for evaluation (the RL stages batch their own rollouts in rollout.py)


@torch.no_grad()
def generate(model, processor, rows, max_new_tokens=128, batch_size=32, do_sample=False,
             temperature=1.0, token_budget=None):
    """Decoded responses for prompt rows (data.load_prompts format), `batch_size` prompts a call,
    fewer when rows x (padded prompt + max_new_tokens) would pass token_budget (None: no limit):
    the KV cache grows with that product (64 rows x 8,192 tokens of a 4B model: ~77 GB).

    Greedy by default (pass@1 evaluation). Vision tokens are suppressed (module docstring);
    decoding drops special tokens such as <|im_end|> but keeps the answer tags (ordinary tokens)."""
    from data import encode_prompts
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = input_device(model)
    tok = processor.tokenizer
    sampling = (dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if do_sample
                else dict(do_sample=False))
    texts, i = [], 0
    # under FSDP: ranks generate different numbers of tokens, without collectives
    with gathered(model):
        while i < len(rows):
            chunk = rows[i:i + batch_size]
            enc = encode_prompts(chunk, processor)
            width = enc["input_ids"].shape[1] + max_new_tokens
            if token_budget and len(chunk) * width > token_budget and len(chunk) > 1:
                chunk = chunk[:max(1, token_budget // width)]
                enc = encode_prompts(chunk, processor)
            enc = enc.to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 suppress_tokens=vision_token_ids(tok), use_cache=True,
                                 eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tok.pad_token_id, **sampling)  # (b, P + new)
            texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            i += len(chunk)
    model.train(was_training)
    return texts


# -----------------------------------------------------------------------------------------------
# Merging a LoRA adapter into a full checkpoint: `python model.py merge --adapter A --out B`.
# The result needs neither peft nor this repo to load (tools that serve Qwen3-VL, other trainers).


def merge_adapter(adapter_dir, out_dir, dtype="auto"):
    """Fold the LoRA adapter in `adapter_dir` into its base model -> out_dir, a plain Hugging Face
    Qwen3-VL folder (weights + tokenizer + image processor, as save_pretrained writes them).

    The base is loaded in full precision even under a QLoRA adapter: adding B @ A into nf4 weights
    would round the sum back to 4 bits. The merge runs in fp32 on the CPU (no GPU; 4 bytes of RAM
    per parameter, 32 GB for an 8B model); the weights are then saved in `dtype`, by default the one
    the base was stored in (a bf16 hub model stays bf16, the embedded presets fp32). Written
    atomically: a crash leaves no half folder."""
    from common import write_dir_atomic
    if not os.path.isdir(adapter_dir):
        raise SystemExit(f"error: adapter folder {adapter_dir} not found")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.exists(os.path.join(adapter_dir, name)):
            full = os.path.exists(os.path.join(adapter_dir, "config.json"))
            raise SystemExit(f"error: {adapter_dir} is not a LoRA adapter folder (no {name})"
                             + ("; it is a full checkpoint already, nothing to merge" if full else ""))
    if os.path.abspath(out_dir) == os.path.abspath(adapter_dir):
        raise SystemExit("error: --out must differ from --adapter (the merge would replace the adapter)")
    # load_model sees adapter_config.json: it loads the base (fp32, no quantisation), then the adapter
    model, processor, _ = load_model(adapter_dir, torch.device("cpu"), dtype="fp32")
    if dtype == "auto":
        from transformers import AutoConfig
        base = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))["base_model_name_or_path"]
        dtype = AutoConfig.from_pretrained(base).dtype or torch.float32  # the dtype its config.json records
    else:
        dtype = pick_dtype(torch.device("cpu"), dtype)
    model = model.merge_and_unload()  # W <- W + (alpha / r) * B @ A in every adapted layer; peft's wrapper is gone
    model.to(dtype)
    for name in model.config.sub_configs:  # the fp32 load wrote "float32" into text_config and vision_config too
        getattr(model.config, name).dtype = dtype
    write_dir_atomic(out_dir, lambda tmp: save_pretrained(model, processor, tmp))
    return out_dir


@dataclass
class MergeConfig:
    adapter: str = "runs/rlvr/final"  # a LoRA / QLoRA adapter folder (adapter_config.json + adapter_model.safetensors)
    out: str = "runs/rlvr/merged"  # the merged full checkpoint (replaced atomically if it exists)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # saved weights' dtype (auto: the base's own)


def main(argv=None):
    from common import parse_config
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["memory"]:  # GPU memory of a stage, computed on the meta device (memory.py)
        import memory
        return memory.main(argv[1:])
    if not argv or argv[0] != "merge":
        raise SystemExit("usage: python model.py merge --adapter runs/x/final --out runs/x/merged"
                         " | python model.py memory --model Qwen3-VL-4B --stage align ...  (-h lists the flags)")
    cfg = parse_config(MergeConfig, argv[1:])
    print(f"merged {cfg.adapter} into {merge_adapter(cfg.adapter, cfg.out, cfg.dtype)}")


if __name__ == "__main__":
    main()
