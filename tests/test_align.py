"""Alignment end to end on the tiny models: one step changes both the policy and the discriminator,
each discriminator ablation runs, resume is exact, torchrun works, bad settings fail in one line.

A random policy never writes the answer format, so every rollout is invalid, every advantage 0
and the discriminator only sees its fallback loss. Tests that claim learning therefore make
answers count as valid (helpers.fake_split_segments) and check the gradients were not zero, and
the direction of learning is checked where the answer is known: on fixed teacher vs student
segments the discriminator's teacher-minus-student gap grows; against a stand-in discriminator
with known preferences the policy moves towards what it scores high, and the advantages the
update used are alpha / format_penalty's; many micro-batches, one process or two, give the one
big batch's policy gradient."""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from safetensors.torch import load_file

import align
import data
import discriminator
import model as models
import rl_losses
import rollout
from helpers import (fake_reward, fake_split_segments, first_token_mean, letter_count,
                     sample_per_prompt, torchrun, write_task)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), n_align=8)


def args(dataset, out_dir, *extra):
    return ["--model", "tiny", "--disc", "tiny", "--data", f"{dataset}/align_prompts.parquet",
            "--val_data", f"{dataset}/val.parquet", "--out_dir", str(out_dir), "--prompts_per_step", "2",
            "--group_size", "4", "--max_new_tokens", "12", "--eval_rows", "4", "--threads", "1",
            "--samples_every", "1", "--eval_every", "0", *extra]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def fake_valid_texts(monkeypatch):
    """Make half of the rollouts valid answers, so the Bradley-Terry path (not only the
    all-invalid fallback) runs: a random policy never writes the format itself."""
    monkeypatch.setattr(data, "split_segments", fake_split_segments)


def test_one_step_changes_policy_and_discriminator(dataset, tmp_path, monkeypatch):
    fake_valid_texts(monkeypatch)
    align.main(args(dataset, tmp_path, "--steps", "1", "--lr", "1e-2", "--disc_lr", "1e-2"))
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [0, 1]
    for key in ("gap_cap", "gap_cot", "disc_acc_cap", "disc_acc_cot", "format_rate", "response_len",
                "router_load_cap", "disc_loss", "grad_norm", "tokens_per_s", "peak_mem_mb"):
        assert key in m[1], key
    assert len(m[1]["router_load_cap"]) == 4 and abs(sum(m[1]["router_load_cap"]) - 1) <= 2e-3  # 4 values rounded to 3 digits
    # AdamW's weight decay changes weights even without a gradient: check there was one
    assert m[1]["grad_norm"] > 0 and m[1]["disc_grad_norm"] > 0 and m[1]["disc_fallback"] == 0
    # the initial weights: the tiny policy as built, and a fresh discriminator on the same seed
    import discriminator
    torch.manual_seed(0)
    disc0, _ = discriminator.build("tiny", torch.device("cpu"), seed=0)
    pol0 = load_file(os.path.join(models.build_embedded("tiny"), "model.safetensors"))
    pol1 = load_file(tmp_path / "final" / "model.safetensors")
    disc1 = load_file(tmp_path / "final" / "discriminator" / "model.safetensors")
    assert any(not torch.equal(pol0[k], pol1[k]) for k in pol1 if k in pol0)
    d0 = disc0.state_dict()
    assert any(not torch.equal(d0[k], disc1[k]) for k in disc1)
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {"response", "teacher", "s_cap", "s_cot", "t_cap", "t_cot", "advantage"} <= set(samples[0])


@pytest.mark.parametrize("kind", ["dense", "text-only"])
def test_ablation_discriminators_run(dataset, tmp_path, kind, monkeypatch):
    fake_valid_texts(monkeypatch)
    align.main(args(dataset, tmp_path, "--steps", "1", "--disc_kind", kind, "--disc_steps", "2"))
    cfg = json.load(open(tmp_path / "final" / "discriminator" / "disc_config.json"))
    assert cfg["kind"] == kind


def test_resume_replays_exactly(dataset, tmp_path, monkeypatch):
    fake_valid_texts(monkeypatch)
    full, part = tmp_path / "full", tmp_path / "part"
    rest = ("--steps", "3", "--save_every", "1")
    align.main(args(dataset, full, *rest))
    align.main(args(dataset, part, *rest, "--stop_after", "2"))
    align.main(args(dataset, part, *rest, "--resume"))
    keys = ("step", "loss", "gap_cap", "gap_cot", "disc_loss", "grad_norm")
    assert [[r.get(k) for k in keys] for r in metrics(full)] == [[r.get(k) for k in keys] for r in metrics(part)]
    # both models learn at every step: a resume that lost either optimizer's state would show
    for r in metrics(full)[1:]:
        assert r["grad_norm"] > 0 and r["disc_grad_norm"] > 0 and r["disc_fallback"] == 0
    for sub in ("model.safetensors", "discriminator/model.safetensors"):
        a, b = load_file(full / "final" / sub), load_file(part / "final" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_missing_discriminator_folder_is_one_line(dataset, tmp_path):
    p = subprocess.run([sys.executable, "align.py", *args(dataset, tmp_path)[:2], "--disc", str(tmp_path / "nope"),
                        *args(dataset, tmp_path)[4:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "python warmup.py" in p.stderr


def test_torchrun_two_processes(dataset, tmp_path, monkeypatch):
    """One policy step in many micro-batches (--token_budget 1), in one process and in two, gives
    the one big batch's policy gradient. The stand-ins of tests/patched_stage.py (half the answers
    valid, rollouts seeded per prompt) make all three runs score and train on the same rollouts;
    the discriminator's pre-update scores, and hence the advantages, are the same too."""
    monkeypatch.setattr(data, "split_segments", fake_split_segments)
    monkeypatch.setattr(data, "reward", fake_reward)
    monkeypatch.setattr(rollout, "sample", sample_per_prompt(rollout.sample))
    flags = ("--steps", "1", "--eval_rows", "0", "--samples_every", "0")
    align.main(args(dataset, tmp_path / "big", *flags, "--token_budget", "65536"))
    align.main(args(dataset, tmp_path / "micro", *flags, "--token_budget", "1"))
    patched = os.path.join(ROOT, "tests", "patched_stage.py")
    torchrun(patched, "align", *args(dataset, tmp_path / "two", *flags, "--token_budget", "1"),
             env={"PATCHED_SAMPLE_PER_PROMPT": "1"})
    assert os.path.exists(tmp_path / "two" / "final" / "discriminator" / "model.safetensors")
    big = metrics(tmp_path / "big")[-1]
    assert big["grad_norm"] > 0 and 0 < big["format_rate"] < 1
    for run in ("micro", "two"):
        m = metrics(tmp_path / run)
        assert [r["step"] for r in m] == [1]  # rank 0 alone writes
        keys = ["format_rate", "gap_cap", "gap_cot", "s_cap", "t_cot", "grad_norm"]
        # the logged policy loss is rank 0's share of the step's loss: compared in one process only
        for key in keys + ["loss"] * (run == "micro"):
            assert m[-1][key] == pytest.approx(big[key], rel=1e-3, abs=1e-5), (run, key)


def test_discriminator_update_in_chunks_equals_the_whole_batch(dataset, tmp_path, monkeypatch):
    """--disc_chunk 1 backpropagates D's loss one prompt at a time (only that prompt's graphs are
    alive), --disc_grad_ckpt recomputes D's layers in backward: the loss, the gradient norm and hence
    the update must be the whole batch's."""
    fake_valid_texts(monkeypatch)
    align.main(args(dataset, tmp_path / "whole", "--steps", "1", "--prompts_per_step", "3", "--eval_rows", "0"))
    for run, extra in (("chunks", []), ("ckpt", ["--disc_grad_ckpt"])):
        align.main(args(dataset, tmp_path / run, "--steps", "1", "--prompts_per_step", "3", "--eval_rows", "0",
                        "--disc_chunk", "1", "--disc_micro_batch", "2", *extra))
    whole = metrics(tmp_path / "whole")[-1]
    assert whole["disc_fallback"] == 0 and whole["disc_grad_norm"] > 0
    a = load_file(tmp_path / "whole" / "final" / "discriminator" / "model.safetensors")
    for run in ("chunks", "ckpt"):
        other = metrics(tmp_path / run)[-1]
        for key in ("disc_loss", "disc_grad_norm", "gap_cap", "gap_cot", "loss", "grad_norm"):
            assert other[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5), (run, key)
        b = load_file(tmp_path / run / "final" / "discriminator" / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4  # one Adam step of lr 1e-4, up to rounding


def test_negative_disc_chunk_is_one_line(dataset, tmp_path):
    p = subprocess.run([sys.executable, "align.py", *args(dataset, tmp_path, "--disc_chunk", "-1")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--disc_chunk -1" in p.stderr


def test_discriminator_learns_to_prefer_the_teacher(dataset, tmp_path, monkeypatch):
    """A fixed, separable set: every valid rollout has the same student caption and reasoning
    (helpers.fake_split_segments), the teacher's are the task's. With the policy frozen (lr 0),
    D's teacher-minus-student gap, logged from the scores before each step's update, must grow
    step after step; a D trained the wrong way round would shrink it."""
    fake_valid_texts(monkeypatch)
    align.main(args(dataset, tmp_path, "--steps", "3", "--lr", "0", "--disc_lr", "1e-4",
                    "--eval_rows", "0", "--samples_every", "0"))
    m = metrics(tmp_path)
    assert all(r["disc_fallback"] == 0 and r["disc_grad_norm"] > 0 for r in m)
    for key in ("gap_cap", "gap_cot"):
        gaps = [r[key] for r in m]
        assert gaps[0] < gaps[1] < gaps[2] and gaps[2] > 0, (key, gaps)


def stand_in_discriminator(monkeypatch, score_of):
    """Replace D's scores by known preferences, score_of(segment, which) -> float. They carry no
    gradient: run align with --disc_steps 0 (D frozen)."""
    def score(disc, processor, prompts, segments, which, micro_batch=16):
        models.unwrap(disc).stats = {"load": [0.25] * 4, "truncated": 0, "nonfinite": 0}
        return torch.tensor([float(score_of(s, which)) for s in segments]), torch.tensor(0.0)
    monkeypatch.setattr(discriminator, "score", score)


def as_answer(text):
    """(caption, reasoning) segments made of the whole response: every text counts as valid."""
    return f"<caption>{text}</caption>", f"<think>{text}</think><answer>1</answer>"


def test_frozen_discriminator_pulls_the_policy_its_way(dataset, tmp_path, monkeypatch):
    """Direction: a frozen stand-in D that scores a segment by its number of letters e, and every
    answer valid; a few alignment steps must raise the policy's expected number of e's in its
    first token (the same measure as tests/test_rlvr.py's reward-direction test). A sign error
    between scores and update (advantage, loss) lowers it instead. (Seeds 0-4: from 0.200 to
    0.212-0.229.)"""
    monkeypatch.setattr(data, "split_segments", as_answer)
    stand_in_discriminator(monkeypatch, lambda segment, which: segment.count("e"))
    rows = data.load_prompts(str(dataset / "align_prompts.parquet"))
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    value = letter_count(processor, "e")
    before = first_token_mean(m, processor, rows, value)
    align.main(args(dataset, tmp_path, "--steps", "4", "--group_size", "8", "--lr", "1e-3",
                    "--disc_steps", "0", "--eval_rows", "0", "--samples_every", "0",
                    "--save_every", "0"))
    assert all(r["grad_norm"] > 0 for r in metrics(tmp_path))
    trained, _, _ = models.load_model(str(tmp_path / "final"), torch.device("cpu"))
    after = first_token_mean(trained, processor, rows, value)
    assert after > before + 0.005, (before, after)


def test_alpha_and_format_penalty_shape_the_advantages(dataset, tmp_path, monkeypatch):
    """The advantages handed to the policy update are rl_losses.prism_advantages' with the run's
    --alpha and --format_penalty: recomputed here from the rollouts' texts, a stand-in D whose
    caption and reasoning scores differ (letters e vs letters o) and half of the answers valid.
    The two settings must also give different advantages on the same rollouts."""
    def half_valid(text):
        return as_answer(text) if zlib.crc32(text.encode()) % 2 == 0 else (None, None)

    def score_of(segment, which):
        return segment.count("e" if which == "cap" else "o")
    monkeypatch.setattr(data, "split_segments", half_valid)
    stand_in_discriminator(monkeypatch, score_of)
    real, seen = rollout.step_counts, []

    def spy(r, mb, advantages):  # called once per optimizer step, with the step's advantages
        seen.append((r, advantages.clone()))
        return real(r, mb, advantages)
    monkeypatch.setattr(rollout, "step_counts", spy)
    used = []
    for alpha, penalty in ((1.0, 3.0), (0.0, 0.0)):
        seen.clear()
        align.main(args(dataset, tmp_path / str(alpha), "--steps", "1", "--alpha", str(alpha),
                        "--format_penalty", str(penalty), "--disc_steps", "0", "--eval_rows", "0"))
        (r, advantages), = seen
        split = [half_valid(t) for t in r.texts]
        valid = torch.tensor([c is not None for c, _ in split])
        s_cap = torch.tensor([float(score_of(c, "cap")) if c else 0.0 for c, _ in split])
        s_cot = torch.tensor([float(score_of(k, "cot")) if k else 0.0 for _, k in split])
        assert 0 < valid.sum() < len(valid) and not torch.equal(s_cap, s_cot)  # both terms matter
        expected = rl_losses.prism_advantages(s_cap, s_cot, valid, r.group, alpha=alpha,
                                              format_penalty=penalty)
        torch.testing.assert_close(advantages, expected)
        used.append(advantages)
    assert not torch.allclose(used[0], used[1])  # same rollouts, other settings: other advantages
