"""The PRISM discriminator D: a vision-language model upcycled into a Mixture-of-Experts with a scalar
value head, scoring how teacher-like one segment of an answer is; plus its warm-up stage.

What D computes (REFERENCE.md section 3), one score per (image, prompt, segment):
    tokens = chat prompt (system + user turn with the image) + the segment's text, right-padded
    h      = backbone(tokens): final hidden states after the final norm                  (B, T, H)
    score  = value_head(h at the last valid token); NaN/Inf -> 0; clamped to [-10, 10]    (B,)
A response is scored twice: its perception segment "<caption>...</caption>" (which="cap") and its
reasoning segment "<think>...</think><answer>...</answer>" (which="cot").

Sparse upcycling (kind="moe", official; arXiv 2212.05055): every decoder layer's MLP becomes E experts
(default 4), each a copy of the dense MLP plus N(0, noise^2) noise (0.01) so they can drift apart,
behind a router Linear(H, E) initialised N(0, 0.02). Each token goes to its top-k experts (k=2),
weighted by the router softmax renormalised over those k. The Switch-Transformer load-balancing loss
(arXiv 2101.03961) keeps the router from collapsing onto one expert:
    aux = E * sum_e f_e * P_e,  f_e = share of the valid tokens' k routing slots that went to e,
                                P_e = mean router probability of e over the valid (non-pad) tokens
It is 1.0 whenever P is uniform, E / k when collapsed; averaged over layers (depth-independent).
Ablations (paper): kind="dense" (no upcycling) and kind="text-only" (MoE, but the image is never
shown: no image tokens, no pixels; the paper's "parrot alignment").

Routing. The paper speaks of dedicated perception and reasoning experts; the official code has one
learned router over all experts for every token. routing="learned" (DEFAULT) is the official code,
which produced the paper's numbers. routing="segment" takes the paper's wording literally: tokens of
a scored caption may only pick among the perception experts (the first E/2), tokens of a reasoning
segment only among the reasoning experts (the last E/2); prompt tokens route freely over all E.

Warm-up (`python discriminator.py warmup`), before alignment: Bradley-Terry on (teacher, student)
pairs, one caption pair and one reasoning pair per prompt:
    loss = -log sigmoid(t_cap - s_cap) - log sigmoid(t_cot - s_cot) + 0.01 * aux
           + 0.001 * mean(t_cap^2 + s_cap^2 + t_cot^2 + s_cot^2) / 4                   (batch means)
Pairs come from --pairs (official JSONL), or are built by sampling one answer per alignment prompt
from the SFT policy (format-invalid answers skipped and counted) and written to
out_dir/warmup_pairs.jsonl in the official format. AdamW, 10% linear warm-up, cosine, clip 1.0.

Deviations from the paper / official code, all deliberate:
  - Default backbone: the embedded `tiny` base, pretrained to see the shapes world (pretrain.py),
    the policy's own starting point, as the paper upcycles D from a pretrained Qwen3-VL-2B of the
    policy's family. lr 1e-3 (paper: 1e-5 for a 2B model). `--backbone tiny-random` is the old
    random-init D (docs/results.md: it cannot see; the grounding probe below stays at chance).
  - What the official code trains (XIAO4579/PRISM): the warm-up (moe/train_moe_vl_warmup*.py)
    optimises every parameter of D, vision tower included (AdamW over model.parameters(), nothing
    frozen); in alignment D is verl's critic, and scripts/train/experiment/qwen3_vl_prism.sh sets
    no critic.model.freeze_vision_tower (default false in verl/verl/workers/fsdp_workers.py), so D
    stays fully trainable. The same holds for the policy (actor.freeze_vision_tower unset in the
    alignment and the *_after_prism.sh RL scripts): only SFT freezes the tower. Ours: `--vision
    trained` trains D's tower as the official code does; `auto` (default) trains it only for a
    random-init backbone. We keep the pretrained tower frozen: at our lr (1e-3, 100x the
    official) training it lowered the grounding probe from 0.825 to 0.695 (docs/results.md).
  - `--hard_negatives R` (ours; official: 0) adds R extra pairs per training pair whose student is
    the teacher's answer with one object misperceived (hard_negative_pairs): style-matched, so only
    the image tells them apart. At the end, the grounding probe (evaluate.grounding_probe) on
    `--probe_data` is printed and logged.
  - We keep the backbone's Qwen3VLModel and drop its LM head: D never predicts tokens. The value
    head is fp32, weight N(0, 1/(H+1)), bias 0.
  - The warm-up adds the alignment loss's score regulariser (0.001 * mean score^2; official warm-up:
    none). Without it, 3 epochs at lr 1e-3 pushed most scores onto the +10 clamp, where a tied pair
    has zero gradient: held-out acc_cap/acc_cot 0.53/0.37, with it 0.84/0.74 (--score_reg 0 = off).
  - Over-long segments keep their first max_segment_tokens tokens; the prompt (and so its image
    tokens) is never cut.
  - The MoE layers read a token mask set on them just before each forward, so D offers no gradient
    checkpointing (a recomputing backward would read a later forward's mask).
  - Warm-up is single-process (no torchrun). acc/gap skip pairs whose two segments are the same string (no signal, exactly zero
    gradient); their share is logged as same_cap / same_cot.

Commands:
  CPU, tiny backbone, pairs sampled from the SFT policy (3 epochs: about 2 min alone, 3.5 min shared):
      python discriminator.py warmup --policy runs/sft/final --out_dir runs/disc_warmup --epochs 3
  official pairs file, real backbone, one GPU:
      python discriminator.py warmup --pairs warmup.jsonl --backbone Qwen3-VL-2B --lr 1e-5 --batch_size 4 --grad_ckpt
In code: build, score, save, load, param_groups (used by align.py).
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import common
import data
import model as models
import rl_losses
from sft import lr_at

KINDS = ("moe", "dense", "text-only")
ROUTINGS = ("learned", "segment")
SCORE_CLIP = 10.0  # REFERENCE 5: score clip 10


# ----------------------------------------------------------------------------- the MoE layer
def load_balancing_loss(probs, chosen, n_experts):
    """Switch-Transformer auxiliary loss (arXiv 2101.03961) -> (aux scalar, load (E,)).

    probs (N, E): router softmax of N valid tokens; chosen (N, k): the experts each token picked.
    aux = E * sum_e f_e * P_e with f_e = share of the N*k routing slots that went to e (sums to 1)
    and P_e = mean probability of e. Only P carries gradient (the top-k choice is discrete)."""
    counts = F.one_hot(chosen, n_experts).sum(1).float()  # (N, E): 1 where e is among the token's top-k
    load = counts.mean(0) / chosen.shape[-1]  # (E,)
    return n_experts * (load * probs.mean(0)).sum(), load.detach()


class MoEMLP(nn.Module):
    """E copies of a dense MLP behind a top-k router (sparse upcycling, arXiv 2212.05055).

    Before each forward the Discriminator sets `allowed` (B, T, E) bool or None, the experts each
    token may pick (segment routing). After it, `probs` (B*T, E) and `chosen` (B, T, k) describe the
    routing just done; balance(mask) turns them into the load-balancing loss and the load. Nothing
    else is read from outside the forward, so gradient checkpointing may recompute it later (the
    recomputation overwrites probs/chosen, which were used by then)."""

    def __init__(self, dense, n_experts, top_k, noise):
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(n_experts))
        with torch.no_grad():  # the noise breaks the symmetry: identical experts would stay identical
            for p in self.experts.parameters():
                p.add_(torch.randn_like(p) * noise)
        weight = dense.gate_proj.weight
        self.router = nn.Linear(weight.shape[1], n_experts, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.router.weight, std=0.02)
        self.top_k = top_k
        self.allowed = self.probs = self.chosen = None

    def forward(self, x):  # (B, T, H)
        B, T, H = x.shape
        E = len(self.experts)
        flat = x.reshape(-1, H)  # (N, H), N = B*T
        logits = self.router(flat).float()  # (N, E): routing in fp32 even under bf16
        probs = logits.softmax(-1)  # (N, E)
        if self.allowed is not None:  # segment routing: a forbidden expert can never be in the top-k
            logits = logits.masked_fill(~self.allowed.reshape(-1, E), float("-inf"))
        top, chosen = logits.topk(self.top_k, dim=-1)  # (N, k)
        weights = top.softmax(-1).to(x.dtype)  # (N, k): softmax over the k logits = renormalised probs
        out = torch.zeros_like(flat)  # (N, H)
        # One expert at a time over the tokens that chose it: slow but plain. No `if empty: skip`,
        # so every expert is in the graph every step (DDP would otherwise report unused parameters).
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # tokens that picked e, and in which slot
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        self.probs, self.chosen = probs, chosen.reshape(B, T, -1).detach()
        return out.reshape(B, T, H)

    def balance(self, token_mask=None):
        """(aux, load (E,)) of the last forward over the tokens of token_mask (B, T) bool (the non-pad
        ones; None = all): load_balancing_loss, with gradient through the router."""
        valid = token_mask.reshape(-1) if token_mask is not None else slice(None)
        return load_balancing_loss(self.probs[valid], self.chosen.reshape(-1, self.top_k)[valid], len(self.experts))


def upcycle(language_model, n_experts, top_k, noise):
    """Replace every decoder layer's MLP by an MoEMLP made from it (in place)."""
    for layer in language_model.layers:
        layer.mlp = MoEMLP(layer.mlp, n_experts, top_k, noise)


# ----------------------------------------------------------------------------- the discriminator
class Discriminator(nn.Module):
    """backbone (a Qwen3VLModel: vision tower + language model, no LM head) + value head + settings.

    cfg: kind, n_experts, top_k, noise, routing, max_segment_tokens, train_vision, backbone (name)."""

    def __init__(self, backbone, cfg):
        super().__init__()
        if cfg["kind"] not in KINDS or cfg["routing"] not in ROUTINGS:
            raise ValueError(f"kind must be one of {KINDS} and routing one of {ROUTINGS}")
        if cfg["routing"] == "segment" and (cfg["kind"] == "dense" or cfg["n_experts"] % 2 or cfg["top_k"] > cfg["n_experts"] // 2):
            raise ValueError("segment routing needs an MoE kind, an even number of experts and top_k <= experts / 2")
        self.backbone, self.cfg = backbone, dict(cfg)
        if cfg["kind"] != "dense":
            upcycle(backbone.language_model, cfg["n_experts"], cfg["top_k"], cfg["noise"])
        hidden = backbone.config.text_config.hidden_size
        device = backbone.language_model.norm.weight.device
        self.value_head = nn.Linear(hidden, 1, device=device)  # fp32 whatever the backbone's dtype
        nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.stats = {}  # what the last score() call saw: router load, truncated segments

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoEMLP)]

    def forward(self, batch, which=None):
        """batch: encode()'s dict. -> (scores (B,) guarded, aux scalar). which: "cap" | "cot"."""
        mask = batch["attention_mask"].bool()  # (B, T)
        allowed = None
        if self.cfg["routing"] == "segment":
            if which not in ("cap", "cot"):
                raise ValueError(f"segment routing needs which='cap' or 'cot', got {which!r}")
            E, T = self.cfg["n_experts"], mask.shape[1]
            in_segment = torch.arange(T, device=mask.device)[None] >= batch["segment_start"][:, None]  # (B, T)
            group = torch.arange(E, device=mask.device) < E // 2  # (E,): the perception experts
            group = group if which == "cap" else ~group
            allowed = torch.where(in_segment[..., None], group, True)  # (B, T, E); prompt tokens: all
        for m in self.moe_layers():
            m.allowed = allowed
        inputs = {k: v for k, v in batch.items() if k != "segment_start"}
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H), after the final norm
        # The last 1 in the mask, not sum-1: right for any padding side, and padding never moves it.
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
        final = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        raw = self.value_head(final.float()).squeeze(-1)  # (B,) in fp32 (the head's own dtype)
        moes = self.moe_layers()
        balance = [m.balance(mask) for m in moes]  # (aux, load) per layer, over non-pad tokens
        self.loads = [load for _, load in balance]  # score() reports their mean
        aux = torch.stack([a for a, _ in balance]).mean() if moes else raw.new_zeros(())
        self.nonfinite = (~torch.isfinite(raw.detach())).sum()  # guard() hides them; score() counts them
        return guard(raw), aux


def guard(scores):
    """REFERENCE 3: NaN/Inf -> 0, then clamp to [-SCORE_CLIP, SCORE_CLIP] (gradient flows inside)."""
    return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores)).clamp(-SCORE_CLIP, SCORE_CLIP)


def build(backbone="tiny", device=None, *, kind="moe", n_experts=4, top_k=2, noise=0.01,
          routing="learned", vision="auto", max_segment_tokens=512, dtype="auto", attn="sdpa", seed=0):
    """A fresh discriminator from a VLM backbone -> (disc, processor). Any name models.load_model
    accepts; vision "auto" trains the tower of the random-init embedded models only (as sft.py)."""
    device = device or torch.device("cpu")
    train_vision = vision == "trained" or (vision == "auto" and models.random_init(backbone))
    train_vision = train_vision and kind != "text-only"  # text-only never runs the tower
    vlm, processor, _ = models.load_model(backbone, device, dtype=dtype, attn=attn, train_vision=train_vision, seed=seed)
    dense = kind == "dense"
    cfg = {"kind": kind, "n_experts": 1 if dense else n_experts, "top_k": 1 if dense else top_k, "noise": noise,
           "routing": routing, "max_segment_tokens": max_segment_tokens, "train_vision": train_vision,
           "backbone": backbone}
    # expert noise, routers and the value head from `seed`: the same on every rank, and the caller's
    # RNG stream (seeded per rank, for sampling) is left where it was
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Discriminator(vlm.model, cfg), processor


def gradient_checkpointing(disc):
    """Recompute each decoder layer and vision block in backward instead of keeping its activations
    (README, Scaling: ~35x less activation memory per token, for one more forward). Segment routing
    hands each forward its expert mask from outside the layer's inputs, which a recomputation could
    find changed by a later forward, so it is refused there."""
    if disc.cfg["routing"] == "segment":
        raise SystemExit("error: discriminator gradient checkpointing does not support --routing segment")
    disc.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(disc, weight_decay=0.01):
    """AdamW groups over every trainable parameter (backbone unless frozen vision, routers, head):
    weight decay on matrices only, none on norms and biases (as sft.py)."""
    params = [p for p in disc.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def save(disc, processor, path, info=None):
    """Atomically write path/: model.safetensors (the whole state dict), disc_config.json (our
    settings), backbone_config.json (the HF config, so load() needs no backbone folder), the
    tokenizer and image processor, and run.json when info is given. Every rank calls it (under
    FSDP the shards are gathered first); rank 0 writes."""
    from safetensors.torch import save_file
    disc = models.unwrap(disc)
    state = models.full_state_dict(disc)  # None unless sharded
    if common.get_rank() != 0:
        return
    state = disc.state_dict() if state is None else state

    def write(tmp):
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "disc_config.json"), "w") as f:
            json.dump(disc.cfg, f, indent=2)
        disc.backbone.config.to_json_file(os.path.join(tmp, "backbone_config.json"))
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        if info is not None:
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump(info, f, indent=2)
    common.write_dir_atomic(path, write)


def load(path, device=None, dtype="auto", attn="sdpa"):
    """save()'s folder -> (disc, processor): the architecture from the two configs (random init),
    then the safetensors weights (no pickle)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel
    device = device or torch.device("cpu")
    if not os.path.exists(os.path.join(path, "disc_config.json")):
        raise SystemExit(f"error: {path} is not a discriminator folder (no disc_config.json)")
    with open(os.path.join(path, "disc_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "backbone_config.json")) as f:
        config = AutoConfig.for_model(**json.load(f))
    backbone = AutoModel.from_config(config, attn_implementation=attn, dtype=models.pick_dtype(device, dtype))
    disc = Discriminator(backbone.to(device), cfg)
    disc.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(device)))
    if not cfg["train_vision"]:
        disc.backbone.visual.requires_grad_(False)
    return disc, models.load_processor(path)


# ----------------------------------------------------------------------------- scoring
def _without_images(row):
    """The prompt as a text-only discriminator sees it: no image placeholders, no images."""
    return {"messages": [{**m, "content": m["content"].replace("<image>\n", "").replace("<image>", "")}
                         for m in row["messages"]], "images": []}


def encode(processor, prompts, segments, text_only=False, max_segment_tokens=512):
    """Prompt rows (data.load_prompts) + segment strings -> (batch dict, number of truncated segments).

    One processor call for the prompts (it expands each image into its <|image_pad|> tokens), one
    tokenizer call for the segments, then each row = its prompt tokens + its segment tokens,
    right-padded. Tokenising the segment on its own is exactly how the policy produced it (tokens
    after the prompt), and only segment tokens are ever cut, never image tokens."""
    from PIL import Image
    tok = processor.tokenizer
    rows = [_without_images(r) if text_only else r for r in prompts]
    texts = [tok.apply_chat_template(data.chat_messages(r["messages"]), tokenize=False, add_generation_prompt=True)
             for r in rows]
    # rows may hold already-opened PIL images: a caller scoring many rollouts of one prompt opens it once
    images = [x if isinstance(x, Image.Image) else data.open_image(x) for r in rows for x in r["images"]]
    enc = processor(text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt")
    seg_ids = tok(list(segments), add_special_tokens=False)["input_ids"]
    truncated = sum(len(s) > max_segment_tokens for s in seg_ids)
    seg_ids = [s[:max_segment_tokens] for s in seg_ids]
    prompt_len = enc["attention_mask"].sum(-1)  # (B,)
    B, T = len(rows), max(int(n) + len(s) for n, s in zip(prompt_len, seg_ids))
    # built on the CPU beside the processor's output; score() moves each micro-batch to the model
    cpu = dict(dtype=torch.long, device="cpu")
    batch = {"input_ids": torch.full((B, T), tok.pad_token_id, **cpu),  # (B, T)
             "attention_mask": torch.zeros((B, T), **cpu),  # (B, T)
             "mm_token_type_ids": torch.zeros((B, T), **cpu)}  # (B, T): 0 = text, as segments are
    for i, (n, s) in enumerate(zip(prompt_len.tolist(), seg_ids)):
        batch["input_ids"][i, :n] = enc["input_ids"][i, :n]
        batch["input_ids"][i, n:n + len(s)] = torch.tensor(s, **cpu)
        batch["attention_mask"][i, :n + len(s)] = 1
        if "mm_token_type_ids" in enc:  # M-RoPE needs it beside pixel_values (MEASURED.md)
            batch["mm_token_type_ids"][i, :n] = enc["mm_token_type_ids"][i, :n]
    for k in ("pixel_values", "image_grid_thw"):
        if k in enc:
            batch[k] = enc[k]
    batch["segment_start"] = prompt_len  # (B,): where each row's segment begins (segment routing)
    return batch, truncated


def score(disc, processor, prompts, segments, which, micro_batch=16):
    """Score segments -> (scores (B,), aux scalar). Gradients flow; wrap in torch.no_grad() to only score.

    prompts: rows with "messages" and "images" (data.load_prompts, or pair_prompt(pair)); segments:
    the matching strings; which: "cap" or "cot" (used by segment routing). aux is the mean MoE load-
    balancing loss over the micro-batches (0 for dense). disc.stats afterwards holds the router load
    per expert (E,), the number of segments cut at max_segment_tokens and of NaN/Inf raw scores."""
    if which not in ("cap", "cot"):
        raise ValueError(f"which must be 'cap' or 'cot', got {which!r}")
    if len(prompts) != len(segments) or not prompts:
        raise ValueError(f"need as many segments as prompts, at least one: got {len(prompts)} and {len(segments)}")
    inner = models.unwrap(disc)  # under DDP the forward goes through the wrapper (gradient sync), the rest not
    device = models.input_device(disc)
    scores, auxes, loads, truncated, nonfinite = [], [], [], 0, 0
    # under FSDP all ranks run as many forwards (each is a collective): padding copies of the first
    # micro-batch join the graph with weight 0 (models.even_split)
    pieces, real = models.even_split(list(range(0, len(prompts), micro_batch)))
    for i, keep in zip(pieces, real):
        batch, cut = encode(processor, prompts[i:i + micro_batch], segments[i:i + micro_batch],
                            inner.cfg["kind"] == "text-only", inner.cfg["max_segment_tokens"])
        s, aux = disc({k: v.to(device) for k, v in batch.items()}, which)
        if not keep:
            auxes[0] = auxes[0] + 0 * (s.sum() + aux)
            continue
        scores.append(s)
        auxes.append(aux)
        loads += inner.loads
        truncated += cut
        nonfinite += inner.nonfinite
    inner.stats = {"load": torch.stack(loads).mean(0).tolist() if loads else [1.0], "truncated": truncated,
                   "nonfinite": int(nonfinite)}  # raw scores that were NaN/Inf (guard() set them to 0)
    return torch.cat(scores), torch.stack(auxes).mean()


def pair_prompt(pair):
    """A warm-up pair (data.load_pairs) -> the prompt row its segments answer."""
    return {"messages": [{"role": "system", "content": data.SYSTEM_PROMPT},
                         {"role": "user", "content": "<image>\n" + pair["prompt"]}], "images": [pair["image"]]}


# ----------------------------------------------------------------------------- warm-up
@dataclass
class WarmupConfig:
    backbone: str = "tiny"  # discriminator backbone: tiny | small | Qwen3-VL-2B (paper) | hub id | local folder
    kind: Literal["moe", "dense", "text-only"] = "moe"  # moe = official; dense and text-only are the paper's ablations
    routing: Literal["learned", "segment"] = "learned"  # learned = official code (one router, all experts); segment = paper wording
    experts: int = 4  # experts per MoE layer (official: 4)
    top_k: int = 2  # experts per token (official: 2)
    noise: float = 0.01  # std of the noise added to each expert copy (official: 0.01)
    max_segment_tokens: int = 512  # segments longer than this keep their first tokens (counted)
    vision: Literal["auto", "frozen", "trained"] = "auto"  # auto trains the tower of the random-init embedded backbones only
    pairs: str = ""  # warm-up pairs JSONL in the official format; empty = build them by sampling --policy on --prompts
    pairs_base: str = ""  # folder the pairs' image paths are relative to (empty = the pairs file's folder)
    prompts: str = "data/tiny/align_prompts.parquet"  # alignment prompts with teacher references (to build pairs)
    policy: str = "runs/sft/final"  # the SFT policy that plays the student (to build pairs)
    max_prompts: int = 0  # build pairs from the first this many prompts only (0 = all)
    max_new_tokens: int = 128  # student answer budget when sampling
    gen_batch_size: int = 64  # prompts per generate call
    out_dir: str = "runs/disc_warmup"  # warmup_pairs.jsonl, metrics.jsonl, final/
    seed: int = 0  # seed for sampling, initialisation and pair order
    epochs: int = 1  # passes over the training pairs when --steps is 0 (paper: 1)
    steps: int = 0  # optimizer steps (0 = --epochs passes over the pairs)
    batch_size: int = 8  # pairs per optimizer step
    lr: float = 1e-3  # peak learning rate (random tiny backbone; paper with Qwen3-VL-2B: 1e-5)
    min_lr_frac: float = 0.0  # cosine decays to lr * min_lr_frac
    warmup_frac: float = 0.1  # fraction of steps with linear warm-up (paper: 0.1)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm (paper: 1.0; 0 = off)
    aux_coef: float = 0.01  # weight of the MoE load-balancing loss (official: 0.01)
    score_reg: float = 0.001  # weight of mean(score^2), as in the alignment loss (official warm-up: none)
    val_pairs: int = 64  # pairs held out and scored at the end (0 = none)
    hard_negatives: float = 0.0  # extra pairs per pair: teacher vs itself, one object off (0: official)
    probe_data: str = "auto"  # grounding probe at the end (auto: test.parquet by --prompts; "": off)
    micro_batch: int = 16  # sequences per forward when scoring held-out pairs
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on capable GPUs, else fp32
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    grad_ckpt: bool = False  # gradient checkpointing (real backbones: README, Scaling)


def build_pairs(cfg, device, log):
    """Sample one student answer per prompt from the policy and pair it with the teacher reference.
    Writes out_dir/warmup_pairs.jsonl (official format, image paths relative to out_dir) and returns
    its path. Format-invalid student answers cannot be split into segments: skipped and counted."""
    rows = data.load_prompts(cfg.prompts, require_teacher=True, skip_bad_rows=cfg.skip_bad_rows, log=log)
    rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
    policy, policy_processor, _ = models.load_model(cfg.policy, device, dtype=cfg.dtype, attn=cfg.attn, seed=cfg.seed)
    t0 = time.time()
    answers = models.generate(policy, policy_processor, rows, cfg.max_new_tokens, cfg.gen_batch_size,
                              do_sample=True, temperature=1.0)  # paper: temperature 1.0, on-policy samples
    del policy
    path = os.path.join(cfg.out_dir, "warmup_pairs.jsonl")
    image_dir = os.path.join(cfg.out_dir, "pair_images")
    pairs, invalid = [], 0
    for i, (row, answer) in enumerate(zip(rows, answers)):
        caption, cot = data.split_segments(answer)
        if caption is None or len(row["images"]) != 1:  # a pair holds exactly one image
            invalid += 1
            continue
        image = row["images"][0]
        if isinstance(image, bytes):  # an embedded image gets a file: the pairs format holds a path
            os.makedirs(image_dir, exist_ok=True)
            data.open_image(image).save(os.path.join(image_dir, f"{i:06d}.png"))
            image = os.path.join(image_dir, f"{i:06d}.png")
        question = next(m["content"] for m in row["messages"] if m["role"] == "user").replace("<image>", "").strip()
        pairs.append({"prompt": question, "image": os.path.relpath(image, cfg.out_dir),
                      "teacher_caption": row["teacher_caption"], "teacher_cot": row["teacher_cot"],
                      "student_caption": caption, "student_cot": cot})
    log(f"pairs: sampled {len(rows)} student answers in {time.time() - t0:.1f}s, {invalid} skipped (invalid format or not one image), "
        f"{len(pairs)} pairs -> {path}")
    if not pairs:
        raise SystemExit(f"error: none of the {len(rows)} student answers from {cfg.policy} has a valid format; "
                         "warm up from an SFT policy (or pass --pairs)")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return path


def hard_negative_pairs(prompts_path, n, seed=0):
    """n warm-up pairs whose student is the teacher's own answer with ONE object misperceived
    (missed, doubled, wrong colour or shape): the caption's objects line changed, and the steps
    redone consistently on that perception (task.misperceive). Same style both sides, so only
    content tells them apart: what the sampled pairs alone did not teach (docs/results.md, probe).
    Needs prompts with scenes (extra_info.scene, as task.py writes); rows cycle when n > rows."""
    import evaluate
    import task
    rows = data.load_prompts(prompts_path, require_teacher=True, log=lambda *a: None)
    rows = [r for r in rows if r["extra_info"].get("scene") and len(r["images"]) == 1]
    records = evaluate.task_records(prompts_path, rows)
    rng = random.Random(f"nanoprism/hard-negatives/{seed}")
    out = []
    for k in range(n if rows else 0):
        row, record = rows[k % len(rows)], records[k % len(rows)]
        objects = json.loads(row["extra_info"]["scene"])["objects"]
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        if record is not None:  # perception and reasoning follow the same mistake
            seen, steps, answer = task.misperceive(objects, record, rng)
            cot = task.split_response(task.format_response([], steps, answer))[1]
        else:  # no question params: the caption alone is wrong, the reasoning pair ties
            seen, cot = rng.choice(task._misperceptions(objects)), row["teacher_cot"]
        caption = evaluate.misperceived_caption(row["teacher_caption"], seen)
        out.append({"prompt": question.replace("<image>", "").strip(), "image": row["images"][0],
                    "teacher_caption": row["teacher_caption"], "teacher_cot": row["teacher_cot"],
                    "student_caption": caption, "student_cot": cot})
    return out


def pair_loss(disc, processor, pairs, aux_coef=0.01, score_reg=0.001, micro_batch=0):
    """The warm-up objective on a list of pairs -> (loss scalar, metrics dict).

    Teacher and student segments of one kind go through one score() call (one forward unless
    micro_batch is set). acc/gap count only pairs whose two segments differ (module docstring)."""
    prompts = [pair_prompt(p) for p in pairs] * 2
    n, loss, aux, reg, record = len(pairs), 0.0, 0.0, 0.0, {}
    for which, key in (("cap", "caption"), ("cot", "cot")):
        scores, a = score(disc, processor, prompts, [p[f"teacher_{key}"] for p in pairs] +
                          [p[f"student_{key}"] for p in pairs], which, micro_batch or 2 * n)  # (2n,)
        t, s = scores[:n], scores[n:]  # (n,) teacher, (n,) student
        # Bradley-Terry: the teacher's segment should outscore the student's (REFERENCE 3, warm-up)
        bt = rl_losses.bt_loss(t, s, torch.ones(n, dtype=torch.bool, device=t.device))
        loss, aux, reg = loss + bt, aux + a / 2, reg + scores.pow(2).mean() / 2
        differ = torch.tensor([p[f"teacher_{key}"] != p[f"student_{key}"] for p in pairs])  # (n,)
        t, s = t.detach()[differ], s.detach()[differ]
        record.update({f"bt_{which}": bt.item(), f"acc_{which}": (t > s).float().mean().item() if len(t) else None,
                       f"gap_{which}": (t - s).mean().item() if len(t) else None,
                       f"same_{which}": 1 - differ.float().mean().item(), f"load_{which}": models.unwrap(disc).stats["load"]})
    # reg = mean(t_cap^2 + s_cap^2 + t_cot^2 + s_cot^2) / 4, the score regulariser of the alignment
    # loss (REFERENCE 3): it keeps scores off the +-10 clamp, where a pair ties with zero gradient.
    loss = loss + aux_coef * aux + score_reg * reg
    return loss, {"loss": loss.item(), "aux": aux.item(), "score_sq": reg.item(), **record}


def _rounded(record):
    return {k: round(v, 4) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


def warmup(argv):
    cfg = common.parse_config(WarmupConfig, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common.seed_everything(cfg.seed)
    _, _, _, device = common.init_distributed()  # single process: this only picks the device
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    os.makedirs(cfg.out_dir, exist_ok=True)

    # ---- data: the official pairs file, or pairs built from the SFT policy's samples
    try:
        path = cfg.pairs or build_pairs(cfg, device, print)
        pairs = data.load_pairs(path, base_dir=cfg.pairs_base or None, skip_bad_rows=cfg.skip_bad_rows)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    random.Random(cfg.seed).shuffle(pairs)
    n_val = min(cfg.val_pairs, len(pairs) // 5)  # never hold out more than a fifth
    val, train = pairs[:n_val], pairs[n_val:]
    if cfg.hard_negatives:  # training only: the held-out pairs stay the sampled ones
        hard = hard_negative_pairs(cfg.prompts, round(cfg.hard_negatives * len(train)), cfg.seed)
        print(f"data: {len(hard)} hard-negative pairs (teacher vs one object misperceived) "
              f"from {cfg.prompts}")
        train = train + hard
    steps = cfg.steps or cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    cfg = dataclasses.replace(cfg, steps=steps)  # the schedule (lr_at) reads cfg.steps
    print(f"data: {len(train)} training pairs, {len(val)} held out, {steps} steps")

    # ---- model and optimizer
    try:
        disc, processor = build(cfg.backbone, device, kind=cfg.kind, n_experts=cfg.experts, top_k=cfg.top_k,
                                noise=cfg.noise, routing=cfg.routing, vision=cfg.vision,
                                max_segment_tokens=cfg.max_segment_tokens, dtype=cfg.dtype, attn=cfg.attn, seed=cfg.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if cfg.grad_ckpt:
        gradient_checkpointing(disc)
    total, trainable = models.count_params(disc)
    print(f"discriminator: {cfg.kind} ({cfg.experts if cfg.kind != 'dense' else 1} experts, {cfg.routing} routing) "
          f"on {cfg.backbone}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable")
    optimizer = torch.optim.AdamW(param_groups(disc, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))

    # ---- loop
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    common.trim_jsonl(metrics_path, 0)  # a fresh run starts an empty log
    from tqdm import tqdm
    bar = tqdm(range(steps), desc="disc warm-up", mininterval=1 if sys.stderr.isatty() else 30)
    disc.train()
    order, epoch = [], 0
    for step in bar:
        t0 = time.time()
        while len(order) < cfg.batch_size:  # a fresh seeded permutation each epoch
            order += torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
            epoch += 1
        batch, order = [train[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, record = pair_loss(disc, processor, batch, cfg.aux_coef, cfg.score_reg)
        loss.backward()
        grad_norm = common.clip_grad_norm(disc.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log
        record = _rounded({"step": step + 1, **record, "lr": lr, "grad_norm": grad_norm.item(),
                           "step_s": time.time() - t0})
        common.append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc_cap=record["acc_cap"], acc_cot=record["acc_cot"], refresh=False)

    # ---- held-out pairs, then save
    if val:
        disc.eval()
        with torch.no_grad():
            _, scores = pair_loss(disc, processor, val, cfg.aux_coef, cfg.score_reg, cfg.micro_batch)
        summary = _rounded({"step": cfg.steps, "val_pairs": len(val), **{f"val_{k}": v for k, v in scores.items()}})
        common.append_jsonl(metrics_path, summary)
        print(" ".join(f"{k}={v}" for k, v in summary.items() if "load" not in k))
    final = os.path.join(cfg.out_dir, "final")
    save(disc, processor, final, info=common.run_info(cfg))
    print(f"saved {final}")
    # does D judge content, or only style? (evaluate.grounding_probe) -> printed and probe.json
    probe_data = cfg.probe_data
    if probe_data == "auto":
        probe_data = os.path.join(os.path.dirname(cfg.prompts), "test.parquet")
    if probe_data and os.path.exists(probe_data):
        import evaluate
        probe = evaluate.probe_discriminator(disc, probe_data, seed=cfg.seed, processor=processor)
        common.write_json_atomic(os.path.join(cfg.out_dir, "probe.json"),
                                 {"data": probe_data, **probe})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "warmup":
        raise SystemExit("usage: python discriminator.py warmup [flags]   (python discriminator.py warmup -h lists them)")
    warmup(argv[1:])


if __name__ == "__main__":
    main()
