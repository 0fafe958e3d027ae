"""The CLI generated from a dataclass, and atomic checkpoints."""
import os
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import common
from helpers import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Cfg:
    lr: float = 1e-5  # peak learning rate
    steps: int = 10  # optimizer steps
    name: str = "tiny"  # model name
    lora: bool = False  # use LoRA
    attn: Literal["sdpa", "eager"] = "sdpa"  # attention kernel


def test_cli_forms_and_types():
    assert common.parse_config(Cfg, []) == Cfg()
    assert common.parse_config(Cfg, ["--lr", "1e-6"]).lr == 1e-6
    assert common.parse_config(Cfg, ["--lr=2e-6", "--steps=3"]) == Cfg(lr=2e-6, steps=3)
    assert common.parse_config(Cfg, ["--lora"]).lora is True
    assert common.parse_config(Cfg, ["--lora", "false"]).lora is False
    assert common.parse_config(Cfg, ["--attn", "eager"]).attn == "eager"


@pytest.mark.parametrize("argv", [["--nope", "1"], ["--steps", "ten"], ["--lora", "maybe"], ["--attn", "flash"]])
def test_cli_rejects_unknown_and_badly_typed(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_config(Cfg, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err


def test_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, ["-h"])
    out = capsys.readouterr().out
    for text in ["--lr", "peak learning rate", "--steps", "optimizer steps", "--lora", "use LoRA"]:
        assert text in out


def test_checkpoint_is_atomic_and_latest_moves_only_when_complete(tmp_path):
    out = str(tmp_path)

    def save_model(path):
        torch.save({"w": torch.ones(2)}, os.path.join(path, "w.pt"))

    common.save_checkpoint(out, 1, save_model, {"step": 1}, {"config": {}})
    assert common.latest_checkpoint(out).endswith("step_000001")

    def crash(path):
        raise KeyboardInterrupt  # a kill while the model is being written

    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(out, 2, crash, {"step": 2}, {"config": {}})
    # the half-written step 2 is not visible; step 1 still loads
    assert common.latest_checkpoint(out).endswith("step_000001")
    assert common.load_trainer_state(common.latest_checkpoint(out))["step"] == 1
    for step in (2, 3, 4):
        common.save_checkpoint(out, step, save_model, {"step": step}, {"config": {}}, keep=2)
    assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["latest", "step_000003", "step_000004"]


def test_rng_state_round_trip(tmp_path):
    common.seed_everything(3)
    state = common.rng_state()
    a = torch.rand(3)
    torch.save(state, tmp_path / "rng.pt")
    common.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(a, torch.rand(3))


def test_all_reduce_grads_sums_over_two_ranks(tmp_path):
    # rank r holds gradient r+1 on one parameter and none on the other; the sum is 3 and 0 on both
    script = tmp_path / "ranks.py"
    script.write_text(
        "import torch, common\n"
        "rank, _, world, _ = common.init_distributed()\n"
        "a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))\n"
        "a.grad = torch.full((3,), rank + 1.0)\n"
        "common.all_reduce_grads([a, b])\n"
        "assert torch.equal(a.grad, torch.full((3,), 3.0)) and torch.equal(b.grad, torch.zeros(2, 2))\n"
        "a.grad = torch.full((3,), rank + 1.0)\n"
        "common.all_reduce_grads([a], average=True)\n"
        "assert torch.equal(a.grad, torch.full((3,), 1.5))\n"
        "torch.distributed.destroy_process_group()\n")
    torchrun(str(script), timeout=120, env={"PYTHONPATH": ROOT})
