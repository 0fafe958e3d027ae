"""The headline commands' defaults at any world size: how prompts and groups spread over ranks
(the paper's 4 prompts x 16 rollouts on 8 GPUs splits each group over 2 ranks), --dist auto, and
a 2-process alignment on the real-vocabulary proxy with split groups."""
import json
from types import SimpleNamespace as Cfg

import pytest
import torch

import model as models
import rl_losses
import rollout
from helpers import torchrun, write_task


def cfg(**kw):
    return Cfg(**{"prompts_per_step": 4, "group_size": 16, "algo": "grpo", **kw})


def test_layouts():
    _, layout = rollout.check_config(cfg(), 8)  # the paper's alignment batch on one node
    assert (layout.prompts, layout.rollouts, layout.split) == (1, 8, 2)
    _, layout = rollout.check_config(cfg(), 2)
    assert (layout.prompts, layout.rollouts, layout.split) == (2, 16, 1)
    order = list(range(4))
    assert [rollout.my_prompts(order, r, 8, rollout.Layout(1, 8, 2)) for r in range(8)] == [
        [0], [0], [1], [1], [2], [2], [3], [3]]
    with pytest.raises(SystemExit, match="--prompts_per_step 3 on 2 ranks"):
        rollout.check_config(cfg(prompts_per_step=3), 2)
    with pytest.raises(SystemExit, match="dynamic sampling"):
        rollout.check_config(cfg(algo="dapo"), 8)


def test_split_groups_are_normalised_with_all_their_rollouts(monkeypatch):
    """Two ranks share each of 2 prompts (2 rollouts each): every rank's advantages equal those
    of the whole step computed in one place."""
    layout = rollout.Layout(prompts=1, rollouts=2, split=2)
    rewards = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([1.0, 1.0]),  # prompt 0
               2: torch.tensor([0.0, 0.0]), 3: torch.tensor([1.0, 0.0])}  # prompt 1
    stacked = [torch.stack([torch.full((2,), float(r // 2)), rewards[r]]).double()
               for r in range(4)]
    monkeypatch.setattr(rollout, "all_gather_list", lambda mine: stacked)
    whole = rl_losses.group_advantages(torch.cat(list(rewards.values())),
                                       torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    for rank in range(4):
        local_group = torch.zeros(2, dtype=torch.long)  # one prompt per rank
        got = rollout.global_advantages(rl_losses.group_advantages, local_group, rank, 4, layout,
                                        rewards[rank])
        assert torch.allclose(got, whole[2 * rank:2 * rank + 2]), rank


def test_dist_auto_shards_big_models_only():
    log = []
    assert models.pick_dist(Cfg(dist="auto", model="Qwen3-VL-4B"), 8, log.append) == "fsdp"
    assert "4.44B parameters" in log[0]
    assert models.pick_dist(Cfg(dist="auto", model="tiny"), 2, log.append) == "ddp"
    assert models.pick_dist(Cfg(dist="ddp", model="Qwen3-VL-4B"), 8) == "ddp"  # asked for
    assert models.pick_dist(Cfg(dist="auto", model="Qwen3-VL-4B"), 1) == "ddp"  # no wrapper


def test_two_ranks_align_the_proxy_with_split_groups(tmp_path):
    """The headline command's shape on 2 processes: defaults except the run length, one prompt
    per step whose group of 4 is sampled 2 + 2 by the two ranks."""
    out = write_task(tmp_path / "data", n_align=4)
    torchrun("align.py", "--model", "proxy", "--disc", "proxy",
             "--data", f"{out}/align_prompts.parquet", "--out_dir", str(tmp_path / "run"),
             "--steps", "1", "--prompts_per_step", "1", "--group_size", "4",
             "--max_new_tokens", "8", "--eval_rows", "0", "--threads", "1")
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["step"] == 1 and records[-1]["response_len"] > 0


def test_a_run_that_does_not_fit_names_the_flags_that_make_it_fit():
    """What check_memory does on a GPU, here with an 80 GB GPU assumed: the headline alignment
    with only --data and --disc added does not fit 8 x 80 GB as configured for the toys; the
    error names the flags, and with them the check passes."""
    import align
    import common
    import memory
    argv = ["--model", "Qwen3-VL-4B", "--data", "align.parquet", "--disc", "runs/w/final"]
    cfg = common.parse_config(align.Config, argv)
    cfg.dist = "fsdp"  # what --dist auto picks for a 4.4B model on 8 ranks
    with pytest.raises(SystemExit, match="add --grad_ckpt --disc_grad_ckpt"):
        memory.preflight("align", cfg, 8, 80)
    cfg = common.parse_config(align.Config, argv + ["--grad_ckpt", "--disc_grad_ckpt"])
    cfg.dist = "fsdp"
    seen = []
    memory.preflight("align", cfg, 8, 80, seen.append)
    assert seen[0].startswith("memory check: peak")


def test_evaluation_batches_respect_the_token_budget(monkeypatch):
    """64 prompts per call at 2,048 + 6,144 tokens would hold a ~77 GB KV cache on a 4B model:
    generate takes fewer rows per call when rows x (prompt + new tokens) passes the budget."""
    import data
    m, processor, _ = models.load_model("tiny", torch.device("cpu"))
    rows = [{"messages": [{"role": "user", "content": "how many?"}], "images": []}] * 5
    calls = []
    real = type(m).generate
    monkeypatch.setattr(type(m), "generate", lambda self, **kw: calls.append(
        kw["input_ids"].shape) or real(self, **kw))
    width = data.encode_prompts(rows[:1], processor)["input_ids"].shape[1] + 4
    texts = models.generate(m, processor, rows, max_new_tokens=4, batch_size=4,
                            token_budget=2 * width)
    assert len(texts) == 5 and [shape[0] for shape in calls] == [2, 2, 1]


def test_prompts_longer_than_max_prompt_len_are_skipped_and_counted(tmp_path, monkeypatch):
    """The length a prompt filter sees is the processor's: text plus each image's tokens, here
    checked against a real processor call; rlvr drops and counts the prompts over the limit."""
    import data
    import rlvr
    out = write_task(tmp_path / "data", n_rl=4)
    rows = data.load_prompts(str(out / "rl_prompts.parquet"))
    _, processor, _ = models.load_model("tiny", torch.device("cpu"))
    enc = data.encode_prompts(rows[:1], processor)
    assert data.prompt_length(rows[0], processor) == enc["input_ids"].shape[1]
    lengths = sorted(data.prompt_length(r, processor) for r in rows)
    logged = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: logged.append(" ".join(map(str, a))))
    rlvr.main(["--model", "tiny", "--data", str(out / "rl_prompts.parquet"), "--steps", "1",
               "--out_dir", str(tmp_path / "run"), "--eval_rows", "0", "--prompts_per_step", "1",
               "--group_size", "2", "--max_new_tokens", "4", "--max_prompt_len",
               str(lengths[-1] - 1)])
    dropped = sum(n > lengths[-1] - 1 for n in lengths)
    assert any(f"{dropped} prompts over --max_prompt_len" in line for line in logged)
