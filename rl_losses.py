"""The losses of PRISM's RL stages, as pure tensor functions: no model, no globals, no I/O.

What is here (the formulas: docs/algorithms.md):
  - advantages:   group_advantages (GRPO / Dr.GRPO), prism_advantages (discriminator scores -> A)
  - reward shaping and filtering from DAPO: overlong_penalty, dynamic_sampling_keep
  - aggregate:    how a (B, T) per-token loss becomes one number (4 modes), micro-batch safe
  - policy losses: ppo_clip_loss (GRPO, DAPO, Dr. GRPO), gspo_loss, cispo_loss, one signature;
    ALGOS, the plain table of algorithms (loss + every default); policy_loss, the micro-batch
    loss any of them gives. A new algorithm = one function + one row of ALGOS.
  - discriminator: bt_loss (Bradley-Terry), disc_loss (the full PRISM discriminator objective)
  - kl_k3: the low-variance KL estimator (PRISM runs use no KL; it is here for experiments)

Conventions: B = rollouts in the (micro-)batch, T = padded response length. logp / old_logp / mask
are (B, T) over response tokens only; advantages and rewards are (B,), one number per rollout,
broadcast over its tokens. Advantages, scores and old log-probs are constants: we detach them.
Metrics come back as plain python floats (one .item() each: easy to log, never holds a graph).

"Why is my loss 0?"  With one policy update per batch of rollouts (fully on-policy, as in PRISM),
old_logp == logp, so every ratio is exactly 1 and clipping never fires. The per-token loss is then
-A_i, and its aggregate is about -mean(A), which is ~0 because group normalisation centres A in each
group. The GRADIENT is not zero: d(-A_i * rho_t)/d logp_t = -A_i * rho_t = -A_i. So a loss curve
flat at 0 is expected; log the gradient norm to see whether learning happens.
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# Advantages


def _group_index(group_ids):
    """Map arbitrary ids (not sorted, not contiguous) to 0..G-1 -> (inverse (B,), count (G,))."""
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,) values in [0, G)
    count = torch.bincount(inv)  # (G,) rollouts per group
    return inv, count


def _group_normalise(x, group_ids, norm_std=True, eps=1e-6):
    """(x - mean_g) / (std_g + eps) per group, unbiased std (correction 1); mean_g only if not
    norm_std. A group of size 1 uses mean 0, std 1 (docs/algorithms.md#notation), so a singleton
    keeps its raw value: it has no siblings to compare with, and its unbiased std would be 0/0."""
    inv, count = _group_index(group_ids)
    n = count.to(x.dtype)  # (G,)
    mean = torch.zeros_like(n).index_add_(0, inv, x) / n  # (G,)
    # the sum of squared deviations from the group mean
    sq = torch.zeros_like(n).index_add_(0, inv, (x - mean[inv]) ** 2)  # (G,)
    std = (sq / (n - 1).clamp_min(1)).sqrt()  # (G,) unbiased
    single = count == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    if not norm_std:
        return x - mean[inv]
    return (x - mean[inv]) / (std[inv] + eps)


def _as_float(x):
    x = x.detach()
    return x if x.is_floating_point() else x.float()


def group_advantages(rewards, group_ids, norm_std=True, eps=1e-6):
    """GRPO outcome advantage, one number per rollout (B,).

        A_i = (r_i - mean_g) / (std_g + eps)      (GRPO, arXiv 2402.03300; unbiased std as verl)
        A_i =  r_i - mean_g                       (norm_std=False: Dr.GRPO, arXiv 2503.20783)

    rewards (B,) float/int/bool; group_ids (B,) long, rollouts of one prompt share an id (any
    order). eps 1e-6 as verl (TRL uses 1e-4). A group of size 1 uses mean 0, std 1, so A = r.
    An all-equal group gives A = 0: it carries no learning signal (DAPO filters such groups)."""
    return _group_normalise(_as_float(rewards), group_ids, norm_std, eps)


def prism_advantages(cap_scores, cot_scores, format_valid, group_ids, alpha=0.5,
                     format_penalty=1.5, eps=1e-6):
    """PRISM alignment advantage from the discriminator's scores (arXiv 2604.28123;
    docs/algorithms.md).

        F_i     = 1 if rollout i is format-invalid else 0
        s_i     = min_{j valid in g} s_j - 1   for invalid i   (-1 if no rollout of g is valid)
        A_i     = alpha * GN(s_cap)_i + (1 - alpha) * GN(s_cot)_i - format_penalty * F_i
        GN(x)_i = (x_i - mean_g) / (std_g + eps), unbiased std, size-1 groups: mean 0, std 1

    The replacement puts an invalid rollout just below the worst valid one, so it ranks last without
    its (meaningless) score blowing up the group's std; the penalty then pushes it further down.
    cap_scores, cot_scores (B,) float (detached here); format_valid (B,) bool; group_ids (B,)."""
    valid = format_valid.bool()
    inv, count = _group_index(group_ids)
    normed = []
    for s in (_as_float(cap_scores), _as_float(cot_scores)):
        inf = torch.full(count.shape, float("inf"), dtype=s.dtype, device=s.device)  # (G,)
        # each group's minimum over its valid rollouts
        group_min = inf.scatter_reduce(0, inv, torch.where(valid, s, float("inf")), "amin")  # (G,)
        # the value an invalid rollout gets in place of its score
        fill = torch.where(torch.isinf(group_min), -1.0, group_min - 1)[inv]  # (B,)
        normed.append(_group_normalise(torch.where(valid, s, fill), group_ids, True, eps))
    return (alpha * normed[0] + (1 - alpha) * normed[1]
            - format_penalty * (~valid).to(normed[0].dtype))


def overlong_penalty(lengths, max_len, buffer, factor=1.0):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward. (B,) float.

        r_len = 0                                      if L <= L_max - L_buf
              = ((L_max - L_buf) - L) / L_buf * factor  if L_max - L_buf < L <= L_max
              = -factor                                if L > L_max

    Within L <= L_max this equals the min(-(L - (L_max - L_buf)) / L_buf * factor, 0); that
    formula has no lower bound, the paper's piecewise form (used here) stops at -factor.
    lengths (B,) int/float response lengths in tokens; buffer > 0; factor >= 0."""
    if buffer <= 0:
        raise ValueError(f"overlong_penalty needs buffer > 0, got {buffer}")
    L = lengths.detach().float()  # (B,)
    return ((max_len - buffer - L) / buffer * factor).clamp(min=-factor, max=0.0)


def dynamic_sampling_keep(acc, group_ids):
    """DAPO dynamic sampling (arXiv 2503.14476): (B,) bool, True for rows of groups whose
    accuracies are not all equal. All-correct or all-wrong groups have zero advantage for every
    rollout, so they only dilute the batch. A group of size 1 is all-equal and is dropped. acc (B,)
    float/bool."""
    a = _as_float(acc)
    inv, count = _group_index(group_ids)
    inf = torch.full(count.shape, float("inf"), dtype=a.dtype, device=a.device)  # (G,)
    lo = inf.scatter_reduce(0, inv, a, "amin")  # (G,)
    hi = (-inf).scatter_reduce(0, inv, a, "amax")  # (G,)
    return (hi > lo)[inv]


# -----------------------------------------------------------------------------------------------
# Aggregation: (B, T) per-token losses -> scalar

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate(loss_mat, mask, mode, max_len=None, global_tokens=None, global_seqs=None):
    """Reduce a (B, T) loss matrix L with mask M (float or bool) to a scalar
    (docs/algorithms.md#loss-aggregation).

        token-mean              sum(L*M) / N_tok                              (DAPO)
        seq-mean-token-mean     sum_i [sum_t L*M / sum_t M] / N_seq           (GRPO)
        seq-mean-token-sum      sum_i [sum_t L*M] / N_seq
        seq-mean-token-sum-norm sum(L*M) / (N_seq * max_len)                  (Dr.GRPO)

    N_tok = valid tokens, N_seq = non-empty rows (mask sum > 0); empty rows contribute nothing.
    Micro-batches and ranks: pass the WHOLE optimizer step's N_tok as global_tokens (token-mean) or
    N_seq as global_seqs (seq-mean-*); then the micro-batch losses SUM to the full-batch loss, and
    so do their gradients. Default None = this batch's own count (correct for a single batch only;
    averaging per-micro-batch means over-weights short answers - a classic accumulation bug).
    Under DDP, whose gradient is a mean over ranks, multiply the loss by world size or pass
    counts/world.

    seq-mean-token-sum-norm: max_len is the fixed generation budget (required; the padded T would
    change from batch to batch), and N_seq the number of sequences, as Dr. GRPO's 1/G and verl's
    agg_loss divide: without N_seq the loss would grow with the batch size and interact with
    gradient clipping. Its micro-batches take global_seqs like the seq-mean modes.
    An all-empty mask gives 0 (still attached to the graph), never NaN."""
    valid = mask > 0  # (B, T) bool
    # where, not L*M: garbage (inf) in padding stays out
    masked = torch.where(valid, loss_mat, 0.0)  # (B, T)
    if mode == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("seq-mean-token-sum-norm needs max_len (the fixed generation budget)")
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = m.sum() if global_tokens is None else global_tokens
        return masked.sum() / _nonzero(denom, loss_mat)
    row_tokens = m.sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        rows = masked.sum(-1) / row_tokens.clamp_min(1)  # (B,) empty rows give 0
    elif mode == "seq-mean-token-sum":
        rows = masked.sum(-1)  # (B,)
    elif mode == "seq-mean-token-sum-norm":
        rows = masked.sum(-1) / max_len  # (B,)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; known: {', '.join(AGG_MODES)}")
    denom = (row_tokens > 0).sum() if global_seqs is None else global_seqs
    return rows.sum() / _nonzero(denom, loss_mat)


def _nonzero(denom, like):
    """A divisor that is 1 where it would be 0 (the numerator is then 0 too: empty batch -> 0)."""
    d = torch.as_tensor(denom, dtype=like.dtype, device=like.device)
    return torch.where(d > 0, d, 1.0)


# -----------------------------------------------------------------------------------------------
# Policy losses


def kl_k3(logp, ref_logp):
    """Low-variance KL estimator, per token (B, T) (Schulman's "k3";
    docs/algorithms.md#kl-estimator):

        k = ref_logp - logp,   kl = exp(k) - k - 1   >= 0, = 0 iff logp == ref_logp

    Unbiased for KL(pi || pi_ref) when tokens are sampled from pi. k is clamped to [-20, 20] like
    the policy ratio, so one wild token cannot overflow exp."""
    k = (ref_logp - logp).clamp(-20, 20)  # (B, T)
    return torch.exp(k) - k - 1


def clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip=None):
    """PPO's clipped per-token loss (B, T) and where clipping changed it (B, T) bool.

        loss_t = max(-A * rho_t, -A * clip(rho_t, 1 - eps_low, 1 + eps_high))    (PPO / GRPO)
        where A < 0:  loss_t = min(loss_t, -A * c)   (dual clip, arXiv 1912.09729; c = dual_clip)

    Where the clipped branch wins, clip() has zero gradient: the token stops pushing the policy
    further in the direction its advantage wants. Dual clip bounds the loss (and zeroes the
    gradient) of a negative-advantage token whose ratio exploded. ratio (B, T); advantages (B,) or
    (B, T)."""
    A = advantages.detach()
    if A.dim() == 1 and ratio.dim() == 2:
        A = A[:, None]  # (B, 1) broadcast over tokens
    unclipped = -A * ratio  # (B, T)
    clipped = -A * ratio.clamp(1 - eps_low, 1 + eps_high)  # (B, T)
    loss_t = torch.maximum(unclipped, clipped)
    took_clip = clipped > unclipped  # strict: at rho == 1 nothing counts as clipped
    if dual_clip is not None:
        cap = -A * dual_clip  # (B, 1)
        dual = (A < 0) & (loss_t > cap)  # (B, T)
        loss_t = torch.where(dual, cap, loss_t)
        took_clip = took_clip | dual
    return loss_t, took_clip


# Every policy loss has one signature:
#     loss_fn(logp, old_logp, advantages, mask, algo) -> (loss_t (B, T), clipped (B, T) bool,
#                                                        ratio (B, T))
# logp (B, T) carries the gradient; old_logp (B, T) and advantages (B,) are constants; algo is the
# algorithm's row of ALGOS below (a dict), so a loss reads its own knobs (algo["eps_high"], ...).
# policy_loss() does the rest for every loss alike: aggregation, the optional KL term, metrics.


def ppo_clip_loss(logp, old_logp, advantages, mask, algo):
    """Token-level clipped ratio (GRPO arXiv 2402.03300, DAPO 2503.14476, Dr. GRPO 2503.20783):

        rho_t  = exp(clamp(logp_t - old_logp_t, -20, 20))
        loss_t = clipped_surrogate(rho_t, A_i, eps_low, eps_high, dual_clip)

    Dual clip (c = 3) is verl's default, not part of these papers; algo["dual_clip"] None = off."""
    log_ratio = (logp - old_logp.detach()).clamp(-20, 20)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_t, clipped = clipped_surrogate(ratio, advantages, algo["eps_low"], algo["eps_high"],
                                        algo["dual_clip"])
    return loss_t, clipped, ratio


def gspo_loss(logp, old_logp, advantages, mask, algo):
    """GSPO: one ratio per sequence (arXiv 2507.18071).

        log s_i = clamp(mean_{t valid} (logp_t - old_logp_t), -20, 20)     (geometric mean ratio)
        rho_t   = exp(sg[log s_i] + logp_t - sg[logp_t])                     (sg = stop-gradient)
        loss_t  = max(-A_i * rho_t, -A_i * clip(rho_t, 1 - eps_low, 1 + eps_high)), no dual clip

    rho_t's value is s_i for every token of sequence i (so a whole sequence clips or not together),
    and d rho_t / d logp_t = s_i: with seq-mean-token-mean the gradient is exactly GSPO's
    -A_i * s_i * (1/|y_i|) sum_t grad logp_t, averaged over sequences. The clip range (3e-4 / 4e-4)
    is tiny because a length-normalised sequence ratio moves much less than token ratios."""
    valid = mask > 0  # (B, T)
    token_log_ratio = (logp - old_logp.detach()).clamp(-20, 20)  # (B, T)
    n_tok = valid.sum(-1).clamp_min(1)  # (B,)
    log_s = torch.where(valid, token_log_ratio, 0.0).sum(-1) / n_tok  # (B,) log sequence ratio
    log_s = log_s.clamp(-20, 20)
    ratio = torch.exp(log_s.detach()[:, None] + logp - logp.detach())  # (B, T) value s_i, grad s_i
    loss_t, clipped = clipped_surrogate(ratio, advantages, algo["eps_low"], algo["eps_high"], None)
    return loss_t, clipped, ratio


def cispo_loss(logp, old_logp, advantages, mask, algo):
    """CISPO: clip the importance weight, not the update (MiniMax-M1, arXiv 2506.13585).

        w_t    = sg[clip(rho_t, 1 - eps_low, 1 + eps_high)],  rho_t = exp(logp_t - old_logp_t)
        loss_t = -w_t * A_i * logp_t

    Unlike PPO clipping, a token whose ratio left the range keeps its gradient (scaled by the
    clipped weight), so rare tokens are never dropped from the update. The paper sets no lower
    bound (eps_low 1: weights down to 0) and tunes eps_high; 0.28 is our choice, the paper does
    not state its value. Aggregated with token-mean over the whole step, as in the paper."""
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20, 20))  # (B, T)
    weight = ratio.clamp(1 - algo["eps_low"], 1 + algo["eps_high"]).detach()  # (B, T)
    loss_t = -weight * advantages.detach()[:, None] * logp  # (B, T)
    return loss_t, weight != ratio.detach(), ratio


# The algorithms, one row each, every default visible. A new algorithm is one loss function above
# (the signature in the comment before ppo_clip_loss) and one row here; --algo NAME then works in
# rlvr.py and align.py, and any knob can be overridden from their command lines.
#   loss              the per-token loss function
#   norm_std          advantages divided by the group's std (False: Dr. GRPO's mean-only)
#   agg               aggregation of the (B, T) loss matrix (see aggregate)
#   eps_low/eps_high  clip range below / above 1
#   dual_clip         bound on the loss of negative-advantage tokens (None = off)
#   dynamic_sampling  drop groups whose rollouts all score the same, and sample more (DAPO)
#   overlong_buffer   DAPO's soft length penalty over the last fraction of the budget (0 = off)
ALGOS = {
    "grpo": dict(loss=ppo_clip_loss, norm_std=True, agg="seq-mean-token-mean", eps_low=0.2,
                 eps_high=0.2, dual_clip=3.0, dynamic_sampling=False, overlong_buffer=0.0),
    "dapo": dict(loss=ppo_clip_loss, norm_std=True, agg="token-mean", eps_low=0.2,
                 eps_high=0.28, dual_clip=3.0, dynamic_sampling=True, overlong_buffer=0.25),
    "gspo": dict(loss=gspo_loss, norm_std=True, agg="seq-mean-token-mean", eps_low=3e-4,
                 eps_high=4e-4, dual_clip=None, dynamic_sampling=False, overlong_buffer=0.0),
    "drgrpo": dict(loss=ppo_clip_loss, norm_std=False, agg="seq-mean-token-sum-norm",
                   eps_low=0.2, eps_high=0.2, dual_clip=3.0, dynamic_sampling=False,
                   overlong_buffer=0.0),
    "cispo": dict(loss=cispo_loss, norm_std=True, agg="token-mean", eps_low=1.0, eps_high=0.28,
                  dual_clip=None, dynamic_sampling=False, overlong_buffer=0.0),
}


def algo(name, **overrides):
    """ALGOS[name] (plus its name) with some knobs replaced, e.g. algo("dapo", eps_high=0.3).
    Unknown names and knobs are errors, so a typo never silently trains the default."""
    if name not in ALGOS:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGOS)}")
    unknown = set(overrides) - set(ALGOS[name])
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(sorted(unknown))}; "
                         f"it has: {', '.join(ALGOS[name])}")
    return dict(ALGOS[name], name=name, **overrides)


def policy_loss(logp, old_logp, advantages, mask, algo, budget=None, step_tokens=None,
                step_seqs=None, kl_coef=0.0, ref_logp=None):
    """The loss of one micro-batch -> (loss, metrics of python floats).

        loss_t = algo["loss"](logp, old_logp, advantages, mask, algo)              (B, T)
        loss   = aggregate(loss_t, mask, algo["agg"], budget, step_tokens, step_seqs)
                 [+ kl_coef * aggregate(kl_k3(logp, ref_logp), same)]

    budget: the fixed generation budget (seq-mean-token-sum-norm divides by it); step_tokens /
    step_seqs: the whole optimizer step's valid-token and sequence counts over all ranks, so that
    the micro-batches' losses add up to the step's (see aggregate). Shapes: logp, old_logp, mask
    (B, T); advantages (B,). PRISM uses kl_coef 0."""
    loss_t, clipped, ratio = algo["loss"](logp, old_logp, advantages, mask, algo)  # (B, T) each
    agg = (algo["agg"], budget, step_tokens, step_seqs)
    loss = aggregate(loss_t, mask, *agg)
    valid = mask > 0  # (B, T)
    n = max(int(valid.sum()), 1)

    def vmean(x):
        return float(torch.where(valid, x.detach().float(), 0.0).sum()) / n

    log_ratio = (logp - old_logp).detach().clamp(-20, 20)  # (B, T)
    metrics = {
        "clip_frac": vmean(clipped),
        "ratio_mean": vmean(ratio),
        "ratio_max": float(ratio.detach()[valid].max()) if valid.any() else 0.0,
        # k3 estimate of KL(pi_old || pi) on samples from pi_old: (rho - 1) - log rho >= 0
        "approx_kl": vmean(torch.exp(log_ratio) - 1 - log_ratio),
    }
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp (log-probs of the reference model)")
        kl_t = kl_k3(logp, ref_logp.detach())  # (B, T)
        loss = loss + kl_coef * aggregate(kl_t, mask, *agg)
        metrics["kl"] = vmean(kl_t)
    return loss, metrics


# -----------------------------------------------------------------------------------------------
# Discriminator (PRISM alignment stage)


def bt_loss(teacher_scores, student_scores, valid, n_valid=None):
    """Bradley-Terry loss, the teacher should outscore the student (arXiv 2604.28123):

        L = mean_{i valid} -log sigmoid(t_i - s_i)        (F.logsigmoid: stable for any gap)

    teacher_scores, student_scores (B,); valid (B,) bool. No valid row -> 0, still attached to the
    graph; the paper's all-invalid fallback is a different loss and lives in disc_loss. Invalid rows
    are excluded with where(), so whatever score they carry cannot leak into the loss. n_valid:
    the mean's denominator when these rows are one chunk of a larger batch (default: their own
    count)."""
    v = valid.bool()
    per_row = torch.where(v, -F.logsigmoid(teacher_scores - student_scores), 0.0)  # (B,)
    return per_row.sum() / max(int(v.sum()) if n_valid is None else n_valid, 1)


def disc_loss(t_cap, t_cot, s_cap, s_cot, valid, reg=1e-3, fallback=0.01, any_valid=None,
              n_valid=None, n_rows=None):
    """PRISM discriminator loss (arXiv 2604.28123;
    docs/algorithms.md#discriminator-loss) -> (loss, metrics).

        L_D = BT(t_cap, s_cap) + BT(t_cot, s_cot)                   over format-valid rollouts
              + reg * mean_i(s_cap^2 + s_cot^2 + t_cap^2 + t_cot^2) / 4   over ALL rows of the batch
    and when no rollout of the step is valid (on any rank):
        L_D = fallback * (-log sigmoid(mean t_cap) - log sigmoid(mean t_cot))      (no reg term)

    Readings of the paper: the score regulariser's mean is not restricted to valid rows (the BT
    terms say mean_valid, it says mean), so it averages every row; the fallback replaces the whole
    loss, so it carries no reg term. It keeps the teacher scores moving up (and D's graph alive for
    DDP) when every rollout broke the format. any_valid is a python bool the caller computes across
    ranks (one all-reduce); None = valid.any() of this batch. BT means are per rank.
    Chunks: with n_valid / n_rows (the whole batch's valid-row and row counts) the BT and
    regulariser means divide by those, so the losses of chunks of the batch add up to the batch's
    loss (not for the fallback, whose mean sits inside a log-sigmoid: give it the whole batch).
    All inputs (B,); valid (B,) bool. metrics (floats, 0 when nothing is valid): acc_cap/acc_cot =
    fraction of valid rows with t > s, gap_cap/gap_cot = mean of t - s over valid rows."""
    v = valid.bool()
    if any_valid is None:
        any_valid = bool(v.any())
    if any_valid:
        loss = bt_loss(t_cap, s_cap, v, n_valid) + bt_loss(t_cot, s_cot, v, n_valid)
        squares = (s_cap ** 2 + s_cot ** 2 + t_cap ** 2 + t_cot ** 2).sum()
        loss = loss + reg * squares / (len(v) if n_rows is None else n_rows) / 4
    else:
        loss = fallback * (-F.logsigmoid(t_cap.mean()) - F.logsigmoid(t_cot.mean()))
    n = max(int(v.sum()), 1)
    metrics = {}
    for name, t, s in (("cap", t_cap, s_cap), ("cot", t_cot, s_cot)):
        gap = (t - s).detach().float()  # (B,)
        metrics[f"acc_{name}"] = float(((gap > 0) & v).sum()) / n
        metrics[f"gap_{name}"] = float(torch.where(v, gap, 0.0).sum()) / n
    return loss, metrics
