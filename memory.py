"""GPU memory of a stage, computed before you rent the GPU: `python model.py memory ...`.

    python model.py memory --model Qwen3-VL-4B --stage align --gpus 8 --gpu_gb 80 --dist fsdp \\
        --grad_ckpt --disc_chunk 1 --disc_grad_ckpt --disc_micro_batch 4 --token_budget 8192 ...

The real architecture is built on the meta device (no weights, no RAM): transformers' Qwen3-VL class
for the policy and discriminator.Discriminator (the upcycled MoE with its value head) for D, so the
parameter counts are those of the modules the stages train. Everything else is per-byte arithmetic
that follows the code paths of the stages (docs/scaling.md explains each line):

  kept all run   weights and AdamW states of every model on the GPU
  sampling       rollout.sample: KV cache of one chunk of prompts x group_size rollouts (+ under
                 FSDP the whole policy gathered in bf16, model.gathered)
  evaluation     generate / held-out sampling of eval_batch_size prompts (sft: + validation logits)
  D update       align.py's score_all with gradients: D's activations of --disc_chunk prompts, its
                 gradients (and under FSDP its layers in flight)
  policy update  one micro-batch of --token_budget padded tokens: activations, float32 logits of the
                 completion positions (rollout.completion_logprobs), gradients
  peak = overhead + kept + the largest phase; it fits when peak <= --gpu_gb (GB = 1e9 bytes).

Activations are bytes per token per decoder layer from the tensors autograd keeps (the formula in
`layer_bytes`; tests/test_memory.py checks it against the saved tensors of the real layer).
Not counted: allocator fragmentation (a card sold as G GB has G GiB, ~7% more than G * 1e9
bytes: that is the headroom), --cpu_offload, --kl_coef's reference model, --difficulty_filter.
Importing this module does no work.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch

GB = 1e9

# The three aliases, offline. Values of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json. 4B: read in
# copies of that file in public code; with them the meta model has 4,437,815,808 parameters, the
# published per-tensor total. 8B: text and vision as copied from its config.json in public code
# (8,767,123,696 parameters on meta, published: 8.77B). 2B: layers, widths, heads and vision as in
# copies of its config; intermediate_size 6144 (its text model is Qwen3-1.7B's shape) gives the
# published 2.128B total. Shared by all three: vocabulary 151,936, head_dim 128, rope_theta 5e6,
# interleaved M-RoPE [24, 20, 20], vision patch 16, temporal patch 2, merge 2, 2304 position
# embeddings.
PUBLIC_CONFIGS = {
    "Qwen3-VL-2B": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17]),
                        tie=True),
    "Qwen3-VL-4B": dict(text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                    out_hidden_size=2560, deepstack_visual_indexes=[5, 11, 17]),
                        tie=True),
    "Qwen3-VL-8B": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8),
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                    out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
                        tie=False),
}
PAPER = {"sft": dict(new=8192, prompts=2), "align": dict(new=6144, prompts=4),
         "rlvr": dict(new=8192, prompts=32)}  # REFERENCE section 5
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # bytes/param: 4 bits + 8-bit absmax per 64 + fp32 per 256 absmax
# Bytes per logit position x vocabulary (bf16 stream; QLoRA's is fp32). RL: lm_head's bf16 logits,
# the fp32 copy, the tempered copy logsumexp keeps, its fp32 gradient. SFT: bf16 logits, fp32
# copy, log_softmax output, its gradient. Validation (no grad): bf16, fp32 copy, log_softmax.
LOGIT_BYTES = {"rl": (16, 20), "sft": (14, 16), "val": (10, 12)}


@dataclass
class MemoryConfig:
    model: str = "Qwen3-VL-4B"  # Qwen3-VL-2B | -4B | -8B (configs embedded), tiny | small, or a folder with config.json
    stage: Literal["sft", "align", "rlvr"] = "rlvr"  # which stage's memory
    gpus: int = 1  # GPUs in all (one process each; 1 = no torchrun)
    gpu_gb: float = 80.0  # memory of one GPU in GB (1e9 bytes)
    dist: Literal["ddp", "fsdp"] = "ddp"  # as the stages' --dist (ignored on one GPU)
    lora: bool = False  # policy: LoRA adapters on the language model instead of all weights
    qlora: bool = False  # policy: nf4 base + LoRA (bitsandbytes)
    lora_r: int = 16  # LoRA rank
    vision: Literal["auto", "frozen", "trained"] = "auto"  # as the stages: auto trains only tiny / small's tower
    master_fp32: bool = True  # full fine-tune outside FSDP: fp32 master weights + AdamW states (issue 17); false = today's bf16 states
    grad_ckpt: bool = False  # policy gradient checkpointing
    attn: Literal["sdpa", "flash_attention_2"] = "sdpa"  # attention kernel
    max_prompt_len: int = 2048  # prompt tokens, image tokens included (paper: 2048)
    max_new_tokens: int = 0  # response tokens (0 = paper: sft 8192, align 6144, rlvr 8192); sft rows = prompt + response
    max_pixels: int = 1048576  # pixels of the one image per prompt (32 x 32 pixels per image token)
    prompts_per_step: int = 0  # prompts per step over all GPUs (0 = paper: align 4, rlvr 32)
    group_size: int = 16  # rollouts per prompt (paper: 16)
    token_budget: int = 32768  # align / rlvr: padded tokens per update micro-batch, also caps sampling chunks
    micro_batch_size: int = 32  # sft: rows per forward on one GPU (sft.py's default)
    eval_batch_size: int = 64  # prompts per evaluation generate call (0 = no evaluation)
    eval_k: int = 4  # align / rlvr: held-out samples per prompt (0 = greedy only)
    disc: str = "Qwen3-VL-2B"  # align: the discriminator's backbone (paper: Qwen3-VL-2B)
    disc_kind: Literal["moe", "dense"] = "moe"  # dense = the no-upcycling ablation (text-only counts as moe)
    disc_experts: int = 4  # experts per MoE layer (official: 4)
    disc_top_k: int = 2  # experts per token (official: 2)
    disc_train: Literal["full", "experts", "lora", "head"] = "full"  # what D trains: full (today's code), experts (+ routers, head), lora (LoRA experts + routers, head), head (value head only)
    disc_4bit: bool = False  # D's frozen linear layers in nf4 (needs disc_train other than full)
    disc_lora_r: int = 16  # rank of the LoRA experts (disc_train lora)
    disc_chunk: int = 0  # as align.py: prompts whose D graphs are alive at once (0 = all of the GPU's)
    disc_grad_ckpt: bool = False  # as align.py: D gradient checkpointing
    disc_micro_batch: int = 64  # as align.py: sequences per D forward
    max_segment_tokens: int = 512  # as discriminator.py: scored segment tokens
    overhead_gb: float = 1.0  # CUDA context, cuBLAS / NCCL workspaces: a typical value, not computed
    json: bool = False  # print the numbers as JSON instead of tables


# -----------------------------------------------------------------------------------------------
# The architecture, on the meta device


def hf_config(name):
    """(Qwen3VLConfig, where its values came from) for a --model / --disc value."""
    from transformers import Qwen3VLConfig
    import model as models
    name = {v: k for k, v in models.HUB_ALIASES.items()}.get(name, name)  # Qwen/Qwen3-VL-4B-Instruct too
    if name in PUBLIC_CONFIGS:
        c = PUBLIC_CONFIGS[name]
        rope = dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True)
        text = dict(vocab_size=151936, head_dim=128, max_position_embeddings=262144, rope_parameters=rope,
                    tie_word_embeddings=c["tie"], **c["text"])
        vision = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                      **c["vision"])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=c["tie"])
        return config, f"{models.HUB_ALIASES[name]} config.json values embedded in memory.py"
    path = models.resolve_model(name)  # builds tiny / small if needed (seconds, cached)
    if os.path.exists(os.path.join(path, "adapter_config.json")):  # one of our LoRA checkpoints: its base
        return hf_config(json.load(open(os.path.join(path, "adapter_config.json")))["base_model_name_or_path"])
    if not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"error: no config.json in {path!r}; give a Qwen3-VL alias or a local folder")
    return Qwen3VLConfig.from_pretrained(path), os.path.join(path, "config.json")


def build_meta(config):
    """The Qwen3VLForConditionalGeneration of config on the meta device (no memory, ~0.1 s)."""
    from transformers import Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(config)


def build_disc_meta(config, cfg):
    """discriminator.Discriminator on the backbone's Qwen3VLModel, on meta: the same upcycling code."""
    import discriminator
    moe = cfg.disc_kind == "moe"
    dcfg = {"kind": cfg.disc_kind, "routing": "learned", "n_experts": cfg.disc_experts if moe else 1,
            "top_k": cfg.disc_top_k if moe else 1, "noise": 0.01, "max_segment_tokens": cfg.max_segment_tokens,
            "train_vision": False, "backbone": cfg.disc}
    return discriminator.Discriminator(build_meta(config).model, dcfg)


def numel(params):
    return sum(p.numel() for p in params)


def policy_params(m, cfg):
    """Parameter counts of the policy by module, and what the stage trains / quantises."""
    named = dict(m.named_parameters())  # tied weights once, as the optimizer sees them
    merger = [p for n, p in named.items() if ".visual.merger." in n or ".visual.deepstack_merger_list." in n]
    visual = [p for n, p in named.items() if ".visual." in n]
    embed = [p for n, p in named.items() if "embed_tokens" in n or n.startswith("lm_head")]
    lm = [p for n, p in named.items() if ".language_model." in n and "embed_tokens" not in n]
    import model as models
    # LoRA: rank r on every Linear whose name matches the pattern load_model hands to peft
    lora = sum(cfg.lora_r * (x.in_features + x.out_features) for n, x in m.named_modules()
               if isinstance(x, torch.nn.Linear) and re.fullmatch(models.LORA_TARGETS, n))
    # QLoRA: bitsandbytes quantises every Linear outside model.visual and lm_head
    nf4 = numel(x.weight for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)
                and ".visual." not in f".{n}." and not n.startswith("lm_head"))
    train_vision = cfg.vision == "trained" or (cfg.vision == "auto" and cfg.model in models.PRESETS)
    total = numel(named.values())
    return {"vision tower": numel(visual) - numel(merger), "merger": numel(merger), "language model": numel(lm),
            "embeddings + LM head": numel(embed), "total": total, "lora": lora, "nf4": nf4,
            "full_trainable": total - (0 if train_vision else numel(visual)), "tied": m.config.tie_word_embeddings,
            "train_vision": train_vision}


def disc_params(d, cfg):
    """D's parameter counts by role: frozen vision, experts, routers, value head, the rest."""
    named = dict(d.named_parameters())
    pick = lambda key: numel(p for n, p in named.items() if key in n)  # noqa: E731
    experts = pick(".experts.") if cfg.disc_kind == "moe" else pick(".mlp.")
    linears = [x for n, x in d.named_modules() if isinstance(x, torch.nn.Linear) and ".language_model." in n
               and ".router" not in n]
    expert_shapes = [x for n, x in d.named_modules() if isinstance(x, torch.nn.Linear) and ".experts." in n]
    return {"total": numel(named.values()), "vision": pick(".visual."), "experts": experts,
            "routers": pick(".router."), "head": pick("value_head"), "linear": numel(x.weight for x in linears),
            "lora": cfg.disc_lora_r * sum(x.in_features + x.out_features for x in expert_shapes)}


def shard_units(module, trainable):
    """FSDP units as model.wrap_distributed cuts them (each vision block and decoder layer; the root
    holds the rest) -> (largest unit, its trainable part, root, its trainable part) in parameters.
    trainable(name) says whether the stage trains the parameter of that name."""
    units = [n for n, _ in module.named_modules() if re.search(r"(^|\.)(blocks|layers)\.\d+$", n)]
    sizes = {u: [0, 0] for u in units + [""]}
    for name, p in module.named_parameters():
        unit = next((u for u in units if name.startswith(u + ".")), "")
        sizes[unit][0] += p.numel()
        sizes[unit][1] += p.numel() if trainable(name) else 0
    big = max(units, key=lambda u: sizes[u][0])
    return (*sizes[big], *sizes[""])


def in_flight(units):
    """Bytes of FSDP's gathered units during a training step: the root's bf16 weights stay gathered
    from forward to backward, two layers are gathered at once (one prefetched), and a unit's
    trainable parameters have a bf16 gradient plus the fp32 copy reduce-scattered."""
    unit, unit_train, root, root_train = units
    return 2 * root + 2 * 2 * unit + 6 * (root_train + unit_train)


# -----------------------------------------------------------------------------------------------
# Activations: what autograd keeps per token of one decoder layer


def shape(config):
    t, v = config.text_config, config.vision_config
    return dict(H=t.hidden_size, I=t.intermediate_size, L=t.num_hidden_layers, nh=t.num_attention_heads,
                nkv=t.num_key_value_heads, d=t.head_dim, V=t.vocab_size, Hv=v.hidden_size, Iv=v.intermediate_size,
                px=v.patch_size * v.spatial_merge_size, merge=v.spatial_merge_size, deep=len(v.deepstack_visual_indexes))


def layer_bytes(s, a, train=False, lora_r=0, masked=True, moe=None):
    """(bytes per query token, bytes per key) one decoder layer keeps for backward.

    a: bytes of the residual stream (2 bf16; 4 under QLoRA, whose norms peft upcast). train: the
    layer's own weights train (full fine-tune); lora_r: peft adapters on its seven linears. A frozen
    weight keeps nothing of its input (its gradient is not needed), a trainable one keeps it.
    moe: (experts E, top-k, experts train, router trains, expert LoRA rank) for D's MoE layers.
    Keys: sdpa keeps K and V; under a padding mask transformers repeats them per query head."""
    H, I, nh, nkv, d = s["H"], s["I"], s["nh"], s["nkv"], s["d"]
    q, kv = nh * d, nkv * d
    per_q = 2 * (4 * H + 4) + (4 * q + 4 * nh) + (4 * kv + 4 * nkv)  # RMSNorms: fp32 upcast + rsqrt
    per_q += 2 * a * q + 4 * nh  # sdpa: rotated queries, output, logsumexp (fp32)
    if train:  # the normalised input of each norm weight (2 x H, q_norm, k_norm) and qkv / o inputs
        per_q += a * (2 * H + q + kv) + a * H
    if lora_r:
        # peft gives each adapter an fp32 copy of its input (none when the stream is fp32 already)
        per_q += (4 * H if a == 4 else 4 * (3 * H + q)) + 4 * 4 * lora_r  # q, k, v, o (o reads sdpa out)
    if moe is None:
        per_q += 3 * a * I  # gate output (SiLU), SiLU output and up output (their product)
        per_q += a * H + a * I if train else 0  # gate / up input, down input
        per_q += (4 * H + 4 * I if a == 4 else 4 * (2 * H + I)) + 3 * 4 * lora_r if lora_r else 0
    else:
        E, k, experts, router, r = moe
        per_q += (a * H if router else 0) + 4 * E + 12 * k  # router input, probs, top-k weights + indices
        # per routed token: gate, SiLU and up outputs; the weighted output index_add_ keeps, the
        # routing weight, the token / slot indices (int64)
        slot = 3 * a * I + a * H + a + 16
        slot += a * H + a * I if experts else 0  # the gathered input, the down input
        slot += a * H if router else 0  # the expert output, kept by the routing-weight multiply
        slot += 4 * (2 * H + I) + 3 * 4 * r if r else 0  # LoRA experts: fp32 input copies, A outputs
        per_q += k * slot
    return per_q, 2 * a * (nh if masked else nkv) * d


def forward_bytes(s, a, rows, q_len, k_len, ckpt, masked, lm_head=True, **kw):
    """(kept for backward, one layer recomputed) bytes of a forward over rows x q_len query tokens
    attending to k_len keys. Checkpointed layers keep only their input (a x H per token); the layer
    being recomputed in backward holds its full activations meanwhile. sdpa turns the boolean mask
    into an a-byte bias per layer (kept for backward); flash attention needs no mask."""
    per_q, per_k = layer_bytes(s, a, masked=masked, **kw)
    one = rows * (q_len * per_q + k_len * per_k + (a * q_len * k_len if masked else 0))
    # the final norm (fp32 upcast, rsqrt; + its normalised input and the LM head's input when trained)
    final = rows * q_len * (4 * s["H"] + 4 + ((1 + lm_head) * a * s["H"] if kw.get("train") else 0))
    if ckpt:
        return rows * q_len * a * s["H"] * s["L"] + final, one
    return one * s["L"] + final, 0


def vision_bytes(s, images, image_tokens, a=2):
    """Working set of the frozen vision tower's forward (no graph): one block over all patches,
    plus the merged image tokens and deepstack features it hands over. A rough upper bound."""
    patches = image_tokens * s["merge"] ** 2
    return images * (patches * a * (2 * s["Hv"] + max(3 * s["Hv"], s["Iv"])) + image_tokens * a * s["H"] * (1 + s["deep"]))


# -----------------------------------------------------------------------------------------------
# The estimate


def estimate(cfg):
    """All numbers for cfg -> dict (rows of (phase, component, bytes), phase totals, peak, fits,
    parameter counts, assumptions). Raises SystemExit with one line for settings a stage refuses."""
    world = max(1, cfg.gpus)
    fsdp = cfg.dist == "fsdp" and world > 1
    adapters = cfg.lora or cfg.qlora
    if cfg.qlora and fsdp:  # as model.wrap_distributed
        raise SystemExit("error: --qlora cannot be combined with --dist fsdp (4-bit weights are not sharded)")
    if cfg.stage == "align" and cfg.disc_4bit and (cfg.disc_train == "full" or fsdp):
        raise SystemExit("error: --disc_4bit needs --disc_train experts|lora|head and no --dist fsdp")
    if cfg.stage == "align" and cfg.disc_kind == "dense" and cfg.disc_train in ("experts", "lora"):
        raise SystemExit(f"error: --disc_train {cfg.disc_train} needs --disc_kind moe (a dense D has no experts)")
    config, source = hf_config(cfg.model)
    s = shape(config)
    m = build_meta(config)
    pp = policy_params(m, cfg)
    new = cfg.max_new_tokens or PAPER[cfg.stage]["new"]
    P = cfg.max_prompt_len
    prompts = cfg.prompts_per_step or PAPER[cfg.stage]["prompts"]
    per_rank = math.ceil(prompts / world)
    image_tokens = cfg.max_pixels // s["px"] ** 2
    if image_tokens > P:
        raise SystemExit(f"error: {image_tokens} image tokens (--max_pixels {cfg.max_pixels}) do not fit in "
                         f"--max_prompt_len {P}")
    a = 4 if cfg.qlora else 2  # QLoRA: peft upcasts norms and embeddings, the stream is fp32
    rows, notes = [], []

    def add(phase, what, n_bytes):
        rows.append((phase, what, float(n_bytes)))

    # ---- kept all run: weights + AdamW states (gradients live only in their update phase)
    train_n = pp["lora"] if adapters else pp["full_trainable"]
    train_vision = pp["train_vision"]
    pp["trained"] = train_n
    K = "kept all run"
    if fsdp:
        add(K, f"policy weights, fp32 shards (1/{world})", 4 * (pp["total"] + (train_n if adapters else 0)) / world)
        add(K, "policy AdamW m + v, fp32 shards", 8 * train_n / world)
        grads = ("policy gradients, fp32 shards", 4 * train_n / world)
        flight = in_flight(shard_units(m, lambda n: not adapters and (".visual." not in n or train_vision)))
        notes.append("FSDP: fp32 shards, bf16 compute; in flight: the root unit's bf16 weights (kept from "
                     "forward to backward) + 2 layers' (prefetch) + their bf16 gradients and fp32 reduce copies")
    elif cfg.qlora:
        add(K, f"policy base: nf4 {pp['nf4'] / 1e9:.2f}B + fp32 rest (peft upcast)",
            NF4 * pp["nf4"] + 4 * (pp["total"] - pp["nf4"]))
        add(K, "policy LoRA weights + AdamW m + v (fp32)", 12 * train_n)
        grads = ("policy LoRA gradients (fp32)", 4 * train_n)
    elif adapters:
        add(K, "policy base weights (bf16)", 2 * pp["total"])
        add(K, "policy LoRA weights + AdamW m + v (fp32)", 12 * train_n)
        grads = ("policy LoRA gradients (fp32)", 4 * train_n)
    else:
        add(K, "policy weights (bf16)", 2 * pp["total"])
        add(K, "policy fp32 master weights + AdamW m + v" if cfg.master_fp32 else "policy AdamW m + v (bf16)",
            (12 if cfg.master_fp32 else 4) * train_n)
        grads = ("policy gradients (bf16)", 2 * train_n)
    if not fsdp and world > 1:  # DDP's buckets / the RL stages' flat all-reduce buffer
        grads = (grads[0] + " + all-reduce buffer copy", 2 * grads[1])
    kv_token = s["L"] * 2 * s["nkv"] * s["d"] * a  # K and V of every layer

    def gathered(phase):
        if fsdp:
            add(phase, "policy gathered in bf16 (model.gathered)", 2 * pp["total"])

    def kv(phase, what, seqs, length):
        add(phase, f"KV cache: {what}", seqs * length * kv_token * (1 + 1 / s["L"]))  # + one layer's append copy

    # ---- evaluation: greedy generate (and held-out sampling) of eval_batch_size prompts
    E = "evaluation"
    if cfg.eval_batch_size:
        gathered(E)
        kv(E, f"{cfg.eval_batch_size} prompts x ({P} + {new}) tokens", cfg.eval_batch_size, P + new)
        add(E, "vision tower forward (transient)", vision_bytes(s, cfg.eval_batch_size, image_tokens, a))
        if cfg.stage == "sft":  # sft.evaluate's validation loss takes whole-sequence logits
            add(E, f"validation logits: {cfg.eval_batch_size} x {P + new} positions",
                cfg.eval_batch_size * (P + new) * s["V"] * LOGIT_BYTES["val"][a == 4])

    def flight_rows(phase, who="policy"):
        if fsdp:
            add(phase, f"{who} layers in flight (bf16 gathered + gradients)", flight if who == "policy" else d_flight)

    if cfg.stage == "sft":
        T = "training step"
        micro = cfg.micro_batch_size
        L = P + new
        add(T, *grads)
        flight_rows(T)
        kept, redo = forward_bytes(s, a, micro, L, L, cfg.grad_ckpt, masked=micro > 1 and cfg.attn == "sdpa",
                                   train=not adapters, lora_r=cfg.lora_r if adapters else 0)
        add(T, f"activations: {micro} rows x {L} tokens" + (", checkpointed" if cfg.grad_ckpt else ""), kept)
        if redo:
            add(T, "one layer recomputed in backward", redo)
        add(T, f"logits: {micro} x {L} positions x {s['V']:,}", micro * L * s["V"] * LOGIT_BYTES["sft"][a == 4])
        add(T, "vision tower forward (transient)", vision_bytes(s, micro, image_tokens, a))
        notes.append(f"sft rows are prompt + response = {P} + {new} tokens; --micro_batch_size {micro} rows per "
                     "forward" + (" (one row: no padding mask, sdpa uses GQA directly)" if micro == 1 else ""))
    else:
        # ---- sampling: rollout.sample chunks prompts so chunk x group x (prompt + new) <= token_budget
        n = cfg.group_size
        S = "sampling"
        chunk = min(per_rank, max(1, cfg.token_budget // (n * (P + new))))
        gathered(S)
        kv(S, f"{chunk} prompt(s) x {n} rollouts x ({P} + {new}) tokens", chunk * n, P + new)
        add(S, "prefill working set + one decode step's logits",
            chunk * P * a * (2 * s["H"] + 3 * s["I"]) + a * chunk * P * P + chunk * n * s["V"] * 18)
        add(S, "vision tower forward (transient)", vision_bytes(s, chunk, image_tokens, a))
        # ---- policy update: micro-batches of token_budget padded tokens (rollout.micro_batches)
        U = "policy update"
        width = P + new
        b = min(per_rank * n, max(1, cfg.token_budget // width))
        add(U, *grads)
        flight_rows(U)
        lkw = dict(train=not adapters, lora_r=cfg.lora_r if adapters else 0)
        masked = cfg.attn == "sdpa"
        if cfg.grad_ckpt:  # checkpointing: the plain forward over prompt + completion
            kept, redo = forward_bytes(s, a, b, width, width, True, masked, **lkw)
            how = f"{b} rows x {width} tokens, checkpointed"
        else:  # the shared prefix: the micro-batch's prompts once, then completions on their keys
            u = min(b, per_rank)
            kept, _ = forward_bytes(s, a, u, P, P, False, masked, **lkw)
            kept += forward_bytes(s, a, b, new, width, False, masked, **lkw)[0]
            redo = 0
            how = f"{u} prompt(s) x {P} + {b} completions x {new} tokens"
        add(U, f"activations: {how}", kept)
        if redo:
            add(U, "one layer recomputed in backward", redo)
        add(U, f"logits: {b} x {new} positions x {s['V']:,}", b * new * s["V"] * LOGIT_BYTES["rl"][a == 4])
        add(U, "vision tower forward (transient)", vision_bytes(s, b if cfg.grad_ckpt else min(b, per_rank),
                                                                image_tokens, a))
        if prompts % world:
            notes.append(f"the stages refuse --prompts_per_step {prompts} on {world} GPUs (not divisible); "
                         f"counted {per_rank} prompt(s) per GPU, i.e. --prompts_per_step {per_rank * world}")
        notes.append(f"{per_rank} prompt(s) x {n} rollouts per GPU; update micro-batch {b} row(s) "
                     f"(--token_budget {cfg.token_budget}); all rollouts run the full {new} tokens")
    if cfg.eval_batch_size and cfg.stage != "sft":
        notes.append(f"evaluation: held-out sampling at --eval_k {cfg.eval_k} takes eval_batch_size // k prompts "
                     "x k samples: the same KV cache as greedy generate")

    # ---- the discriminator (align): weights and AdamW kept, its update a phase of its own
    dp = None
    if cfg.stage == "align":
        dconf, dsource = hf_config(cfg.disc)
        ds = shape(dconf)
        d = build_disc_meta(dconf, cfg)
        dp = disc_params(d, cfg)
        moe = cfg.disc_kind == "moe"
        train = {"full": dp["total"] - dp["vision"], "experts": dp["experts"] + dp["routers"] + dp["head"],
                 "lora": dp["lora"] + dp["routers"] + dp["head"], "head": dp["head"]}[cfg.disc_train]
        fp32_train = cfg.disc_train == "lora"  # peft keeps adapters in fp32; the rest trains in bf16
        frozen = dp["total"] - (0 if fp32_train else train)
        dp["trained"] = train
        D = "D update"
        if fsdp:
            add(K, f"D weights, fp32 shards (1/{world})", 4 * (dp["total"] + (train if fp32_train else 0)) / world)
            add(K, "D AdamW m + v, fp32 shards", 8 * train / world)
            add(D, "D gradients, fp32 shards", 4 * train / world)
            trained = {"full": lambda n: ".visual." not in n, "experts": lambda n: re.search(r"experts|router|value_head", n),
                       "lora": lambda n: re.search(r"router|value_head", n), "head": lambda n: "value_head" in n}
            d_flight = in_flight(shard_units(d, trained[cfg.disc_train]))
        else:
            q4 = dp["linear"] - (dp["experts"] if cfg.disc_train == "experts" else 0) if cfg.disc_4bit else 0
            what = f"nf4 {q4 / 1e9:.2f}B + bf16 rest" if q4 else "bf16"
            add(K, f"D frozen weights ({what})", NF4 * q4 + 2 * (frozen - q4))
            if fp32_train:
                add(K, "D LoRA experts weights + AdamW m + v (fp32)", 12 * dp["lora"])
                add(K, "D routers + value head + AdamW m + v (fp32)", 12 * (train - dp["lora"]))
                g = 4 * train
            else:
                big = cfg.master_fp32
                add(K, f"D trained weights (bf16) + {'fp32 master + AdamW' if big else 'AdamW (bf16)'}",
                    (14 if big else 6) * train)
                g = 2 * train
            add(D, "D gradients" + (" + all-reduce buffer copy" if world > 1 else ""), g * (2 if world > 1 else 1))
        flight_rows(D, "D")
        # score_all: chunk prompts x (teacher + group rollouts) x (caption, reasoning) sequences alive
        seg = min(cfg.max_segment_tokens, new)
        chunk_p = min(cfg.disc_chunk or per_rank, per_rank)
        seqs = chunk_p * (1 + cfg.group_size) * 2
        micro = min(cfg.disc_micro_batch, seqs)
        graph = cfg.disc_train != "head"  # head only: no backward through the backbone
        exp_train = cfg.disc_train in ("full", "experts")
        lora_r = cfg.disc_lora_r if cfg.disc_train == "lora" else 0
        lkw = dict(train=cfg.disc_train == "full", lm_head=False,
                   moe=(cfg.disc_experts, cfg.disc_top_k, exp_train, graph, lora_r) if moe else None)
        masked = cfg.attn == "sdpa"
        if graph:
            kept, _ = forward_bytes(ds, 2, seqs, P + seg, P + seg, cfg.disc_grad_ckpt, masked, **lkw)
            add(D, f"D activations: {seqs} sequences x ({P} + {seg}) tokens"
                + (", checkpointed" if cfg.disc_grad_ckpt else ""), kept)
        one = forward_bytes(ds, 2, micro, P + seg, P + seg, True, masked, **lkw)[1]
        add(D, f"D layer {'recomputed' if graph and cfg.disc_grad_ckpt else 'working set'}: {micro} sequences", one)
        add(D, "D vision tower forward (transient)", vision_bytes(ds, micro, image_tokens))
        notes.append(f"D: {cfg.disc_kind} on {cfg.disc} ({dsource}), trains {cfg.disc_train}"
                     + (", frozen linears in nf4" if cfg.disc_4bit else "") + f"; --disc_chunk {cfg.disc_chunk} "
                     f"-> {chunk_p} prompt(s) x (1 teacher + {cfg.group_size}) x 2 segments of <= {seg} tokens "
                     "alive in D's update, all rollouts format-valid (all scored)")
        if cfg.disc_train != "full":
            notes.append("D options experts / lora / head / --disc_4bit describe a design under way, not "
                         "today's discriminator.py (which trains everything but the vision tower in bf16); "
                         "a 4-bit D keeps its embeddings and norms bf16")

    # ---- totals
    phases = {}
    for phase, _, n_bytes in rows:
        phases[phase] = phases.get(phase, 0.0) + n_bytes
    kept = phases.pop(K)
    worst = max(phases, key=phases.get)
    peak = cfg.overhead_gb * GB + kept + phases[worst]
    train_label = "QLoRA" if cfg.qlora else "LoRA" if cfg.lora else "full fine-tune"
    notes = [
        f"policy: {cfg.model} ({source}), {train_label}" + (f" r={cfg.lora_r}" if adapters else "")
        + ("; vision tower frozen" if pp["full_trainable"] < pp["total"] else "; vision tower trained"),
        f"{'fsdp over ' + str(world) + ' GPUs' if fsdp else 'ddp replicas' if world > 1 else 'one process'}"
        f"; activations and KV cache in {'fp32 (QLoRA: peft upcasts norms and embeddings)' if a == 4 else 'bf16'}"
        f"; attention {cfg.attn}" + (" with a padding mask (K, V repeated per head, mask bias per layer)"
                                     if cfg.attn == "sdpa" else ""),
        f"prompt {P} tokens incl. {image_tokens} image tokens (--max_pixels {cfg.max_pixels}), one image "
        f"per prompt; response {new} tokens",
        ("AdamW m, v fp32 in the sharded fp32 params" if fsdp else "LoRA adapters fp32 (peft), AdamW states fp32"
         if adapters else "full fine-tune keeps fp32 master weights and fp32 AdamW m, v (issue 17; the code "
         "today keeps bf16 states, --master_fp32 false)" if cfg.master_fp32 else "AdamW m, v in bf16, no master "
         "weights (the code today)"),
    ] + notes + [f"overhead {cfg.overhead_gb} GB (CUDA context, workspaces) assumed; GB = 1e9 bytes; "
                 "peak = overhead + kept all run + the largest phase"]
    return {"rows": rows, "kept": kept, "phases": phases, "worst": worst, "peak": peak, "overhead": cfg.overhead_gb * GB,
            "fits": peak <= cfg.gpu_gb * GB, "policy_params": pp, "disc_params": dp, "assumptions": notes,
            "world": world, "gpu_gb": cfg.gpu_gb, "fsdp": fsdp}


# -----------------------------------------------------------------------------------------------
# Printing


def _b(n):
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e4 else f"{n:,}"


def report(est, cfg):
    """The tables and the final `fits:` line as text."""
    pp, dp = est["policy_params"], est["disc_params"]
    how = f"QLoRA r={cfg.lora_r}" if cfg.qlora else f"LoRA r={cfg.lora_r}" if cfg.lora else "full"
    out = ["| parameters (built on meta) | vision tower | merger | language model | embeddings + LM head "
           "| total | trained |", "|---|---|---|---|---|---|---|",
           f"| policy {cfg.model} | {_b(pp['vision tower'])} | {_b(pp['merger'])} | {_b(pp['language model'])} | "
           f"{_b(pp['embeddings + LM head'])}{' (tied)' if pp['tied'] else ''} | {pp['total']:,} | "
           f"{_b(pp['trained'])} ({how}) |"]
    if dp:
        out += ["", f"| D on {cfg.disc} ({cfg.disc_kind}) | vision + merger | experts (or MLPs) | routers "
                "| value head | total | trained |", "|---|---|---|---|---|---|---|",
                f"| {cfg.disc_experts if cfg.disc_kind == 'moe' else 1} experts, top-{cfg.disc_top_k} "
                f"| {_b(dp['vision'])} | {_b(dp['experts'])} | {_b(dp['routers'])} | {dp['head']:,} "
                f"| {dp['total']:,} | {_b(dp['trained'])} ({cfg.disc_train}) |"]
    who = f"per GPU ({est['world']} alike)" if est["world"] > 1 else "GPU 0"
    out += ["", f"| {who} | GB |", "|---|---|", f"| overhead (assumed) | {est['overhead'] / GB:.2f} |"]
    order = ["kept all run"] + list(est["phases"])
    for phase in order:
        total = est["kept"] if phase == "kept all run" else est["phases"][phase]
        mark = " <- largest phase" if phase == est["worst"] else ""
        out.append(f"| **{phase}**{mark} | **{total / GB:.2f}** |")
        out += [f"|   {what} | {n / GB:.2f} |" for p, what, n in est["rows"] if p == phase and n]
    out.append(f"| **peak** = overhead + kept + {est['worst']} | **{est['peak'] / GB:.1f}** |")
    out += [""] + [f"assumption: {x}" for x in est["assumptions"]]
    verdict = "yes" if est["fits"] else "no"
    out.append(f"fits: {verdict} (peak {est['peak'] / GB:.1f} GB of {cfg.gpu_gb:g})")
    return "\n".join(out)


def main(argv=None):
    from common import parse_config
    cfg = parse_config(MemoryConfig, argv)
    if cfg.gpus < 1:
        raise SystemExit("error: --gpus must be at least 1")
    est = estimate(cfg)
    if cfg.json:
        print(json.dumps({**est, "config": dataclasses.asdict(cfg)}, indent=1))
    else:
        print(report(est, cfg))
