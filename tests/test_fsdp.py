"""FSDP2 (`--dist fsdp`) on CPU: two processes with gloo, the tiny model, every stage.

The claim tested is exactness, not "it runs": FSDP shards weights, gradients and optimizer states
but must compute the same training run as DDP / one process. So each stage is run both ways on
the same rollouts (tests/patched_stage.py gives the random tiny policy's outputs a learning
signal) and the final weights are compared. Every torchrun is under `timeout` (MEASURED.md saw
rare hangs at the final barrier)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import model as models
import sft
from helpers import ROOT, torchrun, untimed, write_task

PATCHED = os.path.join(ROOT, "tests", "patched_stage.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("data"), n_sft_public=8, n_sft_teacher=8, n_align=8, n_rl=8)


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def same_run(a, b, keys):
    """Two runs' metrics: equal at step 1 (same weights, same rollouts: any reduction mistake shows
    here), close later. Adam turns rounding-level differences in near-zero gradients into updates of
    up to lr in either direction, so from step 2 on the runs agree to float noise amplified by that."""
    for key in keys:
        assert a[1].get(key) == pytest.approx(b[1].get(key), abs=1e-4), key
        values = [[r[key] for r in run if key in r] for run in (a, b)]
        assert values[0] == pytest.approx(values[1], rel=2e-2, abs=1e-3), key


def adam_tolerance(lr, steps):
    """How far two runs' weights may drift apart that way: at most about 2 lr per step."""
    return 2 * lr * steps


def weights(folder, name="model.safetensors"):
    return load_file(os.path.join(folder, name))


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_sft_fsdp_matches_one_process_and_resumes_bitwise(dataset, tmp_path):
    def run_args(out, *extra):
        return ["--model", "tiny", "--data", f"{dataset}/sft_public.json,{dataset}/sft_teacher.json",
                "--val_data", f"{dataset}/val.parquet", "--out_dir", str(out), "--steps", "4", "--batch_size", "8",
                "--micro_batch_size", "2", "--eval_every", "0", "--eval_rows", "2", "--save_every", "2",
                "--threads", "1", *extra]
    torchrun("sft.py", *run_args(tmp_path / "fsdp", "--dist", "fsdp"))
    torchrun("sft.py", *run_args(tmp_path / "killed", "--dist", "fsdp", "--stop_after", "2"))
    torchrun("sft.py", *run_args(tmp_path / "killed", "--dist", "fsdp", "--resume"))
    sft.main(run_args(tmp_path / "one"))
    fsdp, one = metrics(tmp_path / "fsdp"), metrics(tmp_path / "one")
    assert [r["loss"] for r in fsdp] == pytest.approx([r["loss"] for r in one], abs=2e-4)
    assert [r["grad_norm"] for r in fsdp] == pytest.approx([r["grad_norm"] for r in one], abs=2e-3)
    # the gathered checkpoint is a whole model (tied LM head stored once, as a plain save does)
    assert max_diff(weights(tmp_path / "fsdp" / "final"), weights(tmp_path / "one" / "final")) < 1e-4
    # the resumed run (sharded optimizer state gathered, saved, re-sharded) is the uninterrupted one
    assert untimed(metrics(tmp_path / "killed")) == untimed(fsdp)
    assert max_diff(weights(tmp_path / "fsdp" / "final"), weights(tmp_path / "killed" / "final")) == 0.0


def rl_args(dataset, out, stage, *extra):
    data_file = {"rlvr": "rl_prompts", "align": "align_prompts"}[stage]
    return [PATCHED, stage, "--model", "tiny", "--data", f"{dataset}/{data_file}.parquet",
            "--val_data", f"{dataset}/val.parquet", "--out_dir", str(out), "--prompts_per_step", "2",
            "--group_size", "4", "--max_new_tokens", "12", "--eval_rows", "2", "--eval_every", "0",
            "--threads", "1", "--steps", "2", *extra]


@pytest.mark.parametrize("lora", [False, True])
def test_rlvr_fsdp_matches_ddp(dataset, tmp_path, lora):
    """Same rollouts (sampling gathers the full weights), two off-policy mini-batches per step, and
    the final weights agree to float rounding. With --lora this caught replicas whose fresh
    adapters differed per rank (now drawn from the run's seed)."""
    lr = 1e-3 if lora else 3e-5
    extra = ["--mini_batches", "2", "--lr", str(lr)] + (["--lora"] if lora else [])
    torchrun(*rl_args(dataset, tmp_path / "ddp", "rlvr", "--dist", "ddp", *extra))
    torchrun(*rl_args(dataset, tmp_path / "fsdp", "rlvr", "--dist", "fsdp", *extra))
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [0, 1, 2]
    assert fsdp[1]["grad_norm"] > 0  # there was a gradient to get wrong
    same_run(fsdp, ddp, ("loss", "grad_norm", "reward_mean", "clip_frac", "val_acc"))
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    diff = max_diff(weights(tmp_path / "ddp" / "final", name), weights(tmp_path / "fsdp" / "final", name))
    assert diff < adam_tolerance(lr, 2 * 2)  # 2 steps x 2 mini-batches


def test_rlvr_fsdp_cpu_offload_and_grad_ckpt_change_nothing(dataset, tmp_path):
    torchrun(*rl_args(dataset, tmp_path / "plain", "rlvr", "--dist", "fsdp"))
    torchrun(*rl_args(dataset, tmp_path / "offload", "rlvr", "--dist", "fsdp", "--cpu_offload", "--grad_ckpt"))
    # gradient checkpointing takes the plain forward (prompt + completion, no shared prefix): other
    # rounding, which Adam can blow up to a fraction of lr (3e-5) on near-zero gradients
    assert max_diff(weights(tmp_path / "plain" / "final"), weights(tmp_path / "offload" / "final")) < adam_tolerance(3e-5, 2)
    # Adam moves every weight by about lr whatever the gradient's size, so the weights alone cannot
    # tell a wrong gradient from a right one; step 1's gradient norm (same weights and rollouts) can
    plain, offload = metrics(tmp_path / "plain")[1], metrics(tmp_path / "offload")[1]
    assert plain["grad_norm"] > 0
    assert offload["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_align_fsdp_matches_ddp_and_resumes_bitwise(dataset, tmp_path):
    """Both models sharded: the policy's gradients summed, the discriminator's averaged, both
    optimizers' states gathered into the checkpoint and re-sharded on resume."""
    # 2 prompts per rank, D's update one prompt at a time (--disc_chunk 1): two backwards per step
    extra = ["--disc", "tiny", "--prompts_per_step", "4", "--disc_chunk", "1"]
    torchrun(*rl_args(dataset, tmp_path / "ddp", "align", *extra, "--dist", "ddp"))
    torchrun(*rl_args(dataset, tmp_path / "fsdp", "align", *extra, "--dist", "fsdp"))
    torchrun(*rl_args(dataset, tmp_path / "killed", "align", *extra, "--dist", "fsdp", "--save_every", "1",
                      "--stop_after", "1"))
    torchrun(*rl_args(dataset, tmp_path / "killed", "align", *extra, "--dist", "fsdp", "--save_every", "1",
                      "--resume"))
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert fsdp[1]["grad_norm"] > 0 and fsdp[1]["disc_grad_norm"] > 0
    same_run(fsdp, ddp, ("loss", "grad_norm", "disc_loss", "disc_grad_norm", "gap_cap", "gap_cot"))
    for sub, lr in (("", 3e-5), ("discriminator", 1e-4)):
        final = [tmp_path / run / "final" / sub for run in ("ddp", "fsdp", "killed")]
        assert max_diff(weights(final[0]), weights(final[1])) < adam_tolerance(lr, 2)
        assert max_diff(weights(final[1]), weights(final[2])) == 0.0


DRIVER = """
import sys, torch
sys.path.insert(0, {root!r})
import common, data, model as models
rank, _, world, device = common.init_distributed()
torch.manual_seed(0)
m, processor, _ = models.load_model("tiny", device)
m = models.wrap_distributed(m, device, "fsdp")
enc = data.encode_prompts(data.load_prompts({val!r})[:2], processor)
# one SGD step first, so the saved weights are not the cached build's
optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
m(**enc).logits.float().pow(2).mean().backward()
optimizer.step()
with torch.no_grad():
    logits = m(**enc).logits
models.save_pretrained(m, processor, {out!r})
if rank == 0:
    torch.save(logits, {out!r} + "/sharded_logits.pt")
common.finish()
"""


def test_gathered_checkpoint_reloads_single_process_with_the_sharded_logits(dataset, tmp_path):
    out = str(tmp_path / "ckpt")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, val=f"{dataset}/val.parquet", out=out))
    torchrun(str(driver))
    sharded = torch.load(os.path.join(out, "sharded_logits.pt"), weights_only=True)
    m, processor, _ = models.load_model(out, torch.device("cpu"))
    enc = data.encode_prompts(data.load_prompts(f"{dataset}/val.parquet")[:2], processor)
    with torch.no_grad():
        ours = m(**enc).logits
        fresh, _, _ = models.load_model("tiny", torch.device("cpu"))
        before = fresh(**enc).logits
    assert (before - sharded).abs().max() > 1e-3  # the step changed the model
    torch.testing.assert_close(ours, sharded, atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForImageTextToText
    with torch.no_grad():
        plain = AutoModelForImageTextToText.from_pretrained(out)(**enc).logits
    torch.testing.assert_close(plain, sharded, atol=1e-5, rtol=1e-5)


def test_a_cold_cache_is_built_once_under_torchrun(tmp_path):
    """transformers' save_pretrained writes nothing on ranks other than 0 once torch.distributed is
    up; a rank-1 build that won the rename left a cache folder without weights, which broke every
    later run. Now rank 0 builds and the others wait."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import sys, torch\nsys.path.insert(0, {ROOT!r})\nimport common, model as models\n"
                      "rank, _, world, device = common.init_distributed()\n"
                      "m, _, path = models.load_model('tiny', device)\ncommon.finish()\n")
    cache = tmp_path / "cache"
    torchrun(str(driver), env={"NANOPRISM_CACHE": str(cache)})
    built = os.listdir(cache)
    assert len(built) == 1 and built[0].startswith("tiny-")  # no .tmp folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(cache / built[0]))


META_DRIVER = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
import common, model as models
rank, _, world, device = common.init_distributed()
m, _, _ = models.load_model("proxy", device, meta=rank != 0)
weights = sum(p.numel() * p.element_size() for p in m.parameters() if not p.is_meta)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = models.wrap_distributed(m, device, "fsdp")
full = models.full_state_dict(m)  # gathered onto rank 0
fresh, _, _ = models.load_model("proxy", device)  # every rank: the cache lookup has a barrier
if rank == 0:
    same = all(torch.equal(full[k], v) for k, v in fresh.state_dict().items())
    rope = all(torch.equal(a, b) for a, b in zip(m.buffers(), fresh.buffers()))
    json.dump({{"same": same, "rope": rope}}, open({out!r} + "/check.json", "w"))
json.dump({{"weights": weights, "peak_rss": peak}}, open({out!r} + f"/rank{{rank}}.json", "w"))
common.finish()
"""


def test_fsdp_ranks_but_0_load_no_weights(tmp_path):
    """--dist fsdp: ranks but 0 build the model on the meta device and receive their shards from
    rank 0 (one full copy per node instead of one per rank); the gathered weights and the rotary
    buffers equal a plain load's."""
    driver = tmp_path / "driver.py"
    driver.write_text(META_DRIVER.format(root=ROOT, out=str(tmp_path)))
    torchrun(str(driver))
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["weights"] > 30e6 and ranks[1]["weights"] == 0, ranks
    assert json.load(open(tmp_path / "check.json")) == {"same": True, "rope": True}
