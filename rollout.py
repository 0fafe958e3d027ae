"""Rollouts: sample N responses per prompt from the policy, and re-score them for the update.

Shared by align.py (stage 2) and rlvr.py (stage 3). Our own batching instead of `model.generate`,
because a group of N rollouts shares everything up to the first sampled token:

  sample()                                 one call per RL step, no gradients
    processor   once per prompt            (text + image -> ids, pixel patches)
    prefill     once per prompt            (vision tower + prompt tokens -> KV cache)
    expand      the cache N times          (rollouts of one prompt start from the same state)
    decode      token by token             (temperature / top-p, stop at <|im_end|>, vision tokens
                                            suppressed, the sampled token's log-prob recorded)
  completion_logprobs()                    per micro-batch of the update, with gradients
    vision      once per prompt in the micro-batch, features reused by its rollouts
    forward     prompt + completion, logits kept for the completion only

The policy. Everywhere in this project "the policy" is softmax(logits / temperature) with the
vision special tokens (<|image_pad|> and friends) removed: a random or young policy samples them,
and a sequence holding one cannot be re-scored ("Image features and image tokens do not match").
Sampling and re-scoring mask the same tokens, so the recorded log-probs and the recomputed ones are
the same distribution (tests/test_rollout.py checks they agree within 1e-4). With top_p < 1 the
tokens are drawn from the truncated distribution but the recorded log-prob is the full one, as in
verl; the ratio in the loss compares full distributions.

Old log-probs. The update needs log pi_old(token) of the policy that sampled. That is exactly what
sample() records, so no second forward pass is needed: not when the update is fully on-policy (the
ratio is 1), and not in the off-policy case either (several mini-batches or PPO epochs), where the
old policy *is* the sampling one. TRL and verl run that extra forward; we skip it.

Positions. Qwen3-VL uses 3-D M-RoPE: image tokens get (time, height, width) positions and text
positions continue from the largest one. Left padding and the image make the text position of the
first sampled token differ per row. Every forward here is given explicit positions computed once
per prompt by the model's own get_rope_index with the attention mask (padding skipped): left to
itself, the model numbers a text-only prompt 0..P-1 *including* its left padding, so a padded row
would be sampled at shifted positions (tests/test_first_gpu_run.py compares against an unpadded
forward).

Micro-batches are sized by a token budget (rows x padded length), so the same settings work for
a 100-token toy prompt and a 2,000-token real one. The update itself is written out in align.py
and rlvr.py; the helpers at the end of this file keep its ranks and micro-batches in step.
Importing this module does no work.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import rl_losses
from common import all_gather_list, all_reduce_grads, all_reduce_sum, any_rank, clip_grad_norm
from model import even_split, gathered, hf_model, input_device, unwrap, vision_token_ids


@dataclass
class Rollouts:
    """One step's rollouts: B prompts x N samples, rollout i belongs to prompt group[i]."""
    rows: list               # the B prompt rows (data.load_prompts format)
    prompt: dict             # processor output for B prompts, left padded: input_ids (B, P), ...
    pixels: list             # per prompt: pixel patches (n_patches, D) and grid rows (n_images, 3)
    ids: torch.Tensor        # (BN, T) sampled tokens, right padded with the pad id
    mask: torch.Tensor       # (BN, T) float, 1 for sampled tokens (up to and including <|im_end|>)
    logp: torch.Tensor       # (BN, T) log-prob of each sampled token under the sampling policy
    group: torch.Tensor      # (BN,) index into rows of each rollout's prompt
    texts: list              # (BN) decoded responses (special tokens dropped, answer tags kept)
    lengths: torch.Tensor    # (BN,) number of sampled tokens
    truncated: torch.Tensor  # (BN,) bool, True when the budget ran out before <|im_end|>
    blocked: list            # vision token ids masked out of the policy (sampling and re-scoring)
    pad_id: int              # the tokenizer's pad id (padding of ids and prompts)
    next_pos: torch.Tensor   # (B,) text position of each prompt's first sampled token (M-RoPE)

    def __len__(self):
        return len(self.texts)


@dataclass
class Layout:
    """How one step's prompts_per_step x group_size rollouts are spread over the ranks. Either
    each rank takes whole groups (prompts_per_step a multiple of the ranks), or, with fewer
    prompts than ranks, every group is split over split = world / prompts_per_step ranks, each
    sampling group_size / split of its rollouts (the paper's 4 prompts x 16 on 8 GPUs: 2 ranks
    per prompt, 8 rollouts each). A split group's advantages then need the whole group's scores:
    global_advantages gathers them."""
    prompts: int  # prompts this rank samples per step
    rollouts: int  # rollouts per prompt on this rank
    split: int  # ranks that share one group (1: groups are not split)


def check_config(cfg, world):
    """One-line errors for RL settings that cannot work -> (the algorithm: the --algo row of
    rl_losses.ALGOS with the knobs given on the command line, the Layout). align.py, rlvr.py."""
    if cfg.group_size < 2:
        raise SystemExit("error: --group_size must be at least 2 (advantages compare rollouts "
                         "within a group)")
    P, N = cfg.prompts_per_step, cfg.group_size
    if P % world == 0:
        layout = Layout(prompts=P // world, rollouts=N, split=1)
    elif world % P == 0 and N % (world // P) == 0:
        layout = Layout(prompts=1, rollouts=N // (world // P), split=world // P)
    else:
        raise SystemExit(f"error: --prompts_per_step {P} on {world} ranks: give a multiple of "
                         f"{world}, or a divisor of {world} with --group_size divisible by "
                         f"{world} / prompts_per_step (groups are then split over ranks)")
    knobs = ("eps_low", "eps_high", "agg", "dynamic_sampling", "overlong_buffer")
    given = {k: getattr(cfg, k) for k in knobs if getattr(cfg, k, None) is not None}
    try:
        algo = rl_losses.algo(cfg.algo, **given)
    except ValueError as e:
        raise SystemExit(f"error: --algo: {e}")
    if layout.split > 1 and algo["dynamic_sampling"]:
        raise SystemExit("error: dynamic sampling (dapo) needs whole groups on each rank: give "
                         f"--prompts_per_step a multiple of the {world} ranks")
    return algo, layout


def my_prompts(order, rank, world, layout):
    """This rank's prompts out of the step's shared order (the same list on every rank): whole
    groups take every world-th prompt; split groups give ranks rank, rank+1, ... the same one."""
    return order[rank // layout.split::world // layout.split]


def global_advantages(fn, group, rank, world, layout, *values):
    """fn(*values, group) -> (BN,) advantages, where a split group's statistics must include the
    rollouts on the other ranks: with split groups, values and global group ids (a prompt's
    position in the step's order) are gathered from every rank (all_gather), fn runs on the
    whole step, and this rank's rows are returned. Whole groups: fn on this rank's rows alone."""
    if layout.split == 1:
        return fn(*values, group)
    gid = rank // layout.split + group * (world // layout.split)  # (BN,) position in the order
    parts = all_gather_list([torch.stack([gid.double(), *[v.double() for v in values]])])
    every = torch.cat(parts, dim=1)  # (1 + len(values), all rollouts of the step)
    start = sum(p.shape[1] for p in parts[:rank])
    out = fn(*[every[i + 1].to(v.dtype) for i, v in enumerate(values)], every[0].long())
    return out[start:start + len(group)]


def prompt_order(seed, cursor, count, n):
    """Dataset indices at stream positions [cursor, cursor + count): a fresh seeded permutation per
    pass over the data. A pure function, so a resumed run (which saves the cursor) continues
    exactly."""
    out = []
    for pos in range(cursor, cursor + count):
        gen = torch.Generator().manual_seed(seed * 100_003 + pos // n)
        perm = torch.randperm(n, generator=gen, device="cpu")
        out.append(perm[pos % n].item())
    return out


def _per_prompt_pixels(enc, rows):
    """Cut the processor's concatenated pixel patches back into one piece per prompt, so the
    re-scoring forward can fetch any subset of prompts (each image has t*h*w patch rows)."""
    counts = [len(r["images"]) for r in rows]
    if "pixel_values" not in enc:
        return [(None, None)] * len(rows)
    grid = enc["image_grid_thw"]  # (n_images, 3)
    patches = grid.prod(-1).tolist()
    out, img, row0 = [], 0, 0
    for c in counts:
        n = sum(patches[img:img + c])
        out.append((enc["pixel_values"][row0:row0 + n], grid[img:img + c]))
        img, row0 = img + c, row0 + n
    return out


def _prompt_batch(enc, pixels, prompts, device):
    """The processor outputs (enc) of a subset of the prompts (a list of indices), on device; pixels
    is _per_prompt_pixels(enc, rows). Used to cut sampling chunks and re-scoring micro-batches."""
    sub = {k: enc[k][prompts] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
           if k in enc}
    # only the images of these prompts; none at all when they are text-only (an empty image list
    # would still send the vision tower an empty batch)
    chosen = [pixels[g] for g in prompts if pixels[g][0] is not None and len(pixels[g][1])]
    if chosen:
        sub["pixel_values"] = torch.cat([patches for patches, _ in chosen])
        sub["image_grid_thw"] = torch.cat([grid for _, grid in chosen])
    return {k: v.to(device) for k, v in sub.items()}


def _prompt_positions(m, enc):
    """-> ((3, B, P) M-RoPE positions of the left-padded prompts, (B,) position of each prompt's
    first sampled token: one past its largest position). Image tokens advance positions by the
    image's grid side, not its token count; padding is skipped (its positions are 0, never read)."""
    types = enc.get("mm_token_type_ids")
    if types is None:  # a text-only batch from a processor that leaves the types out
        types = torch.zeros_like(enc["input_ids"])
    pos, _ = hf_model(m).model.get_rope_index(enc["input_ids"], mm_token_type_ids=types,
                                              image_grid_thw=enc.get("image_grid_thw"),
                                              attention_mask=enc["attention_mask"])  # (3, B, P)
    return pos, pos.amax(dim=(0, 2)) + 1


def _sample_token(logits, temperature, top_p):
    """Draw one token per row from softmax(logits / temperature) (optionally nucleus-truncated) and
    return it with its log-prob under the full tempered distribution. logits (b, V), masked."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (b, V)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix with mass >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # inverse-CDF draw: the first token whose cumulative mass exceeds u ~ U(0, total). Exact, and
    # 20x cheaper on CPU than torch.multinomial (one random number per row instead of a sort); a
    # masked token adds no mass, so the strict ">" (right=True) can never land on it
    cdf = probs.cumsum(-1)  # (b, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # (b, 1)
    token = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)  # (b, 1)
    return token, logp.gather(-1, token).squeeze(-1)


@torch.no_grad()
def _sample_chunk(m, enc, n, max_new_tokens, temperature, top_p, blocked, eos_id, pad_id):
    """Prefill b prompts once, copy their KV cache n times, then decode b*n rows together.

    Decode steps call the language model and the LM head directly: the multimodal wrapper around
    them only adds Python overhead per token once the image is in the cache (~15% of a tiny
    step)."""
    b = enc["input_ids"].shape[0]
    hf = hf_model(m)
    language_model, lm_head = hf.model.language_model, hf.lm_head
    prompt_pos, first = _prompt_positions(m, enc)  # (3, b, P), (b,)
    start = first.repeat_interleave(n)  # (bn,)
    out = m(**enc, position_ids=prompt_pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)  # rows i*n .. i*n+n-1 are prompt i's rollouts
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # (bn, V)
    # attention over [left-padded prompt | tokens sampled so far]; finished rows keep attending
    # (their outputs are ignored), so the mask for new tokens is all ones
    P = enc["attention_mask"].shape[1]
    prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)  # (bn, P)
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(b * n, max_new_tokens)], dim=1)  # (bn, P+T)
    if hf.config._attn_implementation in ("sdpa", "eager"):
        # built once as the additive 4-D mask the attention kernels take (0 = attend, min =
        # padding), then sliced per step: transformers would otherwise rebuild it from the 2-D mask
        # every token
        dtype = next(language_model.parameters()).dtype
        attn = ((1 - attn[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)  # (bn, 1, 1, P+T)
    ids, logps = [], []
    done = torch.zeros(b * n, dtype=torch.bool, device=logits.device)  # (bn,)
    for t in range(max_new_tokens):
        logits[:, blocked] = float("-inf")
        token, lp = _sample_token(logits, temperature, top_p)  # (bn, 1), (bn,)
        token[done] = pad_id
        ids.append(token)
        logps.append(lp.masked_fill(done, 0.0))
        done = done | (token[:, 0] == eos_id)
        if done.all() or t == max_new_tokens - 1:
            break
        positions = (start + t).view(1, -1, 1).expand(3, -1, -1)  # (3, bn, 1) same for t, h, w
        out = language_model(input_ids=token, attention_mask=attn[..., :P + t + 1],
                             position_ids=positions, past_key_values=cache, use_cache=True)
        logits, cache = lm_head(out.last_hidden_state[:, -1]), out.past_key_values  # (bn, V)
    ids = torch.cat(ids, dim=1)  # (bn, t)
    # a token counts if it was sampled while the row was still running: up to and including EOS
    ended = (ids == eos_id).long().cumsum(-1)  # (bn, t) 1 from the EOS on
    mask = ((ended == 0) | ((ended == 1) & (ids == eos_id))).float()
    return ids, mask, torch.stack(logps, dim=1) * mask, done, first


def sample(model, processor, rows, n, max_new_tokens=128, temperature=1.0, top_p=1.0,
           token_budget=65536):
    """Sample n responses for each prompt row (data.load_prompts format) -> Rollouts.

    Prompts are processed in chunks of at most `token_budget` rollout tokens (chunk prompts x n x
    (prompt + max_new_tokens)), the memory knob for the KV cache. Uses the global torch RNG, which
    the stage scripts seed per rank and save in checkpoints, so a resumed run samples the same."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = input_device(m)
    tok = processor.tokenizer
    eos_id, pad_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    blocked = vision_token_ids(tok)
    enc = data.encode_prompts(rows, processor)  # the only processor call: once per prompt
    prompt_len = enc["input_ids"].shape[1]
    per_chunk = max(1, token_budget // (n * (prompt_len + max_new_tokens)))
    pixels = _per_prompt_pixels(enc, rows)
    pieces = []
    # under FSDP: full weights for the whole sampling phase, no per-token collectives
    with gathered(m):
        for c in range(0, len(rows), per_chunk):
            sub = _prompt_batch(enc, pixels, list(range(c, min(c + per_chunk, len(rows)))), device)
            chunk = _sample_chunk(m, sub, n, max_new_tokens, temperature, top_p, blocked, eos_id,
                                  pad_id)
            pieces.append([x.cpu() for x in chunk])
    m.train(was_training)
    # chunks may stop at different lengths: right-pad to the longest
    T = max(p[0].shape[1] for p in pieces)

    def cat(i, value):
        return torch.cat([F.pad(p[i], (0, T - p[i].shape[1]), value=value) for p in pieces])
    ids, mask, logp = cat(0, pad_id), cat(1, 0.0), cat(2, 0.0)  # (BN, T) each
    done = torch.cat([p[3] for p in pieces])  # (BN,)
    return Rollouts(rows=rows, prompt=enc, pixels=pixels, ids=ids, mask=mask, logp=logp,
                    group=torch.arange(len(rows), device="cpu").repeat_interleave(n),
                    texts=tok.batch_decode(ids, skip_special_tokens=True),
                    lengths=mask.sum(-1).long(), truncated=~done, blocked=blocked, pad_id=pad_id,
                    next_pos=torch.cat([p[4] for p in pieces]))


def completion_logprobs(model, rollouts, idx, temperature=1.0, share_prefix=True):
    """(b, T) log-probs of the sampled tokens of rollouts idx under `model`, with gradients when
    enabled. The same shared-prefix trick as sampling, now with gradients:

        prompt forward       the micro-batch's distinct prompts, once each (vision tower included),
                             keeping their keys/values (still attached to the autograd graph)
        completion forward   each rollout's tokens attending to its prompt's keys/values

    so a group of N rollouts costs one prompt + N completions instead of N prompt+completions (the
    prompt is ~120 tokens and a completion <= 64 on the tiny benchmark: 2.3x fewer tokens). The
    gradient flows back through the shared keys/values into the prompt forward, so it is exactly
    the gradient of the plain forward. Gradient checkpointing cannot return the cache; with it we
    run the plain forward on prompt + completion instead (share_prefix=False does the same, for
    tests)."""
    m = unwrap(model)
    device = input_device(m)
    idx = torch.as_tensor(idx, device="cpu")
    groups = rollouts.group[idx].tolist()  # (b) each rollout's prompt
    prompts = sorted(set(groups))  # (u) the distinct prompts, each forwarded once
    local = torch.tensor([prompts.index(g) for g in groups], device=device)  # (b,) slot in prompts
    prompt = _prompt_batch(rollouts.prompt, rollouts.pixels, prompts, device)
    ids, mask = rollouts.ids[idx].to(device), rollouts.mask[idx].to(device)  # (b, T)
    T = ids.shape[1]
    attn = torch.cat([prompt["attention_mask"][local], mask.long()], dim=1)  # (b, P+T)
    prompt_pos, _ = _prompt_positions(m, prompt)  # (3, u, P): as sampling numbered the prompts
    start = rollouts.next_pos[prompts].to(device)[local]  # (b,) position of the first sampled token
    text_pos = start[:, None] + torch.arange(T, device=device)  # (b, T)
    positions = text_pos.unsqueeze(0).expand(3, -1, -1)  # (3, b, T)
    checkpointing = any(getattr(x, "gradient_checkpointing", False) is True
                        for x in hf_model(m).modules())
    if not share_prefix or (checkpointing and m.training):
        full = dict(prompt, input_ids=torch.cat([prompt["input_ids"][local], ids], dim=1),
                    attention_mask=attn, image_grid_thw=prompt.get("image_grid_thw"),
                    position_ids=torch.cat([prompt_pos[:, local], positions], dim=2))  # (3, b, P+T)
        if "mm_token_type_ids" in prompt:  # completion tokens are text: type 0
            full["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"][local],
                                                   torch.zeros_like(ids)], dim=1)
        if "pixel_values" in prompt:  # every rollout row needs its own copy of its prompt's image
            full["pixel_values"] = torch.cat([rollouts.pixels[g][0] for g in groups]).to(device)
            full["image_grid_thw"] = torch.cat([rollouts.pixels[g][1] for g in groups]).to(device)
        full = {k: v for k, v in full.items() if v is not None}
        # the last T+1 positions predict the T completion tokens (prompts are left padded)
        logits = m(**full, logits_to_keep=T + 1).logits[:, :-1]  # (b, T, V)
    else:
        # (u, 1, V): predicts each first token
        out = m(**prompt, position_ids=prompt_pos, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        # (u, ...) -> (b, ...): rollout i reads its prompt's keys/values
        cache.batch_select_indices(local)
        rest = m(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                 use_cache=True).logits  # (b, T, V): position t predicts token t+1
        logits = torch.cat([out.logits[local], rest[:, :-1]], dim=1)  # (b, T, V)
    logits = logits.float()
    logits[..., rollouts.blocked] = float("-inf")
    logits = logits / temperature
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (b, T)


def pass_rates(model, processor, rows, n, max_new_tokens, temperature=1.0, token_budget=65536,
               batch=16):
    """Estimate each prompt's pass rate from n samples (docs/algorithms.md#difficulty-filter)."""
    rates = []
    for i in range(0, len(rows), batch):
        r = sample(model, processor, rows[i:i + batch], n, max_new_tokens, temperature,
                   token_budget=token_budget)
        acc = torch.tensor([data.reward(t, r.rows[g]["ground_truth"])["acc"]
                            for t, g in zip(r.texts, r.group.tolist())], device="cpu")
        rates += acc.view(-1, n).mean(-1).tolist()
    return rates



# -----------------------------------------------------------------------------------------------
# Bookkeeping of the policy update. The update itself (log-probs, loss, backward, step) is written
# out in the loops of align.py and rlvr.py; these helpers keep ranks and micro-batches in step.


def update_batches(idx, ppo_epochs, mini_batches):
    """The optimizer steps of one update -> [rollout indices]: ppo_epochs shuffled passes over
    idx, each cut into exactly mini_batches pieces. The count is the same on every rank (each
    piece ends in collectives all ranks join; chunk() could return fewer pieces: 6 rows in 4 ->
    3). Only the very first piece is on-policy (ratio 1); later ones are the clipped off-policy
    case. Callers give every rank at least mini_batches rollouts."""
    steps = []
    for _ in range(ppo_epochs):
        order = idx[torch.randperm(len(idx), device="cpu")]
        steps += list(order.tensor_split(mini_batches))
    return steps


def step_counts(r, mb, advantages):
    """One optimizer step's (valid tokens, sequences, any NaN/Inf input) over all ranks.

    The loss divides by the step's global counts (rl_losses.aggregate), so micro-batches and ranks
    add up to one big batch; NaN/Inf advantages or sampling log-probs anywhere make every rank skip
    the step together (all_reduce: ranks hold different rollouts)."""
    mask = r.mask[mb]  # (b, T)
    bad = (~torch.isfinite(advantages[mb])).sum() + (~torch.isfinite(r.logp[mb][mask > 0])).sum()
    counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum(), bad], dtype=torch.float,
                          device="cpu")
    tokens, seqs, bad = all_reduce_sum(counts).tolist()
    return tokens, seqs, bad > 0


def micro_batches(indices, rollouts, token_budget):
    """Split rollout indices into micro-batches of at most token_budget padded tokens each ->
    [(indices, real)]. Under FSDP every rank must run as many forwards (each is a collective):
    the lists are padded with copies of the first micro-batch, real False, whose loss the caller
    multiplies by 0 (it must still join the backward). Single-process: all real."""
    width = rollouts.prompt["input_ids"].shape[1] + rollouts.ids.shape[1]
    size = max(1, token_budget // width)
    pieces, real = even_split([indices[i:i + size] for i in range(0, len(indices), size)])
    return list(zip(pieces, real))


def finish_step(params, optimizer, loss, grad_clip):
    """The end of an optimizer step -> grad norm (None if the step was skipped): sum the gradients
    over ranks (the losses were divided by global counts; a no-op single-process, and FSDP did it
    in backward), clip, and step unless the loss on any rank or the global norm is NaN/Inf."""
    all_reduce_grads(params)
    grad_norm = clip_grad_norm(params, grad_clip)
    # the gradient norm is global, the loss per rank: any_rank so that all ranks skip together
    ok = not any_rank(not math.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item() if ok else None


def concat(parts):
    """One Rollouts from several sample() calls (DAPO's extra generation rounds): prompts are left
    padded to a common width, completions right padded, group indices renumbered."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt["input_ids"].shape[1] for p in parts)
    T = max(p.ids.shape[1] for p in parts)
    pad_id = parts[0].pad_id
    prompt = {}
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if k in parts[0].prompt:
            fill = pad_id if k == "input_ids" else 0
            prompt[k] = torch.cat([F.pad(p.prompt[k], (P - p.prompt[k].shape[1], 0), value=fill)
                                   for p in parts])
    if "image_grid_thw" in parts[0].prompt:
        prompt["image_grid_thw"] = torch.cat([p.prompt["image_grid_thw"] for p in parts])
    offsets = torch.tensor([0] + [len(p.rows) for p in parts], device="cpu").cumsum(0)
    return Rollouts(
        rows=[row for p in parts for row in p.rows], prompt=prompt,
        pixels=[x for p in parts for x in p.pixels],
        ids=torch.cat([F.pad(p.ids, (0, T - p.ids.shape[1]), value=pad_id) for p in parts]),
        mask=torch.cat([F.pad(p.mask, (0, T - p.ids.shape[1])) for p in parts]),
        logp=torch.cat([F.pad(p.logp, (0, T - p.ids.shape[1])) for p in parts]),
        group=torch.cat([p.group + o for p, o in zip(parts, offsets)]),
        texts=[t for p in parts for t in p.texts],
        lengths=torch.cat([p.lengths for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        blocked=parts[0].blocked, pad_id=pad_id, next_pos=torch.cat([p.next_pos for p in parts]))
