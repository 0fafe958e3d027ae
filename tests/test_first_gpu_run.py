"""Defects a first GPU run would have hit that are not about devices (those are in
test_gpu_sim.py): each test here failed before its fix."""
import json
import os

import pytest
import torch

import align
import data
import discriminator
import model as models
import rollout
from helpers import write_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = write_task(tmp_path_factory.mktemp("data"), n_align=4)
    torch.manual_seed(0)
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    return out, m, processor, data.load_prompts(str(out / "rl_prompts.parquet"))


def test_left_padded_text_only_prompts_are_sampled_at_their_unpadded_positions(setup):
    """The recorded log-probs of a left-padded text-only prompt equal those of the same prompt
    forwarded alone, without padding (the model numbered the padding too: up to 0.23 nats off)."""
    _, m, processor, rows = setup
    short = discriminator._without_images(rows[0]) | {"ground_truth": "1"}
    long = {**short, "messages": short["messages"][:-1] + [
        {"role": "user",
         "content": short["messages"][-1]["content"] + " Count twice, then answer."}]}
    torch.manual_seed(3)
    r = rollout.sample(m, processor, [short, long], n=2, max_new_tokens=8)
    assert r.prompt["attention_mask"][0].min() == 0  # the short prompt is left padded
    for i in range(len(r)):
        prompt = r.prompt["input_ids"][r.group[i]][r.prompt["attention_mask"][r.group[i]] > 0]
        n = int(r.lengths[i])
        ids = torch.cat([prompt, r.ids[i, :n]])[None]  # (1, P + n), no padding anywhere
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # (n, V)
        logits[:, r.blocked] = float("-inf")
        want = logits.log_softmax(-1).gather(-1, r.ids[i, :n, None]).squeeze(-1)
        assert (want - r.logp[i, :n]).abs().max() < 1e-4


def test_mini_batches_gives_exactly_that_many_optimizer_steps():
    """6 rollouts in 4 mini-batches: 4 optimizer steps (chunk() made 3), the same on every rank,
    each pass a permutation of all rollouts."""
    steps = rollout.update_batches(torch.arange(6), ppo_epochs=2, mini_batches=4)
    assert [len(x) for x in steps] == [2, 2, 1, 1] * 2
    assert sorted(torch.cat(steps[:4]).tolist()) == list(range(6))


def test_align_resume_with_no_step_left_saves_and_exits(setup, tmp_path):
    """Resuming a finished run (zero steps left) used a helper defined inside the loop."""
    out = setup[0]
    argv = ["--model", "tiny", "--disc", "tiny", "--data", f"{out}/align_prompts.parquet",
            "--out_dir", str(tmp_path), "--prompts_per_step", "2", "--group_size", "2",
            "--max_new_tokens", "4", "--eval_rows", "0", "--threads", "1", "--steps", "1"]
    align.main(argv)
    align.main(argv + ["--resume"])
    with open(tmp_path / "final" / "run.json") as f:
        assert json.load(f)
    assert os.path.exists(tmp_path / "final" / "discriminator" / "model.safetensors")


def test_trained_weights_stay_fp32_unless_sharded_or_frozen():
    """bf16 AdamW rounds a 1e-6 update away; full fine-tuning keeps fp32 weights and states."""
    from types import SimpleNamespace as Cfg
    full = Cfg(dtype="auto", dist="ddp", lora=False, qlora=False)
    assert models.stage_dtype(full) == "fp32"
    assert models.stage_dtype(Cfg(**{**vars(full), "lora": True})) == "auto"  # bf16 base on GPU
    lora = Cfg(**{**vars(full), "lora": True})
    assert models.stage_dtype(lora, trains_all_weights=True) == "fp32"
    with pytest.raises(SystemExit, match="round small updates away"):
        models.stage_dtype(Cfg(**{**vars(full), "dtype": "bf16"}))
    # the rounding itself: lr 1e-6 x a unit Adam step on a weight of 0.5
    w = torch.tensor(0.5, dtype=torch.bfloat16)
    assert (w - 1e-6) == w and torch.tensor(0.5) - 1e-6 != torch.tensor(0.5)
