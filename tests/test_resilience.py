"""Resilience: nothing lost on a kill, no silent wrong result from bad numbers, no pickle from files.

  - kill and resume: each stage is started as a subprocess, SIGKILLed after its first checkpoint (mid-
    step, or inside a deliberately slow save), resumed, and must end bitwise equal to an uninterrupted
    run: weights, optimizer state, data position, RNG streams and logged numbers;
  - checkpoints: a half-written step_N.tmp, a stale `latest` pointer or a half line in metrics.jsonl
    never stop a resume, and it picks the newest complete checkpoint;
  - bad numbers: NaN/Inf injected into logits, discriminator scores or advantages skips the step
    (warning + "bad_steps" counter), and --max_bad_steps in a row stop the run in one line without
    a checkpoint of the poisoned steps; all-equal rewards, empty batches and all-invalid batches log;
  - safe loading: no torch.load without weights_only=True, no pickle, no trust_remote_code=True.
The bad-data side (fuzzed parser, reward and loaders) lives in tests/test_data.py.
"""
import ast
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import align
import common
import data
import discriminator
import rl_losses
import rlvr
import rollout
import sft
from helpers import fake_reward, untimed, write_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One tiny task for all three stages (the sizes of tests/test_sft.py, test_align.py, test_rlvr.py)."""
    return write_task(tmp_path_factory.mktemp("data"), n_sft_public=48, n_sft_teacher=16, n_align=8, n_rl=12)


def sft_args(dataset, out_dir, *extra):
    return ["--data", f"{dataset}/sft_public.json,{dataset}/sft_teacher.json", "--val_data", f"{dataset}/val.parquet",
            "--out_dir", str(out_dir), "--batch_size", "8", "--micro_batch_size", "4", "--eval_rows", "4",
            "--max_new_tokens", "8", "--eval_every", "0", "--threads", "1", *extra]


def rl_args(dataset, out_dir, *extra):
    return ["--model", "tiny", "--data", f"{dataset}/rl_prompts.parquet", "--val_data", f"{dataset}/val.parquet",
            "--out_dir", str(out_dir), "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "12",
            "--eval_rows", "4", "--eval_k", "0", "--eval_every", "0", "--threads", "1", *extra]


def align_args(dataset, out_dir, *extra):
    return ["--model", "tiny", "--disc", "tiny", "--data", f"{dataset}/align_prompts.parquet",
            "--val_data", f"{dataset}/val.parquet", "--out_dir", str(out_dir), "--prompts_per_step", "2",
            "--group_size", "4", "--max_new_tokens", "12", "--eval_rows", "4", "--eval_k", "0", "--eval_every", "0",
            "--threads", "1", *extra]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def last_logged_step(out_dir):
    try:
        lines = open(os.path.join(out_dir, "metrics.jsonl")).read().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError):  # not there yet, or caught mid-line
        return -1


def pointer_step(out_dir):
    try:
        return int(open(os.path.join(out_dir, "ckpt", "latest")).read().strip().split("_")[1])
    except (OSError, ValueError, IndexError):
        return None


def start_and_kill(argv, out_dir, ready, timeout=180):
    """Run `python *argv` in the repo and SIGKILL it the moment ready() holds. Fails if it ends first."""
    with open(os.path.join(os.path.dirname(str(out_dir)), f"{os.path.basename(str(out_dir))}.stderr"), "w+") as err:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + timeout
        while p.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.01)
        alive = p.poll() is None
        p.kill()  # SIGKILL: no handler, no cleanup, no flush
        p.wait()
        err.seek(0)
        assert alive and p.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{err.read()[-3000:]}"


def mid_step_after_checkpoint(out_dir):
    """A checkpoint exists and a later step has been logged: the run is inside the step after."""
    return lambda: (s := pointer_step(out_dir)) is not None and last_logged_step(out_dir) > s


def same(a, b):
    """Bitwise equality of nested dicts / lists / tensors (optimizer and RNG states)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(a, b, steps, weights=("model.safetensors",)):
    """Runs a and b ended in the same state: final weights, the last checkpoint's weights, optimizer
    state, step, data cursor and RNG streams, and the same logged numbers at every step."""
    for name in weights:
        wa, wb = load_file(a / "final" / name), load_file(b / "final" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ca, cb = a / "ckpt" / f"step_{steps:06d}", b / "ckpt" / f"step_{steps:06d}"
    for name in weights:
        assert same(load_file(ca / name), load_file(cb / name)), name
    sa = torch.load(ca / "trainer_state.pt", weights_only=True)
    sb = torch.load(cb / "trainer_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == steps and sa.get("cursor") == sb.get("cursor")
    assert same(sa, sb)  # optimizer moments and step counts, bitwise
    assert same(torch.load(ca / "rng_rank0.pt", weights_only=True), torch.load(cb / "rng_rank0.pt", weights_only=True))
    ma, mb = metrics(a), metrics(b)
    assert untimed(ma) == untimed(mb)  # every number but the timings


# ----------------------------------------------------------------------------- kill and resume

SFT_RUN = ("--steps", "8", "--save_every", "2")


@pytest.fixture(scope="module")
def sft_reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_straight")
    sft.main(sft_args(dataset, out, *SFT_RUN))
    return out


def resumed_from(capsys, path):
    """The resumed run really started from checkpoint `path` (a fresh start would match bitwise too)."""
    assert f"resuming from {path}" in capsys.readouterr().out


def test_sft_killed_mid_step_resumes_bitwise(dataset, sft_reference, tmp_path, capsys):
    run = tmp_path / "run"
    start_and_kill(["sft.py", *sft_args(dataset, run, *SFT_RUN)], run, mid_step_after_checkpoint(run))
    assert not (run / "final").exists()
    # make the wreck worse: a later save that died half-way and a half line at the end of the log
    ckpt = int(pointer_step(run))
    (run / "ckpt" / f"step_{ckpt + 2:06d}.tmp").mkdir(exist_ok=True)
    (run / "ckpt" / f"step_{ckpt + 2:06d}.tmp" / "model.safetensors").write_bytes(b"\x00" * 100)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "lo')
    assert common.latest_checkpoint(str(run)).endswith(f"step_{ckpt:06d}")
    sft.main(sft_args(dataset, run, *SFT_RUN, "--resume"))
    resumed_from(capsys, run / "ckpt" / f"step_{ckpt:06d}")
    assert_same_run(sft_reference, run, 8)
    assert not any(d.endswith(".tmp") for d in os.listdir(run / "ckpt"))  # the next save swept it away


# Runs sft.py with its second checkpoint's save hanging after the weights are written (a slow disk),
# so that the kill lands inside common.save_checkpoint. Test-only patching lives here, not in sft.py.
SLOW_SAVE = """
import sys, time
import model as models, sft
real, calls = models.save_pretrained, []
def slow(model, processor, path):
    calls.append(path)
    real(model, processor, path)
    if len(calls) == 2:
        time.sleep(600)
models.save_pretrained = slow
sft.main(sys.argv[1:])
"""


def test_sft_killed_inside_a_save_keeps_the_previous_checkpoint(dataset, sft_reference, tmp_path, capsys):
    run = tmp_path / "run"
    half = run / "ckpt" / "step_000004.tmp"
    start_and_kill(["-c", SLOW_SAVE, *sft_args(dataset, run, *SFT_RUN)], run,
                   lambda: (half / "model.safetensors").exists())
    assert pointer_step(run) == 2 and half.is_dir() and not (half / "trainer_state.pt").exists()
    assert not (run / "ckpt" / "step_000004").exists()
    assert common.latest_checkpoint(str(run)).endswith("step_000002")
    sft.main(sft_args(dataset, run, *SFT_RUN, "--resume"))
    resumed_from(capsys, run / "ckpt" / "step_000002")
    assert_same_run(sft_reference, run, 8)


FAKE_REWARD = """
import sys
sys.path.insert(0, "tests")
import data, rlvr
from helpers import fake_reward
data.reward = fake_reward
rlvr.main(sys.argv[1:])
"""


def test_rlvr_killed_mid_step_resumes_bitwise(dataset, tmp_path, capsys, monkeypatch):
    run, straight = tmp_path / "run", tmp_path / "straight"
    # DAPO: dynamic sampling refills dropped groups, so the data cursor moves by a varying amount
    rest = ("--steps", "6", "--save_every", "2", "--algo", "dapo", "--overlong_buffer", "4")
    start_and_kill(["-c", FAKE_REWARD, *rl_args(dataset, run, *rest)], run, mid_step_after_checkpoint(run))
    monkeypatch.setattr(data, "reward", fake_reward)
    # a `latest` that names a folder which is gone: the newest complete step_N folder is used instead
    ckpt = pointer_step(run)
    (run / "ckpt" / "latest").write_text("step_000777")
    fallback = common.latest_checkpoint(str(run))
    assert fallback and int(fallback.rsplit("_", 1)[1]) >= ckpt  # (newer if killed just before the pointer moved)
    rlvr.main(rl_args(dataset, run, *rest, "--resume"))
    resumed_from(capsys, fallback)
    rlvr.main(rl_args(dataset, straight, *rest))
    assert_same_run(straight, run, 6)
    m = metrics(run)[1:]
    assert any(r["gen_rounds"] > 1 for r in m) and all(r["grad_norm"] > 0 for r in m)  # refills, real updates


def test_align_killed_mid_step_resumes_bitwise(dataset, tmp_path, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    rest = ("--steps", "5", "--save_every", "2")
    start_and_kill(["align.py", *align_args(dataset, run, *rest)], run, mid_step_after_checkpoint(run))
    ckpt = common.latest_checkpoint(str(run))
    align.main(align_args(dataset, run, *rest, "--resume"))
    resumed_from(capsys, ckpt)
    align.main(align_args(dataset, straight, *rest))
    assert_same_run(straight, run, 5, weights=("model.safetensors", "discriminator/model.safetensors"))
    # a random policy never writes the format: every step used the all-invalid fallback, and says so
    assert all(r["disc_fallback"] == 1 and r["format_rate"] == 0 for r in metrics(run)[1:])


def test_latest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    out = str(tmp_path)
    assert common.latest_checkpoint(out) is None

    def save_model(path):
        torch.save({"w": torch.ones(2)}, os.path.join(path, "w.pt"))
    for step in (1, 2):
        common.save_checkpoint(out, step, save_model, {"step": step}, {"config": {}}, keep=5)
    ckpt = tmp_path / "ckpt"
    os.makedirs(ckpt / "step_000003.tmp")  # a save killed half-way: never chosen
    (ckpt / "step_000003.tmp" / "trainer_state.pt").write_bytes(b"")
    assert common.latest_checkpoint(out).endswith("step_000002")
    (ckpt / "latest").write_text("step_000009")  # a pointer to a folder that is gone
    assert common.latest_checkpoint(out).endswith("step_000002")
    os.remove(ckpt / "latest")  # no pointer at all
    assert common.latest_checkpoint(out).endswith("step_000002")
    os.remove(ckpt / "step_000002" / "trainer_state.pt")  # a folder half-deleted by pruning
    assert common.latest_checkpoint(out).endswith("step_000001")
    assert common.load_trainer_state(common.latest_checkpoint(out))["step"] == 1
    common.save_checkpoint(out, 4, save_model, {"step": 4}, {"config": {}}, keep=5)
    assert not (ckpt / "step_000003.tmp").exists()  # the next complete save sweeps stale .tmp folders


def test_trim_jsonl_drops_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    common.trim_jsonl(str(path), 2)
    common.append_jsonl(str(path), {"step": 3})
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]


# ----------------------------------------------------------------------------- bad numbers

def step_counter(monkeypatch, module, name):
    """Wrap module.name, called once at the start of every training step: returns {"n": current step}."""
    real, state = getattr(module, name), {"n": 0}

    def counted(*a, **k):
        state["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(module, name, counted)
    return state


def poison_logits(monkeypatch, active, value):
    """Add value (nan / inf) to the policy's logits in forwards with gradients (the updates, not
    sampling or evaluation) while active() holds."""
    from transformers import Qwen3VLForConditionalGeneration as cls
    real = cls.forward

    @functools.wraps(real)  # generate() checks its kwargs against forward's signature
    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if torch.is_grad_enabled() and active():
            out.logits = out.logits + value
        return out
    monkeypatch.setattr(cls, "forward", forward)


def assert_stopped(excinfo, k):
    msg = str(excinfo.value.code)
    assert len(msg.splitlines()) == 1 and msg.startswith("error:"), msg
    assert f"{k} steps in a row with NaN/Inf" in msg and "--resume" in msg


def test_sft_nan_logits_skip_steps_then_stop(dataset, tmp_path, monkeypatch, capsys):
    step = step_counter(monkeypatch, sft, "lr_at")  # sft calls lr_at(step) once per step
    poison_logits(monkeypatch, lambda: step["n"] >= 3, float("nan"))
    with pytest.raises(SystemExit) as e:
        sft.main(sft_args(dataset, tmp_path, "--steps", "10", "--save_every", "1", "--max_bad_steps", "3"))
    assert_stopped(e, 3)
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5] and [r["bad_steps"] for r in m] == [0, 0, 1, 2, 3]
    assert all(r["loss"] != r["loss"] for r in m[2:])  # NaN, logged as it was
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_000002")  # none for the poisoned steps
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_000001", "step_000002"]
    weights = load_file(tmp_path / "ckpt" / "step_000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    out = capsys.readouterr().out
    assert "warning: step 3: non-finite loss, grad_norm; update skipped (1 in a row, 1 in all)" in out


def test_rlvr_one_nan_advantage_step_is_skipped_and_the_run_goes_on(dataset, tmp_path, monkeypatch, capsys):
    real, calls = rl_losses.group_advantages, []

    def nan_on_step_2(rewards, group, *a, **k):
        calls.append(1)
        adv = real(rewards, group, *a, **k)
        return adv * float("nan") if len(calls) == 2 else adv
    monkeypatch.setattr(rl_losses, "group_advantages", nan_on_step_2)
    rlvr.main(rl_args(dataset, tmp_path, "--steps", "3", "--save_every", "1"))
    m = metrics(tmp_path)[1:]  # after the step-0 held-out line
    assert [r["bad_steps"] for r in m] == [0, 1, 1]
    assert m[1]["grad_norm"] != m[1]["grad_norm"] and m[2]["grad_norm"] == m[2]["grad_norm"]
    assert os.path.exists(tmp_path / "final" / "model.safetensors")
    state = torch.load(tmp_path / "ckpt" / "step_000003" / "trainer_state.pt", weights_only=True)
    assert state["bad_steps"] == 1
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # 3 steps, 1 skipped
    assert "warning: step 2: non-finite advantages; update skipped" in capsys.readouterr().out


def test_rlvr_inf_logits_stop_the_run(dataset, tmp_path, monkeypatch):
    step = step_counter(monkeypatch, rollout, "prompt_order")  # one call per step without dynamic sampling
    poison_logits(monkeypatch, lambda: step["n"] >= 2, float("inf"))
    with pytest.raises(SystemExit) as e:
        rlvr.main(rl_args(dataset, tmp_path, "--steps", "6", "--save_every", "1", "--max_bad_steps", "2"))
    assert_stopped(e, 2)
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [0, 1, 2, 3] and [r["bad_steps"] for r in m[1:]] == [0, 1, 2]
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_000001")
    assert not (tmp_path / "ckpt" / "step_000002").exists() and not (tmp_path / "final").exists()


def test_align_nan_discriminator_scores_stop_the_run(dataset, tmp_path, monkeypatch, capsys):
    step = step_counter(monkeypatch, rollout, "prompt_order")
    real_build = discriminator.build

    def build(*a, **k):  # D's raw scores turn NaN from step 2 (guard() would quietly make them 0)
        disc, processor = real_build(*a, **k)
        disc.value_head.register_forward_hook(lambda mod, inp, out: out * float("nan") if step["n"] >= 2 else None)
        return disc, processor
    monkeypatch.setattr(discriminator, "build", build)
    with pytest.raises(SystemExit) as e:
        align.main(align_args(dataset, tmp_path, "--steps", "6", "--save_every", "1", "--max_bad_steps", "2"))
    assert_stopped(e, 2)
    m = metrics(tmp_path)
    assert [r["bad_steps"] for r in m[1:]] == [0, 1, 2]
    assert all(r["disc_loss"] != r["disc_loss"] for r in m[2:])  # no D update: nothing to report
    assert common.latest_checkpoint(str(tmp_path)).endswith("step_000001")
    assert not (tmp_path / "ckpt" / "step_000002").exists()
    assert "warning: step 2: non-finite discriminator scores; update skipped" in capsys.readouterr().out


def test_no_signal_batches_are_logged_not_bad(dataset, tmp_path):
    # a random policy never writes the format: every reward is 0, every group all-equal
    rlvr.main(rl_args(dataset, tmp_path / "grpo", "--steps", "1"))
    m = metrics(tmp_path / "grpo")[1]
    assert m["zero_adv_frac"] == 1.0 and m["kept_frac"] == 1.0 and m["grad_norm"] == 0 and m["bad_steps"] == 0
    # DAPO's dynamic sampling drops every group, refills fail, the batch is empty: a zero update
    rlvr.main(rl_args(dataset, tmp_path / "dapo", "--steps", "1", "--algo", "dapo", "--max_extra_rounds", "1"))
    m = metrics(tmp_path / "dapo")[1]
    assert m["kept_frac"] == 0.0 and m["gen_rounds"] == 2 and m["grad_norm"] == 0 and m["bad_steps"] == 0


# ----------------------------------------------------------------------------- safe loading

def repo_python_files():
    skip = {".venv", ".git", "cache", "data", "runs", "__pycache__"}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def unsafe_loading(source, name):
    """Lines of `source` that could run code from a file: torch.load without weights_only=True, a
    pickle / dill / joblib load, allow_pickle=True, trust_remote_code=True or a default other than False."""
    problems = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func, kw = ast.unparse(node.func), {k.arg: k.value for k in node.keywords}
            if func.endswith("torch.load") and getattr(kw.get("weights_only"), "value", None) is not True:
                problems.append(f"{where}: {func} without weights_only=True")
            if func.split(".")[0] in ("pickle", "dill", "joblib") and func.endswith(("load", "loads")):
                problems.append(f"{where}: {func}")
            problems += [f"{where}: {k}=True" for k in ("trust_remote_code", "allow_pickle")
                         if getattr(kw.get(k), "value", None) is True]
        if isinstance(node, ast.FunctionDef):  # def f(..., trust_remote_code=True)
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            for arg, default in zip(args, defaults + node.args.kw_defaults):
                if arg.arg == "trust_remote_code" and getattr(default, "value", None) is not False:
                    problems.append(f"{where}: trust_remote_code does not default to False")
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "trust_remote_code" \
                and getattr(node.value, "value", None) is not False:  # a config field
            problems.append(f"{where}: config field trust_remote_code does not default to False")
    return problems


def test_no_unsafe_loading_anywhere():
    bad = ("import pickle, torch\nx = torch.load('a.pt')\ny = pickle.load(open('b', 'rb'))\n"
           "def f(trust_remote_code=True): pass\nclass C:\n    trust_remote_code: bool = True\n"
           "m = AutoModel.from_pretrained('x', trust_remote_code=True)\n")
    assert len(unsafe_loading(bad, "bad.py")) == 5  # the scan itself works
    problems = []
    for path in repo_python_files():
        name = os.path.relpath(path, ROOT)
        found = unsafe_loading(open(path).read(), name)
        if name.startswith("tests" + os.sep):  # tests may pickle their own objects (DataError's round trip)
            found = [p for p in found if "pickle" not in p]
        problems += found
    assert not problems, "\n".join(problems)
