"""Alignment end to end on the tiny models: one step changes both the policy and the discriminator,
each discriminator ablation runs, resume is exact, torchrun works, bad settings fail in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import align
import data
import model as models
from helpers import fake_split_segments, torchrun, write_task

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
    for sub in ("model.safetensors", "discriminator/model.safetensors"):
        a, b = load_file(full / "final" / sub), load_file(part / "final" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_missing_discriminator_folder_is_one_line(dataset, tmp_path):
    p = subprocess.run([sys.executable, "align.py", *args(dataset, tmp_path)[:2], "--disc", str(tmp_path / "nope"),
                        *args(dataset, tmp_path)[4:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "discriminator.py warmup" in p.stderr


def test_torchrun_two_processes(dataset, tmp_path):
    torchrun("align.py", *args(dataset, tmp_path, "--steps", "2"))
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
    assert os.path.exists(tmp_path / "final" / "discriminator" / "model.safetensors")


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
