"""--report_to: the numbers of metrics.jsonl reach TensorBoard unchanged; a missing tracker
package is a one-line error."""
import json
import sys

import pytest

import rlvr
from helpers import write_task


def test_tensorboard_gets_the_metrics_jsonl_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = write_task(tmp_path / "data", n_rl=4)
    rlvr.main(["--model", "tiny", "--data", f"{out}/rl_prompts.parquet", "--val_data",
               f"{out}/val.parquet", "--out_dir", str(tmp_path / "run"), "--steps", "2",
               "--prompts_per_step", "2", "--group_size", "2", "--max_new_tokens", "6",
               "--eval_rows", "0", "--threads", "1", "--report_to", "tensorboard"])
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("loss", "reward_mean", "grad_norm", "response_len"):
        seen = [(e.step, e.value) for e in events.Scalars(key)]
        assert seen == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key


def test_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    out = write_task(tmp_path / "data", n_rl=4)
    with pytest.raises(SystemExit, match="needs the wandb package"):
        rlvr.main(["--model", "tiny", "--data", f"{out}/rl_prompts.parquet", "--steps", "1",
                   "--out_dir", str(tmp_path / "run"), "--eval_rows", "0", "--report_to", "wandb"])
