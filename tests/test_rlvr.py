"""RLVR end to end on the tiny model: every algorithm runs, off-policy updates clip, resume is exact,
the difficulty filter and torchrun work, and the clipped update moves log-probs the right way."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import model as models
import rl_losses
import rlvr
import rollout
from helpers import fake_reward, torchrun, write_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), n_rl=12)


def args(dataset, out_dir, *extra):
    return ["--model", "tiny", "--data", f"{dataset}/rl_prompts.parquet", "--val_data", f"{dataset}/val.parquet",
            "--out_dir", str(out_dir), "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "12",
            "--eval_rows", "4", "--threads", "1", "--samples_every", "1", *extra]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo"])
def test_each_algorithm_runs_and_logs(dataset, tmp_path, algo):
    rlvr.main(args(dataset, tmp_path, "--algo", algo, "--steps", "2", "--eval_every", "0"))
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [0, 1, 2]  # step 0 = the held-out starting point
    for key in ("loss", "reward_mean", "acc_mean", "format_rate", "clip_frac", "grad_norm", "response_len",
                "tokens_per_s", "peak_mem_mb", "kept_frac"):
        assert key in m[1], key
    assert "val_acc" in m[-1] and os.path.exists(tmp_path / "final" / "model.safetensors")
    assert m[1]["gen_rounds"] == (4 if algo == "dapo" else 1)  # a random policy never answers right: all refills fail
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert samples and {"prompt", "response", "reward", "advantage"} <= set(samples[0])


def test_off_policy_minibatches_move_the_ratio(dataset, tmp_path, monkeypatch):
    # two PPO epochs x two mini-batches: only the first optimizer step is on-policy. With an lr this
    # large the later ones see ratios away from 1 and clipping fires
    monkeypatch.setattr(data, "reward", fake_reward)
    rlvr.main(args(dataset, tmp_path, "--steps", "1", "--ppo_epochs", "2", "--mini_batches", "2",
                   "--lr", "3e-2", "--eval_every", "0"))
    m = metrics(tmp_path)[1]
    assert m["ratio_mean"] != 1.0 and m["clip_frac"] > 0 and m["grad_norm"] > 0


def test_on_policy_loss_is_about_zero_but_gradient_is_not(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "reward", fake_reward)
    rlvr.main(args(dataset, tmp_path, "--steps", "1", "--eval_every", "0"))
    m = metrics(tmp_path)[1]
    assert m["ratio_mean"] == 1.0 and m["clip_frac"] == 0.0 and abs(m["loss"]) < 1e-4 and m["grad_norm"] > 0


def test_resume_replays_exactly(dataset, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common_args = ("--steps", "4", "--save_every", "2", "--eval_every", "0", "--algo", "dapo", "--overlong_buffer", "4")
    rlvr.main(args(dataset, full, *common_args))
    rlvr.main(args(dataset, part, *common_args, "--stop_after", "3"))
    rlvr.main(args(dataset, part, *common_args, "--resume"))
    a, b = metrics(full), metrics(part)
    keys = ("step", "loss", "reward_mean", "grad_norm", "response_len")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    from safetensors.torch import load_file
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_difficulty_filter_writes_and_uses_its_file(dataset, tmp_path, monkeypatch):
    # a random policy passes nothing, so every prompt would be dropped: fake the estimates instead
    monkeypatch.setattr(rollout, "pass_rates", lambda m, p, rows, *a, **k: [0.5, 0.0, 1.0] * (len(rows) // 3)
                        + [0.25] * (len(rows) % 3))
    out = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: out.append(" ".join(map(str, a))))
    rlvr.main(args(dataset, tmp_path, "--steps", "1", "--difficulty_filter", "--eval_every", "0"))
    rates = json.load(open(tmp_path / "difficulty_filter.json"))["pass_rates"]
    assert len(rates) == 12
    assert any("kept 4 of 12 prompts" in line for line in out)


def test_kl_against_the_disabled_adapter(dataset, tmp_path):
    rlvr.main(args(dataset, tmp_path, "--steps", "1", "--lora", "--kl_coef", "0.1", "--eval_every", "0"))
    assert "kl" in metrics(tmp_path)[1]


def test_bad_prompt_file_is_one_line(tmp_path):
    bad = tmp_path / "rl.jsonl"
    bad.write_text('{"prompt": "how many?", "images": ["nope.png"], "reward_model": {"ground_truth": "2"}}\n')
    p = subprocess.run([sys.executable, "rlvr.py", "--model", "tiny", "--data", str(bad), "--out_dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "rl.jsonl row 1" in p.stderr and "missing" in p.stderr


def test_torchrun_two_processes(dataset, tmp_path):
    torchrun("rlvr.py", *args(dataset, tmp_path, "--steps", "2", "--algo", "dapo", "--eval_every", "0"))
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]


def test_update_raises_logprob_of_positive_advantage(dataset):
    """The whole path (rollout -> completion_logprobs -> policy_loss -> AdamW) moves the policy the way
    the advantage says: up for A > 0, down for A < 0."""
    torch.manual_seed(0)
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    rows = data.load_prompts(str(dataset / "rl_prompts.parquet"))[:1]
    r = rollout.sample(m, processor, rows, n=2, max_new_tokens=8)
    adv = torch.tensor([1.0, -1.0])
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    before = (r.logp * r.mask).sum(-1)
    rollout.policy_update(m, opt, params, r, adv, torch.arange(2), algo="grpo", loss_kwargs={}, grad_clip=0)
    with torch.no_grad():
        after = (rollout.completion_logprobs(m, r, torch.arange(2)) * r.mask).sum(-1)
    assert after[0] > before[0] and after[1] < before[1]
    assert rl_losses.LOSSES["grpo"] is rl_losses.grpo_loss


def test_a_new_loss_is_one_function_and_one_dict_entry(dataset, tmp_path, monkeypatch):
    # the README's example, verbatim: vanilla policy gradient (REINFORCE with the group baseline)
    def pg_loss(logp, old_logp, advantages, mask, agg="token-mean", max_len=None,
                global_tokens=None, global_seqs=None):
        """L = -A_i * logp_t: no ratio, no clipping (Williams 1992)."""
        loss_t = -advantages.detach()[:, None] * logp  # (B, T)
        loss = rl_losses.aggregate(loss_t, mask, agg, max_len, global_tokens, global_seqs)
        return loss, {"pg_tokens": float(mask.sum())}

    monkeypatch.setitem(rl_losses.LOSSES, "pg", pg_loss)
    monkeypatch.setattr(data, "reward", fake_reward)
    rlvr.main(args(dataset, tmp_path, "--algo", "pg", "--steps", "1", "--eval_every", "0"))
    assert metrics(tmp_path)[1]["grad_norm"] > 0


def test_unknown_algo_is_one_line(dataset, tmp_path):
    with pytest.raises(SystemExit, match="not in rl_losses.LOSSES"):
        rlvr.main(args(dataset, tmp_path, "--algo", "ppo2"))


def test_gradient_checkpointing_takes_the_plain_forward(dataset, tmp_path, monkeypatch):
    # checkpointing cannot hand back the prompt's cache: completion_logprobs must notice and fall back
    calls = []
    real = rollout.completion_logprobs
    monkeypatch.setattr(rollout, "completion_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(data, "reward", fake_reward)
    rlvr.main(args(dataset, tmp_path, "--steps", "1", "--grad_ckpt", "--eval_every", "0"))
    assert calls and metrics(tmp_path)[1]["grad_norm"] > 0
