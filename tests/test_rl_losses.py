"""rl_losses.py: numbers worked out by hand from the formulas in REFERENCE.md (sections 3 and 4),
gradients checked with autograd, and the micro-batch / empty-mask edge cases."""
import math

import pytest
import torch

import rl_losses as rl

approx = pytest.approx


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- aggregation
def loss_of(name, logp, old_logp, advantages, mask, kl_coef=0.0, ref_logp=None, **knobs):
    """The micro-batch loss of algorithm `name` with some of its ALGOS knobs overridden."""
    return rl.policy_loss(logp, old_logp, advantages, mask, rl.algo(name, **knobs), budget=4,
                          kl_coef=kl_coef, ref_logp=ref_logp)


L = t([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12])
M = t([1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0])  # row 1 is empty
# valid values: row 0 -> 1, 2 (sum 3); row 2 -> 9, 10, 11 (sum 30); 5 tokens, 2 non-empty rows
EXPECTED = {
    "token-mean": 33 / 5,  # 6.6
    "seq-mean-token-mean": (1.5 + 10) / 2,  # 5.75
    "seq-mean-token-sum": (3 + 30) / 2,  # 16.5
    "seq-mean-token-sum-norm": 33 / (2 * 10),  # 2 sequences, max_len 10 -> 1.65
}


@pytest.mark.parametrize("mode", rl.AGG_MODES)
def test_aggregate_modes(mode):
    assert rl.aggregate(L, M, mode, max_len=10).item() == approx(EXPECTED[mode])
    assert rl.aggregate(L, M.bool(), mode, max_len=10).item() == approx(EXPECTED[mode])


@pytest.mark.parametrize("mode", rl.AGG_MODES)
def test_aggregate_micro_batches_sum_to_full_batch(mode):
    # micro-batch 1 = rows 0, 1 (2 tokens, 1 sequence), micro-batch 2 = row 2 (3 tokens, 1 sequence);
    # each is told the whole step's counts: 5 tokens, 2 non-empty sequences
    kw = {"max_len": 10, "global_tokens": 5, "global_seqs": 2}
    parts = rl.aggregate(L[:2], M[:2], mode, **kw) + rl.aggregate(L[2:], M[2:], mode, **kw)
    assert parts.item() == approx(EXPECTED[mode])
    # without the global counts, the mean of per-micro-batch means is NOT the full-batch value
    if mode == "token-mean":
        naive = (rl.aggregate(L[:2], M[:2], mode) + rl.aggregate(L[2:], M[2:], mode)) / 2  # (1.5 + 10) / 2
        assert naive.item() == approx(5.75)


@pytest.mark.parametrize("mode", rl.AGG_MODES)
def test_aggregate_empty_mask_is_zero_with_graph(mode):
    x = torch.full((2, 3), float("inf"), requires_grad=True)  # padding garbage must not leak in
    out = rl.aggregate(x, torch.zeros(2, 3), mode, max_len=8)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="max_len"):
        rl.aggregate(L, M, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        rl.aggregate(L, M, "seq-sum")


# ----------------------------------------------------------------------------- clipping
def test_grpo_clipping_values_gradients_and_metrics():
    # row 0, A = +1: ratio 1.5 (> 1.2: clipped, loss -1.2, no gradient), ratio 0.5 (kept, loss -0.5)
    # row 1, A = -1: ratio 0.5 (< 0.8: clipped, loss 0.8, no gradient), ratio 1.5 (kept, loss 1.5)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5)]], requires_grad=True)
    loss, m = loss_of("grpo", logp, torch.zeros(2, 2), t(1, -1), torch.ones(2, 2))
    # seq-mean-token-mean: ((-1.2 - 0.5) / 2 + (0.8 + 1.5) / 2) / 2 = (-0.85 + 1.15) / 2
    assert loss.item() == approx(0.15, abs=1e-6)
    loss.backward()
    # d loss / d logp_t = -A * rho_t * 1 / (|y_i| * n_seqs) = -A * rho_t / 4 on unclipped tokens
    assert logp.grad.tolist() == [[0.0, approx(-0.125)], [0.0, approx(0.375)]]
    assert m["clip_frac"] == approx(0.5)
    assert m["ratio_mean"] == approx(1.0) and m["ratio_max"] == approx(1.5)
    # k3 per token: rho - 1 - log rho = 0.094535 (1.5), 0.193147 (0.5); two of each
    assert m["approx_kl"] == approx((0.0945349 + 0.1931472) / 2, abs=1e-6)


def test_dapo_clip_higher():
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)  # A > 0, ratio 1.25: 1.2 < 1.25 < 1.28
    loss, m = loss_of("dapo", logp, torch.zeros(1, 1), t(1), torch.ones(1, 1))
    assert loss.item() == approx(-1.25) and m["clip_frac"] == 0.0
    loss, m = loss_of("grpo", logp, torch.zeros(1, 1), t(1), torch.ones(1, 1))
    assert loss.item() == approx(-1.2) and m["clip_frac"] == 1.0


def test_dual_clip_caps_negative_advantage():
    logp = torch.tensor([[2.0]], requires_grad=True)  # ratio e^2 = 7.389, A = -1
    loss, m = loss_of("grpo", logp, torch.zeros(1, 1), t(-1), torch.ones(1, 1))
    assert loss.item() == approx(3.0)  # -A * c
    loss.backward()
    assert logp.grad.item() == 0.0 and m["clip_frac"] == 1.0
    logp.grad = None
    loss, m = loss_of("grpo", logp, torch.zeros(1, 1), t(-1), torch.ones(1, 1), dual_clip=None)
    assert loss.item() == approx(math.exp(2))
    loss.backward()
    assert logp.grad.item() == approx(math.exp(2)) and m["clip_frac"] == 0.0


def test_huge_log_ratio_is_clamped():
    loss, m = loss_of("grpo", torch.tensor([[100.0]]), torch.zeros(1, 1), t(1), torch.ones(1, 1), eps_high=1e9)
    assert m["ratio_max"] == approx(math.exp(20)) and math.isfinite(loss.item())


# ----------------------------------------------------------------------------- GSPO
def test_gspo_sequence_ratio_and_gradient():
    # row 0: log ratios 1e-4, -1e-4, 3e-4 (mean 1e-4), A = +1; row 1: 2e-4, 0 (mean 1e-4), A = -2;
    # the masked entry (5.0) must not count. s = exp(1e-4) = 1.000100005, inside [1-3e-4, 1+4e-4].
    old = torch.zeros(2, 3)
    logp = torch.tensor([[1e-4, -1e-4, 3e-4], [2e-4, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = t([1, 1, 1], [1, 1, 0])
    loss, m = loss_of("gspo", logp, old, t(1, -2), mask)
    s = math.exp(1e-4)
    assert m["ratio_mean"] == approx(s) and m["ratio_max"] == approx(s) and m["clip_frac"] == 0.0
    assert loss.item() == approx((-1 * s + 2 * s) / 2)  # every token's loss is -A_i * s_i
    loss.backward()
    # d loss / d logp_t = -A_i * s_i / |y_i| / n_seqs
    g = logp.grad.tolist()
    assert g[0] == approx([-s / 3 / 2] * 3)  # -0.166683
    assert g[1] == approx([2 * s / 2 / 2, 2 * s / 2 / 2, 0.0])  # 0.50005, masked token 0


def test_gspo_clips_whole_sequences():
    # row 0: mean log ratio 1e-3 -> s = 1.0010005 > 1 + 4e-4, A = +1: clipped
    # row 1: mean -5e-4 -> s = 0.9995 < 1 - 3e-4, A = -1: clipped
    # row 2: mean -5e-4 but A = +1: the unclipped branch is larger, kept
    logp = torch.tensor([[2e-3, 0.0], [-1e-3, 0.0], [-1e-3, 0.0]], requires_grad=True)
    loss, m = loss_of("gspo", logp, torch.zeros(3, 2), t(1, -1, 1), torch.ones(3, 2))
    assert m["clip_frac"] == approx(4 / 6)
    # row losses -1.0004, +0.9997, -exp(-5e-4); seq-mean
    assert loss.item() == approx((-1.0004 + 0.9997 - math.exp(-5e-4)) / 3, abs=1e-6)
    loss.backward()
    assert logp.grad[:2].abs().max().item() == 0.0
    assert logp.grad[2].tolist() == approx([-math.exp(-5e-4) / 2 / 3] * 2, rel=1e-4)


# ----------------------------------------------------------------------------- on-policy
LENGTHS = [3, 1, 2, 4]
A = t(1, -1, 2, 0.5)


def on_policy(algo):
    torch.manual_seed(0)
    logp = (-torch.rand(4, 4)).requires_grad_()  # (B, T)
    mask = (torch.arange(4)[None] < torch.tensor(LENGTHS)[:, None]).float()  # (B, T)
    loss, m = loss_of(algo, logp, logp.detach(), A, mask)
    loss.backward()
    return loss.item(), logp.grad, mask, m


@pytest.mark.parametrize("algo", ["grpo", "gspo"])
def test_on_policy_seq_mean_token_mean(algo):
    loss, grad, mask, m = on_policy(algo)
    assert loss == approx(-(1 - 1 + 2 + 0.5) / 4)  # -mean_i A_i = -0.625
    expected = -A[:, None] / torch.tensor(LENGTHS, dtype=torch.float32)[:, None] / 4 * mask  # -A_i / (|y_i| n)
    assert torch.allclose(grad, expected, atol=1e-6)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == approx(1.0) and m["approx_kl"] == approx(0.0)


def test_on_policy_dapo_token_mean():
    loss, grad, mask, _ = on_policy("dapo")
    assert loss == approx(-(1 * 3 - 1 * 1 + 2 * 2 + 0.5 * 4) / 10)  # -sum_i A_i |y_i| / N_tok = -0.8
    assert torch.allclose(grad, -A[:, None] / 10 * mask, atol=1e-6)


def test_gradient_descent_raises_logp_of_positive_advantage():
    for algo in rl.ALGOS:
        logp = torch.full((2, 2), -1.0, requires_grad=True)
        loss, _ = loss_of(algo, logp, logp.detach(), t(1, -1), torch.ones(2, 2))
        loss.backward()
        new = logp.detach() - 0.1 * logp.grad
        assert (new[0] > -1).all() and (new[1] < -1).all(), algo


def test_empty_mask_policy_loss_is_zero():
    for algo in rl.ALGOS:
        logp = torch.zeros(2, 3, requires_grad=True)
        loss, m = loss_of(algo, logp, torch.zeros(2, 3), t(1, -1), torch.zeros(2, 3))
        loss.backward()
        assert loss.item() == 0.0 and all(v == 0.0 for v in m.values()), algo


def test_kl_term():
    assert rl.kl_k3(torch.zeros(2, 2), torch.zeros(2, 2)).abs().max().item() == 0.0
    kl = rl.kl_k3(torch.zeros(1, 1), torch.full((1, 1), math.log(2)))
    assert kl.item() == approx(2 - math.log(2) - 1)  # 0.306853
    assert (rl.kl_k3(torch.randn(5, 5), torch.randn(5, 5)) >= 0).all()
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(2))
    loss, m = loss_of("grpo", logp, logp.detach(), t(1), torch.ones(1, 2), kl_coef=0.1, ref_logp=ref)
    assert loss.item() == approx(-1 + 0.1 * 0.3068528) and m["kl"] == approx(0.3068528)
    with pytest.raises(ValueError, match="ref_logp"):
        loss_of("grpo", logp, logp.detach(), t(1), torch.ones(1, 2), kl_coef=0.1)


# ----------------------------------------------------------------------------- dispatch
def test_algorithm_table_and_errors(monkeypatch):
    logp, old = torch.tensor([[0.1, -0.2]]), torch.zeros(1, 2)
    args = (logp, old, t(1), torch.ones(1, 2))
    assert rl.algo("dapo", eps_high=0.3)["eps_high"] == 0.3 and rl.algo("dapo")["eps_high"] == 0.28
    with pytest.raises(ValueError, match="grpo, dapo, gspo, drgrpo, cispo"):
        rl.algo("ppo")
    with pytest.raises(ValueError, match="no setting clip"):
        rl.algo("grpo", clip=0.1)

    # a new algorithm: one loss function with the common signature + one row of the table
    def reinforce(logp, old_logp, advantages, mask, algo):
        return -advantages[:, None] * logp, torch.zeros_like(mask, dtype=torch.bool), logp.exp()

    monkeypatch.setitem(rl.ALGOS, "reinforce", dict(rl.ALGOS["grpo"], loss=reinforce,
                                                    agg="token-mean"))
    assert rl.policy_loss(*args, rl.algo("reinforce"))[0].item() == approx(-(0.1 - 0.2) / 2)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_one_group():
    # mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> A = +-0.5 / 0.57735 = +-0.866025
    a = rl.group_advantages(t(1, 0, 0, 1), torch.zeros(4, dtype=torch.long))
    assert a.tolist() == approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_group_advantages_interleaved_singleton_and_equal():
    ids = torch.tensor([7, 3, 7, 3, 42, 7, 3, 0, 0, 0])
    r = t(1, 2, 3, 4, 0.7, 5, 9, 1, 1, 1)
    # id 7: 1, 3, 5 -> mean 3, std 2 -> -1, 0, 1
    # id 3: 2, 4, 9 -> mean 5, deviations -3, -1, 4, var 26/2 = 13, std 3.605551
    # id 42: singleton -> mean 0, std 1 -> 0.7;  id 0: all equal -> 0
    a = rl.group_advantages(r, ids)
    expected = [-1, -0.832050, 0, -0.277350, 0.7, 1, 1.109400, 0, 0, 0]
    assert a.tolist() == approx(expected, abs=1e-5)
    # Dr.GRPO: only the mean is removed
    a = rl.group_advantages(r, ids, norm_std=False)
    assert a.tolist() == approx([-2, -3, 0, -1, 0.7, 2, 4, 0, 0, 0], abs=1e-6)


def test_prism_advantages_by_hand():
    # group 5 (mixed): valid T, T, F, T; cap 1, 3, [9], 2 -> invalid becomes min(1, 3, 2) - 1 = 0
    #   cap' = 1, 3, 0, 2: mean 1.5, deviations -.5, 1.5, -1.5, .5, var 5/3, std 1.290994
    #   cot 0, -1, [5], 1 -> invalid becomes -2: cot' = 0, -1, -2, 1: mean -.5, same std
    #   GN cap = -.387298, 1.161895, -1.161895, .387298;  GN cot = .387298, -.387298, -1.161895, 1.161895
    #   A = .5 (GN cap + GN cot) - 1.5 F = 0, .387298, -2.661895, .774597
    # group 2 (all invalid): all scores -1 -> GN 0 -> A = -1.5
    # group 9 (singleton, valid): mean 0, std 1 -> A = .5 * 2 + .5 * 4 = 3
    # group 8 (singleton, invalid): scores -1, -1 -> A = -.5 - .5 - 1.5 = -2.5
    ids = torch.tensor([5, 2, 5, 9, 5, 2, 8, 5])
    cap = t(1, 4, 3, 2, 9, 7, 0, 2)
    cot = t(0, 4, -1, 4, 5, 7, 0, 1)
    valid = torch.tensor([True, False, True, True, False, False, False, True])
    a = rl.prism_advantages(cap, cot, valid, ids)
    assert a.tolist() == approx([0, -1.5, 0.387298, 3, -2.661895, -1.5, -2.5, 0.774597], abs=1e-5)
    # alpha = 1: perception only; format_penalty = 0: invalid rows lose only through their replaced score
    a = rl.prism_advantages(cap, cot, valid, ids, alpha=1.0, format_penalty=0.0)
    assert a.tolist() == approx([-0.387298, 0, 1.161895, 2, -1.161895, 0, -1, 0.387298], abs=1e-5)


def test_prism_advantages_detaches_scores():
    cap = torch.tensor([1.0, 2.0], requires_grad=True)
    a = rl.prism_advantages(cap, cap * 2, torch.tensor([True, True]), torch.zeros(2, dtype=torch.long))
    assert not a.requires_grad


# ----------------------------------------------------------------------------- DAPO extras
def test_overlong_penalty():
    # L_max 100, L_buf 20: no penalty up to 80, linear to -1 at 100, -factor beyond
    lengths = torch.tensor([50, 80, 90, 100, 130])
    assert rl.overlong_penalty(lengths, 100, 20).tolist() == approx([0, 0, -0.5, -1, -1])
    assert rl.overlong_penalty(lengths.float(), 100, 20, factor=2.0).tolist() == approx([0, 0, -1, -2, -2])


def test_dynamic_sampling_keep():
    ids = torch.tensor([0, 1, 0, 1, 2, 3, 3])
    acc = t(1, 1, 0, 1, 1, 0, 0)  # group 0 mixed, 1 all right, 2 singleton, 3 all wrong
    keep = [True, False, True, False, False, False, False]
    assert rl.dynamic_sampling_keep(acc, ids).tolist() == keep
    assert rl.dynamic_sampling_keep(acc.bool(), ids).tolist() == keep


# ----------------------------------------------------------------------------- discriminator
def test_bt_loss_numbers_and_gradient_signs():
    assert rl.bt_loss(t(1), t(0), torch.tensor([True])).item() == approx(0.3132617)  # log(1 + e^-1)
    teacher = torch.tensor([1.0, 0.0, 5.0], requires_grad=True)
    student = torch.tensor([0.0, 0.0, -100.0], requires_grad=True)
    loss = rl.bt_loss(teacher, student, torch.tensor([True, True, False]))
    assert loss.item() == approx((0.3132617 + math.log(2)) / 2)  # the invalid row does not count
    loss.backward()
    # d/dt = -sigmoid(s - t) / n_valid: descent pushes teacher scores up, student scores down
    assert teacher.grad.tolist() == approx([-0.2689414 / 2, -0.25, 0])
    assert student.grad.tolist() == approx([0.2689414 / 2, 0.25, 0])
    empty = rl.bt_loss(teacher, student, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_disc_loss_with_regulariser():
    t_cap, s_cap = t(1, 2), t(0, 1)
    t_cot, s_cot = t(0, 0), t(1, -1)
    valid = torch.tensor([True, False])
    loss, m = rl.disc_loss(t_cap, t_cot, s_cap, s_cot, valid)
    # BT cap = log(1 + e^-1) = 0.313262, BT cot = log(1 + e) = 1.313262 (row 0 only)
    # reg over all rows: row 0 squares 0 + 1 + 1 + 0 = 2, row 1 1 + 1 + 4 + 0 = 6 -> mean 4, / 4 = 1
    assert loss.item() == approx(0.3132617 + 1.3132617 + 1e-3 * 1)
    assert m == approx({"acc_cap": 1.0, "acc_cot": 0.0, "gap_cap": 1.0, "gap_cot": -1.0})
    # another rank had valid rows, this one none: only the regulariser is left here
    loss, _ = rl.disc_loss(t_cap, t_cot, s_cap, s_cot, torch.zeros(2, dtype=torch.bool), any_valid=True)
    assert loss.item() == approx(1e-3)


def test_disc_loss_all_invalid_fallback():
    t_cap = torch.tensor([1.0, 3.0], requires_grad=True)  # mean 2
    t_cot = torch.tensor([0.0, 0.0], requires_grad=True)  # mean 0
    loss, m = rl.disc_loss(t_cap, t_cot, t(5, 5), t(5, 5), torch.zeros(2, dtype=torch.bool))
    # 0.01 * (log(1 + e^-2) + log 2) = 0.01 * (0.126928 + 0.693147); no reg term
    assert loss.item() == approx(0.01 * (0.1269280 + 0.6931472))
    assert m == {"acc_cap": 0.0, "acc_cot": 0.0, "gap_cap": 0.0, "gap_cot": 0.0}
    loss.backward()
    assert (t_cap.grad < 0).all() and (t_cot.grad < 0).all()  # descent raises the teacher scores


def test_on_policy_gspo_gradient_equals_grpo_gradient():
    # ratio 1 everywhere: GSPO's token ratio exp(sg[log s] + logp - sg[logp]) has gradient s_i = 1 per
    # token, GRPO's has 1 too, both aggregate seq-mean-token-mean: identical updates (README)
    torch.manual_seed(0)
    logp = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([0.7, -1.2, 0.5])
    grads = []
    for algo in ("grpo", "gspo"):
        x = logp.clone().requires_grad_(True)
        loss, _ = loss_of(algo, x, logp, adv, mask)
        loss.backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_on_policy_drgrpo_divides_by_sequences_and_budget():
    # seq-mean-token-sum-norm: sum_i sum_t -A_i / (N_seq * budget), budget 4 (loss_of), 4 sequences
    loss, grad, mask, _ = on_policy("drgrpo")
    assert loss == approx(-(1 * 3 - 1 * 1 + 2 * 2 + 0.5 * 4) / (4 * 4))  # -0.5
    assert torch.allclose(grad, -A[:, None] / 16 * mask, atol=1e-6)
    assert rl.ALGOS["drgrpo"]["norm_std"] is False  # its advantage is r - mean_g (no std)


def test_cispo_clips_the_weight_but_keeps_the_gradient():
    # row 0, A = +1, ratio 1.5: weight clipped to 1.28, the token still gets gradient -1.28 / 2;
    # row 1, A = -1, ratio 0.5: inside [0, 1.28], gradient +0.5 / 2 (token-mean over 2 tokens)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)
    loss, m = loss_of("cispo", logp, torch.zeros(2, 1), t(1, -1), torch.ones(2, 1))
    assert loss.item() == approx((-1.28 * math.log(1.5) + 0.5 * math.log(0.5)) / 2)
    loss.backward()
    assert logp.grad.flatten().tolist() == [approx(-0.64), approx(0.25)]
    assert m["clip_frac"] == approx(0.5)
    # where PPO clipping drops the same token's gradient entirely
    logp.grad = None
    loss_of("grpo", logp, torch.zeros(2, 1), t(1, -1), torch.ones(2, 1))[0].backward()
    assert logp.grad.flatten().tolist() == [0.0, 0.0]
