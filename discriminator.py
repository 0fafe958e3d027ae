"""The PRISM discriminator D: a vision-language model upcycled into a Mixture-of-Experts with a
scalar value head, scoring how teacher-like one segment of an answer is. Its warm-up is warmup.py.

What D computes (docs/algorithms.md#discriminator-scores), one score per (image, prompt, segment):
    tokens = chat prompt (system + user turn with the image) + the segment's text, right-padded
    h      = backbone(tokens): final hidden states after the final norm                  (B, T, H)
    score  = value_head(h at the last valid token); NaN/Inf -> 0; clamped to [-10, 10]    (B,)
A response is scored twice: its perception segment "<caption>...</caption>" (which="cap") and its
reasoning segment "<think>...</think><answer>...</answer>" (which="cot").

Sparse upcycling (kind="moe", official; arXiv 2212.05055): every decoder layer's MLP becomes E
experts (default 4), each a copy of the dense MLP plus N(0, noise^2) noise (0.01) so they can
drift apart, behind a router Linear(H, E) initialised N(0, 0.02). Each token goes to its top-k
experts (k=2), weighted by the router softmax renormalised over those k. The Switch-Transformer
load-balancing loss (arXiv 2101.03961) keeps the router from collapsing onto one expert:
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

Warm-up, before alignment: its own stage, `python warmup.py` (Bradley-Terry on teacher / student
pairs).

Deviations from the paper / official code, all deliberate:
  - What the official code trains (XIAO4579/PRISM): the warm-up (moe/train_moe_vl_warmup*.py)
    optimises every parameter of D, vision tower included (AdamW over model.parameters(), nothing
    frozen); in alignment D is verl's critic, and scripts/train/experiment/qwen3_vl_prism.sh sets
    no critic.model.freeze_vision_tower (default false in verl/verl/workers/fsdp_workers.py), so D
    stays fully trainable. The same holds for the policy (actor.freeze_vision_tower unset in the
    alignment and the *_after_prism.sh RL scripts): only SFT freezes the tower. Ours: `--vision
    trained` trains D's tower as the official code does; `auto` (default) trains it only for a
    random-init backbone. We keep the pretrained tower frozen: at our lr (1e-3, 100x the
    official) training it lowered the grounding probe from 0.825 to 0.695 (docs/results.md).
  - We keep the backbone's Qwen3VLModel and drop its LM head: D never predicts tokens. The value
    head is fp32, weight N(0, 1/(H+1)), bias 0.
  - Over-long segments keep their first max_segment_tokens tokens; the prompt (and so its image
    tokens) is never cut.
  - Segment routing hands each MoE layer a token mask set just before the forward, so it refuses
    gradient checkpointing (a recomputing backward could read a later forward's mask); learned
    routing checkpoints (gradient_checkpointing).

In code: build, score, save, load, param_groups (used by warmup.py and align.py).
"""
import copy
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import common
import data
import model as models

KINDS = ("moe", "dense", "text-only")
ROUTINGS = ("learned", "segment")
SCORE_CLIP = 10.0  # the paper's score clip


# ----------------------------------------------------------------------------- the MoE layer
def load_balancing_loss(probs, chosen, n_experts):
    """Switch-Transformer auxiliary loss (arXiv 2101.03961) -> (aux scalar, load (E,)).

    probs (N, E): router softmax of N valid tokens; chosen (N, k): the experts each token picked.
    aux = E * sum_e f_e * P_e with f_e = share of the N*k routing slots that went to e (sums to 1)
    and P_e = mean probability of e. Only P carries gradient (the top-k choice is discrete)."""
    # counts[n, e] = 1 where e is among token n's top-k
    counts = F.one_hot(chosen, n_experts).sum(1).float()  # (N, E)
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
        # the noise breaks the symmetry: identical experts would stay identical
        with torch.no_grad():
            for p in self.experts.parameters():
                p.add_(torch.randn_like(p) * noise)
        weight = dense.gate_proj.weight
        self.router = nn.Linear(weight.shape[1], n_experts, bias=False, device=weight.device,
                                dtype=weight.dtype)
        nn.init.normal_(self.router.weight, std=0.02)
        self.top_k = top_k
        self.allowed = self.probs = self.chosen = None

    def forward(self, x):  # (B, T, H)
        B, T, H = x.shape
        E = len(self.experts)
        flat = x.reshape(-1, H)  # (N, H), N = B*T
        logits = self.router(flat).float()  # (N, E): routing in fp32 even under bf16
        probs = logits.softmax(-1)  # (N, E)
        # segment routing: a forbidden expert can never be in the top-k
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed.reshape(-1, E), float("-inf"))
        top, chosen = logits.topk(self.top_k, dim=-1)  # (N, k)
        # softmax over the k logits = the router probs renormalised over those k
        weights = top.softmax(-1).to(x.dtype)  # (N, k)
        out = torch.zeros_like(flat)  # (N, H)
        # One expert at a time over the tokens that chose it: slow but plain. No `if empty: skip`,
        # so every expert is in the graph every step (DDP would otherwise report unused parameters).
        for e, expert in enumerate(self.experts):
            # the tokens that picked e, and in which of their k slots
            token, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        self.probs, self.chosen = probs, chosen.reshape(B, T, -1).detach()
        return out.reshape(B, T, H)

    def balance(self, token_mask=None):
        """(aux, load (E,)) of the last forward over the tokens of token_mask (B, T) bool (the
        non-pad ones; None = all): load_balancing_loss, with gradient through the router."""
        valid = token_mask.reshape(-1) if token_mask is not None else slice(None)
        return load_balancing_loss(self.probs[valid], self.chosen.reshape(-1, self.top_k)[valid],
                                   len(self.experts))


def upcycle(language_model, n_experts, top_k, noise):
    """Replace every decoder layer's MLP by an MoEMLP made from it (in place)."""
    for layer in language_model.layers:
        layer.mlp = MoEMLP(layer.mlp, n_experts, top_k, noise)


# ----------------------------------------------------------------------------- the discriminator
class Discriminator(nn.Module):
    """backbone (a Qwen3VLModel: vision tower + language model, no LM head) + value head + settings.

    cfg: kind, n_experts, top_k, noise, routing, max_segment_tokens, train_vision, backbone
    (name)."""

    def __init__(self, backbone, cfg):
        super().__init__()
        if cfg["kind"] not in KINDS or cfg["routing"] not in ROUTINGS:
            raise ValueError(f"kind must be one of {KINDS} and routing one of {ROUTINGS}")
        if cfg["routing"] == "segment" and (cfg["kind"] == "dense" or cfg["n_experts"] % 2
                                            or cfg["top_k"] > cfg["n_experts"] // 2):
            raise ValueError("segment routing needs an MoE kind, an even number of experts and "
                             "top_k <= experts / 2")
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
            positions = torch.arange(T, device=mask.device)[None]  # (1, T)
            in_segment = positions >= batch["segment_start"][:, None]  # (B, T)
            group = torch.arange(E, device=mask.device) < E // 2  # (E,): the perception experts
            group = group if which == "cap" else ~group
            # prompt tokens may pick any expert
            allowed = torch.where(in_segment[..., None], group, True)  # (B, T, E)
        for m in self.moe_layers():
            m.allowed = allowed
        inputs = {k: v for k, v in batch.items() if k != "segment_start"}
        # the final hidden states, after the backbone's final norm
        hidden = self.backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        # The last 1 in the mask, not sum-1: right for any padding side, and padding never moves it.
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)  # (B,)
        final = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, H)
        raw = self.value_head(final.float()).squeeze(-1)  # (B,) in fp32 (the head's own dtype)
        moes = self.moe_layers()
        balance = [m.balance(mask) for m in moes]  # (aux, load) per layer, over non-pad tokens
        self.loads = [load for _, load in balance]  # score() reports their mean
        aux = torch.stack([a for a, _ in balance]).mean() if moes else raw.new_zeros(())
        # raw NaN/Inf scores: guard() hides them; score() counts them
        self.nonfinite = (~torch.isfinite(raw.detach())).sum()
        return guard(raw), aux


def guard(scores):
    """NaN/Inf -> 0, then clamp to [-SCORE_CLIP, SCORE_CLIP] (gradient flows inside)."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    return finite.clamp(-SCORE_CLIP, SCORE_CLIP)


def build(backbone="tiny", device=None, *, kind="moe", n_experts=4, top_k=2, noise=0.01,
          routing="learned", vision="auto", max_segment_tokens=512, dtype="auto", attn="sdpa",
          seed=0, meta=False, train="full", bits4=False, lora_r=16):
    """A fresh discriminator from a VLM backbone -> (disc, processor). Any name models.load_model
    accepts; vision "auto" trains the tower of the random-init embedded models only (as sft.py).
    meta: shapes only (models.meta_load: rank 0's weights fill the shards).

    What D trains, for GPUs too small for the paper's fully trained D (docs/scaling.md):
      train "full"   every weight but a frozen vision tower (the paper, the official code)
            "lora"   rank-lora_r LoRA adapters on every expert's gate / up / down projections,
                     the routers and the value head; the upcycled experts themselves frozen
            "head"   the value head alone: a linear probe on frozen features (a smoke test)
      bits4          the frozen language-model linear layers in nf4 (bitsandbytes), after
                     upcycling (the experts keep their noise); with "lora" or "head" only
    The trade-off against the paper's D: its experts can only move in a rank-lora_r subspace (or
    not at all), and a 4-bit backbone's features are slightly perturbed."""
    if train not in ("full", "lora", "head") or (bits4 and train == "full"):
        raise ValueError(f"train must be full, lora or head, and bits4 needs lora or head: got "
                         f"{train}, bits4={bits4}")
    if train == "lora" and kind == "dense":
        raise ValueError("train='lora' adapts the experts: it needs kind moe or text-only")
    device = device or torch.device("cpu")
    train_vision = vision == "trained" or (vision == "auto" and models.random_init(backbone))
    train_vision = train_vision and kind != "text-only"  # text-only never runs the tower
    vlm, processor, _ = models.load_model(backbone, device, dtype=dtype, attn=attn,
                                          train_vision=train_vision, seed=seed, meta=meta)
    dense = kind == "dense"
    cfg = {"kind": kind, "n_experts": 1 if dense else n_experts, "top_k": 1 if dense else top_k,
           "noise": noise, "routing": routing, "max_segment_tokens": max_segment_tokens,
           "train_vision": train_vision, "backbone": backbone, "train": train, "bits4": bits4,
           "lora_r": lora_r, "seed": seed}
    # expert noise, routers, the value head and LoRA from `seed`: the same on every rank (and in
    # load(), which rebuilds a partly trained D this way), the caller's RNG stream left alone
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        disc = Discriminator(vlm.model, cfg)
        if train != "full":
            _partly_trainable(disc, train, bits4, lora_r, device)
    return disc, processor


def _partly_trainable(disc, train, bits4, lora_r, device):
    """build()'s "lora" / "head" designs: optionally nf4 for the language model's linear layers
    (the routers stay full precision: they are trained), LoRA on the experts, and requires_grad
    on exactly the trained parameters."""
    if bits4:
        import bitsandbytes as bnb
        compute = disc.value_head.weight.dtype

        def quantize(module):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and name != "router":
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None, compute_dtype=compute,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                 quant_type="nf4")
                    q.bias = child.bias
                    # bitsandbytes' CPU repacking kernel has no backward (see model.load_model)
                    q.support_avx512bf16_for_cpu = False
                    setattr(module, name, q)
                else:
                    quantize(child)
        quantize(disc.backbone.language_model)
        disc.to(device)  # Params4bit quantise on their way to the device
    if train == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        targets = r".*experts\.\d+\.(gate_proj|up_proj|down_proj)"
        inject_adapter_in_model(LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                           target_modules=targets), disc)
    for name, p in disc.named_parameters():
        p.requires_grad_("value_head" in name or (train == "lora" and (
            "lora_" in name or ".router." in name)))


def gradient_checkpointing(disc):
    """Recompute each decoder layer and vision block in backward instead of keeping its activations
    (docs/distributed.md: tens of times less activation memory per token, for one more forward).
    Segment routing hands each forward its expert mask from outside the layer's inputs, which a
    recomputation could find changed by a later forward, so it is refused there."""
    if disc.cfg["routing"] == "segment":
        raise SystemExit("error: discriminator gradient checkpointing does not support "
                         "--routing segment")
    disc.backbone.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})


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
    if disc.cfg.get("train", "full") != "full":  # the rest is rebuilt from the backbone (load)
        trained = {n for n, p in disc.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}

    def write(tmp):
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "disc_config.json"), "w") as f:
            json.dump(disc.cfg, f, indent=2)
        disc.backbone.config.to_json_file(os.path.join(tmp, "backbone_config.json"))
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        if info is not None:
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump(info, f, indent=2)
    common.write_dir_atomic(path, write)


def load(path, device=None, dtype="auto", attn="sdpa", meta=False):
    """save()'s folder -> (disc, processor): the architecture from the two configs (random init),
    then the safetensors weights (no pickle). meta: shapes only, no weights read
    (models.meta_load: rank 0's weights fill the shards)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel
    device = device or torch.device("cpu")
    if not os.path.exists(os.path.join(path, "disc_config.json")):
        raise SystemExit(f"error: {path} is not a discriminator folder (no disc_config.json)")
    with open(os.path.join(path, "disc_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("train", "full") != "full":
        # a partly trained D holds only its trained weights: rebuild the rest exactly (same
        # backbone, same seed: the same expert noise, routers' init and LoRA init), then load
        disc, processor = build(cfg["backbone"], device, kind=cfg["kind"],
                                n_experts=cfg["n_experts"], top_k=cfg["top_k"],
                                noise=cfg["noise"], routing=cfg["routing"],
                                max_segment_tokens=cfg["max_segment_tokens"], dtype=dtype,
                                attn=attn, seed=cfg["seed"], train=cfg["train"],
                                bits4=cfg["bits4"], lora_r=cfg["lora_r"],
                                vision="trained" if cfg["train_vision"] else "frozen")
        trained = load_file(os.path.join(path, "model.safetensors"), device=str(device))
        unknown = set(trained) - set(disc.state_dict())
        if unknown:
            raise SystemExit(f"error: {path} holds weights this build lacks: {sorted(unknown)[:3]}")
        disc.load_state_dict(trained, strict=False)
        return disc, processor
    with open(os.path.join(path, "backbone_config.json")) as f:
        config = AutoConfig.for_model(**json.load(f))
    with torch.device("meta" if meta else "cpu"):
        backbone = AutoModel.from_config(config, attn_implementation=attn,
                                         dtype=models.pick_dtype(device, dtype))
    disc = Discriminator(backbone if meta else backbone.to(device), cfg)
    if not meta:
        weights = load_file(os.path.join(path, "model.safetensors"), device=str(device))
        disc.load_state_dict(weights)
    if not cfg["train_vision"]:
        disc.backbone.visual.requires_grad_(False)
    return disc, models.load_processor(path)


# ----------------------------------------------------------------------------- scoring
def _without_images(row):
    """The prompt as a text-only discriminator sees it: no image placeholders, no images."""
    messages = [{**m, "content": m["content"].replace("<image>\n", "").replace("<image>", "")}
                for m in row["messages"]]
    return {"messages": messages, "images": []}


def encode(processor, prompts, segments, text_only=False, max_segment_tokens=512):
    """Prompt rows (data.load_prompts) + segment strings -> (batch dict, truncated segment count).

    One processor call for the prompts (it expands each image into its <|image_pad|> tokens), one
    tokenizer call for the segments, then each row = its prompt tokens + its segment tokens,
    right-padded. Tokenising the segment on its own is exactly how the policy produced it (tokens
    after the prompt), and only segment tokens are ever cut, never image tokens."""
    from PIL import Image
    tok = processor.tokenizer
    rows = [_without_images(r) if text_only else r for r in prompts]
    texts = [tok.apply_chat_template(data.chat_messages(r["messages"]), tokenize=False,
                                     add_generation_prompt=True)
             for r in rows]
    # rows may hold already-opened PIL images: a caller scoring many rollouts of one prompt opens
    # it once
    images = [x if isinstance(x, Image.Image) else data.open_image(x)
              for r in rows for x in r["images"]]
    enc = processor(text=texts, images=images or None, padding=True, padding_side="right",
                    return_tensors="pt")
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
        if "mm_token_type_ids" in enc:  # M-RoPE needs it beside pixel_values (docs/measured.md)
            batch["mm_token_type_ids"][i, :n] = enc["mm_token_type_ids"][i, :n]
    for k in ("pixel_values", "image_grid_thw"):
        if k in enc:
            batch[k] = enc[k]
    batch["segment_start"] = prompt_len  # (B,): where each row's segment begins (segment routing)
    return batch, truncated


def score(disc, processor, prompts, segments, which, micro_batch=16):
    """Score segments -> (scores (B,), aux scalar). Gradients flow; wrap in torch.no_grad() to
    only score.

    prompts: rows with "messages" and "images" (data.load_prompts, or pair_prompt(pair)); segments:
    the matching strings; which: "cap" or "cot" (used by segment routing). aux is the mean MoE load-
    balancing loss over the micro-batches (0 for dense). disc.stats afterwards holds the router load
    per expert (E,), the number of segments cut at max_segment_tokens and of NaN/Inf raw scores."""
    if which not in ("cap", "cot"):
        raise ValueError(f"which must be 'cap' or 'cot', got {which!r}")
    if len(prompts) != len(segments) or not prompts:
        raise ValueError(f"need as many segments as prompts, at least one: got {len(prompts)} "
                         f"and {len(segments)}")
    # under DDP the forward goes through the wrapper (gradient sync), the rest not
    inner = models.unwrap(disc)
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
    inner.stats = {"load": torch.stack(loads).mean(0).tolist() if loads else [1.0],
                   "truncated": truncated,
                   # raw scores that were NaN/Inf (guard() set them to 0)
                   "nonfinite": int(nonfinite)}
    return torch.cat(scores), torch.stack(auxes).mean()


def pair_prompt(pair):
    """A warm-up pair (data.load_pairs) -> the prompt row its segments answer."""
    return {"messages": [{"role": "system", "content": data.SYSTEM_PROMPT},
                         {"role": "user", "content": "<image>\n" + pair["prompt"]}],
            "images": [pair["image"]]}
