"""GPU memory of a stage, computed before you rent the GPU: `python model.py memory ...`.

    python model.py memory --model Qwen3-VL-4B --stage align --gpus 8 --gpu_gb 80 --dist fsdp \\
        --grad_ckpt --disc_chunk 1 --disc_grad_ckpt --disc_micro_batch 4 --token_budget 8192

The real architecture is built on the meta device (no weights, no RAM): transformers' Qwen3-VL
class for the policy, discriminator.Discriminator (the upcycled MoE with its value head) for D, so
the parameter counts are those of the modules the stages train. The rest is arithmetic over the
stages' code paths, one phase at a time (docs/scaling.md explains every line):

  kept all run   weights and AdamW states of every model on the GPU
  evaluation     generate and held-out sampling of eval_batch_size prompts (sft: + the logits of
                 its validation loss); under FSDP the whole policy gathered in bf16 (model.gathered)
  sampling       rollout.sample: the KV cache of one chunk of prompts x group_size rollouts (+ the
                 gathered policy under FSDP)
  D update       align.py's score_all with gradients: D's activations for --disc_chunk prompts,
                 its gradients (and under FSDP its layers in flight)
  policy update  one micro-batch of --token_budget padded tokens: activations, the float32 logits of
  / training     the completion positions (rollout.completion_logprobs; sft: every position),
    step         gradients (and under FSDP the layers in flight)
  peak = overhead + kept all run + the largest phase; it fits when peak <= --gpu_gb x 1e9 bytes.

Activations: bytes per token of one decoder layer, from the tensors autograd keeps (layer_bytes;
tests/test_memory.py checks the formula against the saved tensors of the real layers).
Not counted: allocator fragmentation (a card sold as G GB holds G GiB, 7% more than G x 1e9 bytes:
that is the headroom), --cpu_offload, --kl_coef's reference model, --difficulty_filter's sampling.
Importing this module does no work.
"""
import dataclasses
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch

GB = 1e9

# The three aliases, offline: values of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json.
# 4B: as read in copies of that file in public code; the meta model then has 4,437,815,808
#     parameters, the per-tensor total of the released weights.
# 8B: text and vision as copied from its config.json in public code; 8,767,123,696 on meta (model
#     card: 8.77B).
# 2B: layers, widths, heads and vision as in copies of its config; intermediate_size 6144 (its
#     text model has Qwen3-1.7B's shape) gives 2,127,532,032, the published 2.13B.
# All three: vocabulary 151,936, head_dim 128, rope_theta 5e6, interleaved M-RoPE [24, 20, 20],
# vision patch 16, temporal patch 2, spatial merge 2, 2304 position embeddings.
PUBLIC_CONFIGS = {
    "Qwen3-VL-2B": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096,
                                    num_heads=16, out_hidden_size=2048,
                                    deepstack_visual_indexes=[5, 11, 17]),
                        tie=True),
    "Qwen3-VL-4B": dict(text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096,
                                    num_heads=16, out_hidden_size=2560,
                                    deepstack_visual_indexes=[5, 11, 17]),
                        tie=True),
    "Qwen3-VL-8B": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8),
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304,
                                    num_heads=16, out_hidden_size=4096,
                                    deepstack_visual_indexes=[8, 16, 24]),
                        tie=False),
}
# The paper's response length and prompts per step (REFERENCE section 5; sft: rows per step)
PAPER = {"sft": (8192, 2), "align": (6144, 4), "rlvr": (8192, 32)}
# nf4 with double quantisation (load_model's BitsAndBytesConfig), bytes per parameter: 4 bits, an
# 8-bit absmax per block of 64, an fp32 absmax per 256 of those
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)
# Bytes per logit position and vocabulary entry at the peak of the backward, for a bf16 stream
# (QLoRA's is fp32). rl (completion_logprobs): the bf16 logits, their fp32 copy, the tempered copy
# logsumexp keeps, its fp32 gradient. sft (token_loss_sum): bf16 logits, fp32 copy, log_softmax's
# output, its gradient. val (no grad): bf16 logits, fp32 copy, log_softmax's output.
LOGIT_BYTES = {"rl": (16, 20), "sft": (14, 16), "val": (10, 12)}
SDPA_NOTE = ", padded batches with a mask (K, V repeated per query head, a mask bias per layer)"


@dataclass
class MemoryConfig:
    model: str = "Qwen3-VL-4B"  # Qwen3-VL-2B | -4B | -8B (built in), tiny | small, or a folder
    stage: Literal["sft", "align", "rlvr"] = "rlvr"  # the stage to size
    gpus: int = 1  # GPUs in all, one process each (1 = plain python, no torchrun)
    gpu_gb: float = 80.0  # memory of one GPU in GB (1e9 bytes)
    dist: Literal["auto", "ddp", "fsdp"] = "auto"  # the stages' --dist (auto: fsdp for 1B+ models)
    lora: bool = False  # policy: LoRA adapters on the language model instead of all weights
    qlora: bool = False  # policy: nf4 base weights + LoRA
    lora_r: int = 16  # LoRA rank
    vision: Literal["auto", "frozen", "trained"] = "auto"  # as the stages (auto: pretrained frozen)
    master_fp32: bool = True  # full fine-tune without FSDP: fp32 master weights and AdamW states
    grad_ckpt: bool = False  # policy gradient checkpointing
    attn: Literal["sdpa", "flash_attention_2"] = "sdpa"  # attention kernel
    max_prompt_len: int = 2048  # prompt tokens, image tokens included (paper: 2048)
    max_new_tokens: int = 0  # response tokens (0 = paper: sft 8192, align 6144, rlvr 8192)
    max_pixels: int = 1048576  # pixels of a prompt's one image (32 x 32 pixels per image token)
    prompts_per_step: int = 0  # align / rlvr: prompts per step, all GPUs (0 = paper: 4 / 32)
    group_size: int = 16  # align / rlvr: rollouts per prompt (paper: 16)
    token_budget: int = 32768  # align / rlvr: padded tokens per micro-batch and sampling chunk
    micro_batch_size: int = 32  # sft: rows per forward on one GPU
    eval_batch_size: int = 64  # prompts per evaluation generate call (0 = no evaluation)
    disc: str = "Qwen3-VL-2B"  # align: D's backbone (paper: Qwen3-VL-2B)
    disc_kind: Literal["moe", "dense"] = "moe"  # dense: the ablation without upcycling
    disc_experts: int = 4  # experts per MoE layer (official: 4)
    disc_top_k: int = 2  # experts per token (official: 2)
    disc_train: Literal["full", "experts", "lora", "head"] = "full"  # what D trains (docs/scaling)
    disc_4bit: bool = False  # D's frozen linear layers in nf4 (not with --disc_train full)
    disc_lora_r: int = 16  # rank of the LoRA experts (--disc_train lora)
    disc_chunk: int = 0  # as align.py: prompts whose D graphs are alive at once (0 = all)
    disc_grad_ckpt: bool = False  # as align.py: D gradient checkpointing
    disc_micro_batch: int = 64  # as align.py: sequences per D forward
    max_segment_tokens: int = 512  # as discriminator.py: tokens of a scored segment
    overhead_gb: float = 1.0  # CUDA context, cuBLAS / NCCL workspaces (a typical value)
    json: bool = False  # print the numbers as JSON instead of tables


# -----------------------------------------------------------------------------------------------
# The architecture, on the meta device


def hf_config(name):
    """(Qwen3VLConfig, where its values came from) for a --model or --disc value."""
    from transformers import Qwen3VLConfig

    import model as models
    name = {hub: alias for alias, hub in models.HUB_ALIASES.items()}.get(name, name)
    if name in PUBLIC_CONFIGS:
        c = PUBLIC_CONFIGS[name]
        rope = dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                    mrope_interleaved=True)
        text = dict(vocab_size=151936, head_dim=128, max_position_embeddings=262144,
                    rope_parameters=rope, tie_word_embeddings=c["tie"], **c["text"])
        vision = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                      num_position_embeddings=2304, **c["vision"])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=c["tie"])
        return config, f"{models.HUB_ALIASES[name]} config.json, values built into memory.py"
    path = models.resolve_model(name)  # tiny / small: built once (seconds), then cached
    adapter = os.path.join(path, "adapter_config.json")
    if os.path.exists(adapter):  # one of our LoRA checkpoints: size its base
        return hf_config(json.load(open(adapter))["base_model_name_or_path"])
    if not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"error: no config.json in {path!r}; give a Qwen3-VL alias or a folder")
    return Qwen3VLConfig.from_pretrained(path), os.path.join(path, "config.json")


def build_meta(config):
    """Qwen3VLForConditionalGeneration(config) on the meta device: shapes only, ~0.1 s."""
    from transformers import Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(config)


def parameter_count(name):
    """A --model value's parameter count, from its architecture on meta (no weights read): the
    size --dist auto decides by (model.pick_dist, estimate)."""
    return sum(p.numel() for p in build_meta(hf_config(name)[0]).parameters())


def build_disc_meta(config, cfg):
    """discriminator.Discriminator on the backbone's Qwen3VLModel, on meta: the stages' upcycling
    code itself (every MLP copied into experts, a router each, the value head)."""
    import discriminator
    moe = cfg.disc_kind == "moe"
    dcfg = {"kind": cfg.disc_kind, "routing": "learned", "noise": 0.01, "train_vision": False,
            "n_experts": cfg.disc_experts if moe else 1, "top_k": cfg.disc_top_k if moe else 1,
            "max_segment_tokens": cfg.max_segment_tokens, "backbone": cfg.disc}
    return discriminator.Discriminator(build_meta(config).model, dcfg)


def numel(params):
    return sum(p.numel() for p in params)


def linears(module, keep=lambda name: True):
    return [(n, x) for n, x in module.named_modules() if isinstance(x, torch.nn.Linear) and keep(n)]


def policy_params(m, cfg):
    """The policy's parameters by module, and how many the stage trains or quantises."""
    import model as models
    named = dict(m.named_parameters())  # tied weights once, as the optimizer sees them
    merger = numel(p for n, p in named.items() if re.search(r"\.visual\.(deepstack_)?merger", n))
    visual = numel(p for n, p in named.items() if ".visual." in n)
    embed = numel(p for n, p in named.items() if "embed_tokens" in n or n.startswith("lm_head"))
    total = numel(named.values())
    # LoRA: rank r on every Linear whose name matches the pattern load_model hands to peft
    lora = sum(cfg.lora_r * (x.in_features + x.out_features)
               for _, x in linears(m, lambda n: re.fullmatch(models.LORA_TARGETS, n)))
    # QLoRA: bitsandbytes quantises every Linear but the vision tower's and the LM head
    nf4 = numel(x.weight for _, x in linears(m, lambda n: ".visual." not in n and n != "lm_head"))
    train_vision = cfg.vision == "trained" or (cfg.vision == "auto" and models.random_init(cfg.model))
    return {"vision tower": visual - merger, "merger": merger, "embeddings + LM head": embed,
            "language model": total - visual - embed, "total": total, "lora": lora, "nf4": nf4,
            "full": total - (0 if train_vision else visual), "tied": m.config.tie_word_embeddings,
            "train_vision": train_vision}


def disc_params(d, cfg):
    """D's parameters by role: vision tower (frozen), experts, routers, value head; its language
    model's Linear weights (what a 4-bit D would quantise) and the LoRA experts' size."""
    named = dict(d.named_parameters())

    def pick(key):
        return numel(p for n, p in named.items() if key in n)
    lm = linears(d, lambda n: ".language_model." in n and ".router" not in n)
    experts = [x for n, x in lm if ".experts." in n]
    return {"total": numel(named.values()), "vision": pick(".visual."), "routers": pick(".router."),
            "experts": pick(".experts.") if cfg.disc_kind == "moe" else pick(".mlp."),
            "head": pick("value_head"), "linear": numel(x.weight for _, x in lm),
            "lora": cfg.disc_lora_r * sum(x.in_features + x.out_features for x in experts)}


def in_flight(module, trainable):
    """Bytes of FSDP's gathered units during a training step. model.wrap_distributed makes each
    vision block and decoder layer a unit, the root holds the rest. The root's bf16 weights stay
    gathered from forward to backward, two layers are gathered at once (one prefetched), and each
    trainable parameter of those has a bf16 gradient plus the fp32 copy that is reduce-scattered.
    trainable(name) says whether the stage trains the parameter of that name."""
    units = [n for n, _ in module.named_modules() if re.search(r"(^|\.)(blocks|layers)\.\d+$", n)]
    size = {u: [0, 0] for u in units + [""]}
    for name, p in module.named_parameters():
        unit = next((u for u in units if name.startswith(u + ".")), "")
        size[unit][0] += p.numel()
        size[unit][1] += p.numel() if trainable(name) else 0
    (unit, unit_train), (root, root_train) = max(size[u] for u in units), size[""]
    return 2 * root + 2 * 2 * unit + 6 * (root_train + unit_train)


# -----------------------------------------------------------------------------------------------
# Activations: what autograd keeps per token of one decoder layer


def shape(config):
    t, v = config.text_config, config.vision_config
    return dict(H=t.hidden_size, I=t.intermediate_size, L=t.num_hidden_layers, V=t.vocab_size,
                nh=t.num_attention_heads, nkv=t.num_key_value_heads, d=t.head_dim, Hv=v.hidden_size,
                Iv=v.intermediate_size, px=v.patch_size * v.spatial_merge_size,
                merge=v.spatial_merge_size, deep=len(v.deepstack_visual_indexes))


def layer_bytes(s, a, train=False, lora_r=0, masked=True, moe=None):
    """(bytes per query token, bytes per key) one decoder layer keeps for its backward.

    a: bytes per element of the residual stream: 2 (bf16), 4 under QLoRA (peft upcasts the norms
    and embeddings). train: the layer's own weights train (full fine-tune). lora_r: peft adapters
    on its seven linears. A frozen weight keeps nothing of its input, a trainable one keeps it.
    moe: (experts, top-k, experts train, router trains, LoRA rank of the experts) for D's layers.
    Keys: sdpa keeps K and V; under a padding mask transformers repeats them per query head."""
    H, I, nh, nkv, d = s["H"], s["I"], s["nh"], s["nkv"], s["d"]
    q, kv = nh * d, nkv * d
    per_q = 2 * (4 * H + 4) + (4 * q + 4 * nh) + (4 * kv + 4 * nkv)  # RMSNorms: fp32 input, rsqrt
    per_q += 2 * a * q + 4 * nh  # sdpa: the rotated queries, its output and logsumexp (fp32)
    if train:  # the normalised input of each norm weight (2 x H, q_norm, k_norm), q/k/v's input
        per_q += a * (2 * H + q + kv) + a * H
    if lora_r:  # peft casts each adapter's input to fp32 (no copy when the stream is fp32 already)
        per_q += (4 * H if a == 4 else 4 * (3 * H + q)) + 4 * 4 * lora_r  # q, k, v, o + A's outputs
    if moe is None:
        per_q += 3 * a * I  # the gate output (SiLU's input), SiLU's output, the up output
        per_q += a * H + a * I if train else 0  # gate / up input, down input
        per_q += (4 * H + 4 * I if a == 4 else 4 * (2 * H + I)) + 3 * 4 * lora_r if lora_r else 0
        return per_q, 2 * a * (nh if masked else nkv) * d
    E, k, experts, router, r = moe
    per_q += (a * H if router else 0) + 4 * E + 12 * k  # router input, probs, top-k weights + ids
    # each routed token: gate, SiLU and up outputs, the weighted output index_add_ keeps, the
    # routing weight, the token / slot indices (int64)
    slot = 3 * a * I + a * H + a + 16
    slot += a * H + a * I if experts else 0  # the gathered input, the down input
    slot += a * H if router else 0  # the expert output, kept by the routing-weight multiply
    slot += 4 * (2 * H + I) + 3 * 4 * r if r else 0  # LoRA experts: fp32 input copies, A outputs
    return per_q + k * slot, 2 * a * (nh if masked else nkv) * d


def forward_bytes(s, a, rows, q_len, k_len, ckpt, masked, lm_head=True, **kw):
    """(kept for backward, the layer recomputed in backward) of a forward of rows x q_len query
    tokens over k_len keys. A checkpointed layer keeps only its input (a x H per token) and holds
    its full activations only while it is recomputed. sdpa turns the boolean padding mask into an
    a-byte bias in every layer, kept for backward; flash attention takes no mask."""
    per_q, per_k = layer_bytes(s, a, masked=masked, **kw)
    one = rows * (q_len * per_q + k_len * per_k + (a * q_len * k_len if masked else 0))
    # the final norm (fp32 input, rsqrt; + its normalised input and the LM head's input if trained)
    final = rows * q_len * (4 * s["H"] + 4 + ((1 + lm_head) * a * s["H"] if kw.get("train") else 0))
    if ckpt:
        return rows * q_len * a * s["H"] * s["L"] + final, one
    return one * s["L"] + final, 0


def vision_bytes(s, images, image_tokens, a=2):
    """Working set of the frozen vision tower's forward (no graph): one block over all patches,
    plus the merged image tokens and deepstack features it hands over. A rough upper bound."""
    patches = image_tokens * s["merge"] ** 2
    block = patches * a * (2 * s["Hv"] + max(3 * s["Hv"], s["Iv"]))
    return images * (block + image_tokens * a * s["H"] * (1 + s["deep"]))


# -----------------------------------------------------------------------------------------------
# The phases. Each helper appends (phase, component, bytes) rows through c.add.

KEPT = "kept all run"


def policy_kept(c):
    """Weights and AdamW states of the policy -> its gradients' row for the update phase."""
    cfg, pp, n = c.cfg, c.pp, c.train_n
    if c.fsdp:
        extra = n if c.adapters else 0  # LoRA adapters beside the frozen base
        c.add(KEPT, f"policy weights, fp32 shards (1/{c.world})",
              4 * (pp["total"] + extra) / c.world)
        c.add(KEPT, "policy AdamW m + v, fp32 shards", 8 * n / c.world)
        return "policy gradients, fp32 shards", 4 * n / c.world
    if cfg.qlora:
        rest = pp["total"] - pp["nf4"]
        c.add(KEPT, f"policy base: nf4 {pp['nf4'] / 1e9:.2f}B + fp32 {rest / 1e9:.2f}B (peft "
              "upcast)", NF4 * pp["nf4"] + 4 * rest)
    else:
        c.add(KEPT, "policy weights (bf16)", 2 * pp["total"])
    if c.adapters:
        c.add(KEPT, "policy LoRA weights + AdamW m + v (fp32)", 12 * n)
        return "policy LoRA gradients (fp32)", 4 * n
    master = "fp32 master weights + AdamW m + v" if cfg.master_fp32 else "AdamW m + v (bf16)"
    c.add(KEPT, f"policy {master}", (12 if cfg.master_fp32 else 4) * n)
    return "policy gradients (bf16)", 2 * n


def evaluation(c):
    """Greedy generate and held-out sampling of eval_batch_size prompts; sft's validation loss."""
    cfg, s, e = c.cfg, c.s, "evaluation"
    c.gathered(e)
    c.kv(e, f"{cfg.eval_batch_size} prompt(s) x ({c.P} + {c.new}) tokens", cfg.eval_batch_size)
    c.add(e, "vision tower forward (transient)", vision_bytes(s, cfg.eval_batch_size, c.image, c.a))
    if cfg.stage == "sft":  # sft.evaluate's validation loss takes whole-sequence logits
        c.add(e, f"validation logits: {cfg.eval_batch_size} x {c.P + c.new} positions",
              cfg.eval_batch_size * (c.P + c.new) * s["V"] * LOGIT_BYTES["val"][c.a == 4])


def sft_step(c):
    """One micro-batch of rows of prompt + response tokens, logits at every position."""
    cfg, s, t = c.cfg, c.s, "training step"
    rows, length = cfg.micro_batch_size, c.P + c.new
    c.add(t, *c.grads)
    c.flight(t)
    # one row has no padding: transformers then passes no mask and sdpa reads K, V per KV head
    masked = rows > 1 and cfg.attn == "sdpa"
    kept, redo = forward_bytes(s, c.a, rows, length, length, cfg.grad_ckpt, masked, **c.lkw)
    c.add(t, f"activations: {rows} row(s) x {length} tokens" + c.ckpt_note, kept)
    c.add(t, "one layer recomputed in backward", redo)
    c.add(t, f"logits: {rows} x {length} positions x {s['V']:,}",
          rows * length * s["V"] * LOGIT_BYTES["sft"][c.a == 4])
    c.add(t, "vision tower forward (transient)", vision_bytes(s, rows, c.image, c.a))
    unmasked = "; one row: no mask" if rows == 1 else ""
    c.notes.append(f"sft rows are prompt + response = {c.P} + {c.new} tokens (sft.py --max_len "
                   f"{length}), {rows} per forward (--micro_batch_size{unmasked}); evaluation "
                   f"generates {c.new} tokens (sft.py --max_new_tokens)")


def rl_steps(c):
    """rollout.sample's chunk of prompts, then one micro-batch of the policy update."""
    cfg, s, n = c.cfg, c.s, c.cfg.group_size
    width = c.P + c.new
    # sampling: chunk x group x (prompt + new) <= token_budget, at least one prompt
    chunk = min(c.per_rank, max(1, cfg.token_budget // (n * width)))
    c.gathered("sampling")
    c.kv("sampling", f"{chunk} prompt(s) x {n} rollouts x ({c.P} + {c.new}) tokens", chunk * n)
    prefill = chunk * c.P * c.a * (2 * s["H"] + 3 * s["I"]) + c.a * chunk * c.P ** 2
    c.add("sampling", "prefill working set + one decode step's logits",
          prefill + chunk * n * s["V"] * 18)
    c.add("sampling", "vision tower forward (transient)", vision_bytes(s, chunk, c.image, c.a))
    # the update: micro-batches of token_budget padded tokens (rollout.micro_batches)
    u, rows = "policy update", min(c.per_rank * n, max(1, cfg.token_budget // width))
    c.add(u, *c.grads)
    c.flight(u)
    masked = cfg.attn == "sdpa"
    if cfg.grad_ckpt:  # completion_logprobs under checkpointing: the plain prompt + completion pass
        kept, redo = forward_bytes(s, c.a, rows, width, width, True, masked, **c.lkw)
        how, images = f"{rows} row(s) x {width} tokens, checkpointed", rows
    else:  # the shared prefix: the micro-batch's prompts once, then completions on their keys
        images = min(rows, c.per_rank)
        kept = forward_bytes(s, c.a, images, c.P, c.P, False, masked, **c.lkw)[0]
        kept += forward_bytes(s, c.a, rows, c.new, width, False, masked, **c.lkw)[0]
        how, redo = f"{images} prompt(s) x {c.P} + {rows} completions x {c.new} tokens", 0
    c.add(u, f"activations: {how}", kept)
    c.add(u, "one layer recomputed in backward", redo)
    c.add(u, f"logits: {rows} x {c.new} positions x {s['V']:,}",
          rows * c.new * s["V"] * LOGIT_BYTES["rl"][c.a == 4])
    c.add(u, "vision tower forward (transient)", vision_bytes(s, images, c.image, c.a))
    c.notes.append(f"{c.per_rank} prompt(s) x {n} rollouts per GPU, every rollout runs the full "
                   f"{c.new} tokens; update micro-batches of {rows} row(s) (--token_budget "
                   f"{cfg.token_budget}); held-out sampling (k samples of eval_batch_size // k "
                   "prompts) holds the same KV cache as greedy generate")


def discriminator_rows(c):
    """D (align): weights and AdamW kept all run; gradients, activations and layers in flight in
    its update, which scores --disc_chunk prompts' teacher and rollout segments with gradients."""
    cfg = c.cfg
    config, source = hf_config(cfg.disc)
    ds, d = shape(config), build_disc_meta(config, cfg)
    dp = c.dp = disc_params(d, cfg)
    mode = cfg.disc_train
    train = {"full": dp["total"] - dp["vision"], "head": dp["head"],
             "experts": dp["experts"] + dp["routers"] + dp["head"],
             "lora": dp["lora"] + dp["routers"] + dp["head"]}[mode]
    dp["trained"] = train
    lora = dp["lora"] if mode == "lora" else 0  # peft adapters: new fp32 tensors beside the base
    u = "D update"
    if c.fsdp:
        c.add(KEPT, f"D weights, fp32 shards (1/{c.world})", 4 * (dp["total"] + lora) / c.world)
        c.add(KEPT, "D AdamW m + v, fp32 shards", 8 * train / c.world)
        c.add(u, "D gradients, fp32 shards", 4 * train / c.world)
        trains = {"full": r"^(?!.*\.visual\.)", "experts": r"experts|router|value_head",
                  "lora": r"router|value_head", "head": r"value_head"}[mode]
        c.add(u, "D layers in flight (bf16 gathered + gradients)",
              in_flight(d, lambda name: re.search(trains, name)))
    else:
        frozen = dp["total"] - train + lora
        q4 = (dp["linear"] - (dp["experts"] if mode == "experts" else 0)) if cfg.disc_4bit else 0
        what = f"nf4 {q4 / 1e9:.2f}B + bf16 {(frozen - q4) / 1e9:.2f}B" if q4 else "bf16"
        c.add(KEPT, f"D frozen weights ({what})", NF4 * q4 + 2 * (frozen - q4))
        if mode == "lora":  # adapters, routers and the value head in fp32 with fp32 AdamW states
            c.add(KEPT, "D LoRA experts, routers, value head + AdamW m + v (fp32)", 12 * train)
            grads = 4 * train
        else:
            big = cfg.master_fp32
            states = "fp32 master + AdamW m + v" if big else "AdamW m + v (bf16)"
            c.add(KEPT, f"D trained weights (bf16) + {states}", (14 if big else 6) * train)
            grads = 2 * train
        copy = c.world > 1  # align.py all-reduces D's gradients through one flat buffer
        c.add(u, "D gradients" + (" + all-reduce buffer copy" if copy else ""), grads * (1 + copy))
    # align.score_all: chunk prompts x (teacher + group rollouts) x (caption, reasoning) sequences
    seg = min(cfg.max_segment_tokens, c.new)
    prompts = min(cfg.disc_chunk or c.per_rank, c.per_rank)
    seqs = prompts * (1 + cfg.group_size) * 2
    micro = min(cfg.disc_micro_batch, seqs)
    graph = mode != "head"  # a trained value head alone needs no backward through the backbone
    moe = (cfg.disc_experts, cfg.disc_top_k, mode in ("full", "experts"), graph,
           cfg.disc_lora_r if mode == "lora" else 0) if cfg.disc_kind == "moe" else None
    kw = dict(train=mode == "full", lm_head=False, moe=moe)  # D has no LM head
    tokens, masked = c.P + seg, cfg.attn == "sdpa"  # right-padded micro-batches: a mask
    if graph:
        kept, _ = forward_bytes(ds, 2, seqs, tokens, tokens, cfg.disc_grad_ckpt, masked, **kw)
        ck = ", checkpointed" if cfg.disc_grad_ckpt else ""
        c.add(u, f"D activations: {seqs} sequences x ({c.P} + {seg}) tokens{ck}", kept)
    one = forward_bytes(ds, 2, micro, tokens, tokens, True, masked, **kw)[1]
    label = "recomputed" if graph and cfg.disc_grad_ckpt else "working set"
    c.add(u, f"D layer {label}: {micro} sequences", one)
    c.add(u, "D vision tower forward (transient)", vision_bytes(ds, micro, c.image))
    c.notes.append(f"D: {cfg.disc_kind} on {cfg.disc} ({source}), trains {mode}"
                   + (", frozen linears in nf4" if cfg.disc_4bit else "")
                   + f"; {prompts} prompt(s) x (1 teacher + {cfg.group_size}) x 2 segments of "
                   f"<= {seg} tokens alive in its update (--disc_chunk {cfg.disc_chunk}), every "
                   "rollout format-valid so every one is scored")
    if mode != "full" or cfg.disc_4bit:
        c.notes.append("D's --disc_train experts / lora / head and --disc_4bit size a design in "
                       "progress; today's discriminator.py trains all but the vision tower in "
                       "bf16. "
                       "Assumed: a 4-bit D keeps embeddings and norms in bf16, LoRA experts are "
                       "adapters on each expert's gate / up / down, and routers train with them")


# -----------------------------------------------------------------------------------------------
# The estimate


def estimate(cfg):
    """Everything for cfg -> dict: rows (phase, component, bytes), phase totals, kept, peak, fits,
    parameter counts, assumptions. Settings a stage refuses are one-line SystemExits."""
    world = max(1, cfg.gpus)
    if cfg.dist == "auto":  # as model.pick_dist: shard models of 1B+ parameters under torchrun
        big = parameter_count(cfg.model) >= 1e9
        cfg = dataclasses.replace(cfg, dist="fsdp" if big else "ddp")
    fsdp = cfg.dist == "fsdp" and world > 1  # one GPU runs without torchrun: no wrapper at all
    if cfg.qlora and fsdp:  # as model.wrap_distributed
        raise SystemExit("error: --qlora cannot be combined with --dist fsdp (4-bit weights are "
                         "not sharded); use --lora with fsdp")
    align = cfg.stage == "align"
    if align and cfg.disc_4bit and (cfg.disc_train == "full" or fsdp):
        raise SystemExit("error: --disc_4bit needs --disc_train experts|lora|head, without fsdp")
    if align and cfg.disc_kind == "dense" and cfg.disc_train in ("experts", "lora"):
        raise SystemExit(f"error: --disc_train {cfg.disc_train} needs --disc_kind moe")
    config, source = hf_config(cfg.model)
    s, m = shape(config), build_meta(config)
    pp = policy_params(m, cfg)
    adapters = cfg.lora or cfg.qlora
    new, paper_prompts = PAPER[cfg.stage]
    c = SimpleNamespace(cfg=cfg, s=s, pp=pp, dp=None, world=world, fsdp=fsdp, adapters=adapters,
                        a=4 if cfg.qlora else 2, P=cfg.max_prompt_len,
                        new=cfg.max_new_tokens or new,
                        image=cfg.max_pixels // s["px"] ** 2, rows=[], notes=[],
                        train_n=pp["lora"] if adapters else pp["full"])
    prompts = cfg.prompts_per_step or paper_prompts
    c.per_rank = math.ceil(prompts / world)
    if c.image > c.P:
        raise SystemExit(f"error: {c.image} image tokens (--max_pixels {cfg.max_pixels}) do not "
                         f"fit in --max_prompt_len {c.P}")
    pp["trained"] = c.train_n
    c.add = lambda phase, what, n_bytes: c.rows.append((phase, what, float(n_bytes)))
    c.lkw = dict(train=not adapters, lora_r=cfg.lora_r if adapters else 0)
    c.ckpt_note = ", checkpointed" if cfg.grad_ckpt else ""
    kv_token = s["L"] * 2 * s["nkv"] * s["d"] * c.a  # K and V of every layer
    # + one layer's copy: the cache appends a token by concatenation
    c.kv = lambda phase, what, seqs: c.add(phase, f"KV cache: {what}",
                                           seqs * (c.P + c.new) * kv_token * (1 + 1 / s["L"]))
    c.gathered = lambda phase: c.add(phase, "policy gathered in bf16 (model.gathered)",
                                     2 * pp["total"] if fsdp else 0)

    def trains(name):
        return not adapters and (".visual." not in name or pp["train_vision"])
    flight = in_flight(m, trains) if fsdp else 0
    c.flight = lambda phase: c.add(phase, "policy layers in flight (bf16 gathered + gradients)",
                                   flight)

    c.grads = policy_kept(c)
    if not fsdp and world > 1:  # DDP's gradient buckets, or the RL stages' flat all-reduce buffer
        c.grads = (c.grads[0] + " + all-reduce buffer copy", 2 * c.grads[1])
    if cfg.eval_batch_size:
        evaluation(c)
    if cfg.stage == "sft":
        sft_step(c)
    else:
        rl_steps(c)
        if prompts % world:
            c.notes.append(f"the stages refuse --prompts_per_step {prompts} on {world} GPUs (not "
                           f"divisible): counted {c.per_rank} per GPU, as --prompts_per_step "
                           f"{c.per_rank * world}")
    if align:
        discriminator_rows(c)

    phases = {}
    for phase, _, n_bytes in c.rows:
        phases[phase] = phases.get(phase, 0.0) + n_bytes
    kept = phases.pop(KEPT)
    worst = max(phases, key=phases.get)
    peak = cfg.overhead_gb * GB + kept + phases[worst]
    how = "QLoRA" if cfg.qlora else "LoRA" if cfg.lora else "full fine-tune"
    if fsdp:
        optimizer = "fp32 in FSDP's fp32 shards"
    elif adapters:
        optimizer = "LoRA adapters and their states fp32 (peft)"
    elif cfg.master_fp32:
        optimizer = ("bf16 full fine-tune with fp32 master weights and fp32 m, v (issue 17; the "
                     "code today keeps bf16 m, v and no master: --master_fp32 false)")
    else:
        optimizer = "bf16 m, v and no master weights, as the code today"
    setup = (f"FSDP over {world} GPUs" if fsdp else f"DDP, {world} replicas" if world > 1
             else "1 GPU")
    notes = [
        f"policy: {cfg.model} ({source}), {how}" + (f" r={cfg.lora_r}" if adapters else "")
        + ("; vision tower trained" if pp["train_vision"] else "; vision tower + merger frozen"),
        f"{setup}; activations, logits and KV cache in " + ("fp32 (QLoRA: peft upcasts norms and "
                                                            "embeddings)" if c.a == 4 else "bf16")
        + f"; attention {cfg.attn}" + (SDPA_NOTE if cfg.attn == "sdpa" else ""),
        (f"prompt {c.P} tokens incl. {c.image} image tokens (one image of --max_pixels "
         f"{cfg.max_pixels}); response {c.new} tokens"),
        "optimizer: AdamW, 2 states per trained parameter; " + optimizer,
    ]
    if fsdp:
        notes.append("FSDP in flight: the root unit's bf16 weights (gathered from forward to "
                     "backward), two layers' (one prefetched), and their bf16 gradients + fp32 "
                     "reduce-scatter copies")
    notes += c.notes
    notes.append(f"overhead {cfg.overhead_gb:g} GB (CUDA context, workspaces) assumed; GB = 1e9 "
                 "bytes; peak = overhead + kept all run + the largest phase")
    return {"rows": c.rows, "kept": kept, "phases": phases, "worst": worst, "peak": peak,
            "overhead": cfg.overhead_gb * GB, "fits": peak <= cfg.gpu_gb * GB, "policy_params": pp,
            "disc_params": c.dp, "assumptions": notes, "world": world, "fsdp": fsdp}


# -----------------------------------------------------------------------------------------------
# The check a stage runs before loading anything on a GPU


# What to turn on, in this order, when a run does not fit: each trades time (recomputation, more
# micro-batches) for memory, none changes what is learnt.
FIXES = [("grad_ckpt", True, "--grad_ckpt"), ("micro_batch_size", 1, "--micro_batch_size 1"),
         ("disc_grad_ckpt", True, "--disc_grad_ckpt"), ("disc_chunk", 1, "--disc_chunk 1"),
         ("token_budget", 8192, "--token_budget 8192"),
         ("eval_batch_size", 16, "--eval_batch_size 16")]


def preflight(stage, cfg, world, gpu_gb, log=print):
    """Estimate this run's peak per GPU before loading (estimate(), from the stage's own flags);
    if it does not fit gpu_gb, a one-line error naming the flags that make it fit (or saying
    that none do). Models the estimator cannot build (no config) are not checked."""
    fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    given = {k: v for k, v in vars(cfg).items() if k in fields and k != "stage"}
    if stage == "align" and not str(given.get("disc", "")).startswith("Qwen3-VL"):
        given["disc"] = "Qwen3-VL-2B"  # a warm-up folder: sized as the paper's backbone
    mc = dataclasses.replace(MemoryConfig(), stage=stage, gpus=world, gpu_gb=gpu_gb, **given)
    # the prompt-length filter drops prompts over --max_prompt_len, so no image in a run is larger
    # than the prompt budget minus some text (32 x 32 pixels per image token)
    mc = dataclasses.replace(mc, max_pixels=min(mc.max_pixels, (mc.max_prompt_len - 256) * 1024))
    try:
        est = estimate(mc)
    except (SystemExit, OSError, ValueError) as e:
        log(f"memory check skipped: {e}")
        return
    if est["fits"]:
        log(f"memory check: peak {est['peak'] / GB:.1f} GB of {gpu_gb:g} per GPU")
        return
    need, fixed = [], mc
    for name, value, flag in FIXES:
        if getattr(fixed, name) == value or name not in vars(cfg):  # set already, or not a flag
            continue
        fixed = dataclasses.replace(fixed, **{name: value})
        need.append(flag)
        if estimate(fixed)["fits"]:
            raise SystemExit(f"error: this {stage} run needs ~{est['peak'] / GB:.0f} GB per GPU "
                             f"of {gpu_gb:g} (python model.py memory ...); add {' '.join(need)} "
                             f"(then ~{estimate(fixed)['peak'] / GB:.0f} GB)")
    raise SystemExit(f"error: this {stage} run needs ~{est['peak'] / GB:.0f} GB per GPU of "
                     f"{gpu_gb:g} even with {' '.join(need)}: use more GPUs, --lora, or shorter "
                     "--max_new_tokens (python model.py memory ... shows where it goes)")


# -----------------------------------------------------------------------------------------------
# Printing


def report(est, cfg):
    """The parameter tables, the memory table of one GPU, the assumptions, the `fits:` line."""
    pp, dp = est["policy_params"], est["disc_params"]
    how = f"QLoRA r={cfg.lora_r}" if cfg.qlora else f"LoRA r={cfg.lora_r}" if cfg.lora else "full"
    out = [f"| policy {cfg.model} (built on meta) | parameters |", "|---|---|"]
    out += [f"| {k} | {pp[k]:,} |" for k in ("vision tower", "merger", "language model")]
    tied = " (tied)" if pp["tied"] else ""
    out += [f"| embeddings + LM head{tied} | {pp['embeddings + LM head']:,} |",
            f"| total | {pp['total']:,} |", f"| trained ({how}) | {pp['trained']:,} |"]
    if dp:
        moe = cfg.disc_kind == "moe"
        kind = f"{cfg.disc_experts} experts, top-{cfg.disc_top_k}" if moe else "dense"
        out += ["", f"| D on {cfg.disc}, {kind} (built on meta) | parameters |", "|---|---|",
                f"| vision tower + merger | {dp['vision']:,} |", f"| experts | {dp['experts']:,} |",
                f"| routers | {dp['routers']:,} |", f"| value head | {dp['head']:,} |",
                f"| total | {dp['total']:,} |",
                f"| trained ({cfg.disc_train}) | {dp['trained']:,} |"]
    who = f"per GPU ({est['world']} alike)" if est["world"] > 1 else "GPU 0"
    out += ["", f"| {who} | GB |", "|---|---|",
            f"| overhead (assumed) | {est['overhead'] / GB:.2f} |"]
    for phase in [KEPT] + list(est["phases"]):
        total = est["kept"] if phase == KEPT else est["phases"][phase]
        mark = " (largest phase)" if phase == est["worst"] else ""
        out.append(f"| **{phase}**{mark} | **{total / GB:.2f}** |")
        out += [f"|   {what} | {n / GB:.2f} |" for p, what, n in est["rows"] if p == phase and n]
    out.append(f"| **peak** = overhead + kept all run + {est['worst']} | "
               f"**{est['peak'] / GB:.1f}** |")
    # assumptions wrapped at 100 characters, continuation lines indented
    out += [""] + [textwrap.fill(f"assumption: {x}", 100, subsequent_indent="  ")
                   for x in est["assumptions"]]
    out.append(f"fits: {'yes' if est['fits'] else 'no'} (peak {est['peak'] / GB:.1f} GB of "
               f"{cfg.gpu_gb:g})")
    return "\n".join(out)


def main(argv=None):
    from common import parse_config
    cfg = parse_config(MemoryConfig, argv)
    if cfg.gpus < 1 or cfg.gpu_gb <= 0:
        raise SystemExit("error: --gpus must be at least 1 and --gpu_gb positive")
    est = estimate(cfg)
    if cfg.json:
        print(json.dumps({**est, "config": dataclasses.asdict(cfg)}, indent=1))
    else:
        print(report(est, cfg))
