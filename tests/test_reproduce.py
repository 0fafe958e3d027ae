"""reproduce.py: the stage plan of one seed (which runs, in which order, with which flags) and the
summary table built from fixed per-seed results, checked against hand-computed means and spreads."""
import argparse

import pytest

import reproduce


def args(**kw):
    base = dict(out="runs/r", model="small", data="data/tiny", kinds="moe,dense,text-only", algos="grpo,dapo,gspo",
                ablation_algos="", sft_flags="--lr 1e-3", warmup_flags="", align_flags="",
                rl_flags="")
    return argparse.Namespace(**{**base, **kw})


def test_full_grid_plan():
    stages = reproduce.plan(args(), 1)
    scripts = [s[0][0] for s in stages]
    assert scripts == ["sft.py"] + ["warmup.py", "align.py"] * 3 + ["rlvr.py"] * 12 + ["evaluate.py"]
    assert all(s[0][s[0].index("--seed") + 1] == "1" for s in stages)            # every stage gets the seed
    assert stages[0][0][:5] == ["sft.py", "--model", "small", "--lr", "1e-3"]
    # Every RL run starts from SFT or from one alignment, and evaluate.py sees all 16 models.
    assert sorted(s[1].split("/")[-1] for s in stages if s[0][0] == "rlvr.py") == sorted(
        f"{arm}-{algo}" for arm in ["sft", "align_moe", "align_dense", "align_text-only"] for algo in ["grpo", "dapo", "gspo"])
    models = stages[-1][0][stages[-1][0].index("--models") + 1].split(",")
    assert len(models) == 16 and "align_dense-gspo=runs/r/seed1/align_dense-gspo/final" in models


def test_ablations_with_grpo_only_and_passed_flags():
    stages = reproduce.plan(args(ablation_algos="grpo", rl_flags="--steps 300 --eval_rows 0",
                                 align_flags="--steps 150", sft_flags=""), 0)
    rl = {s[1].split("/")[-1]: s[0] for s in stages if s[0][0] == "rlvr.py"}
    assert sorted(rl) == sorted(["sft-grpo", "align_moe-grpo", "align_dense-grpo", "align_text-only-grpo",
                                 "sft-dapo", "align_moe-dapo", "sft-gspo", "align_moe-gspo"])
    assert rl["align_moe-dapo"][rl["align_moe-dapo"].index("--model") + 1] == "runs/r/seed0/align_moe/final"
    assert rl["sft-gspo"][rl["sft-gspo"].index("--steps") + 1] == "300"
    align = [s[0] for s in stages if s[0][0] == "align.py"][0]
    assert align[align.index("--steps") + 1] == "150"
    assert stages[0][0][:3] == ["sft.py", "--model", "small"] and "--lr" not in stages[0][0]


def test_ablations_aligned_without_rl():
    stages = reproduce.plan(args(ablation_algos="none", algos="grpo"), 2)
    assert [s[1].split("/")[-1] for s in stages if s[0][0] == "rlvr.py"] == ["sft-grpo", "align_moe-grpo"]
    models = stages[-1][0][stages[-1][0].index("--models") + 1].split(",")
    assert [m.split("=")[0] for m in models] == ["sft", "align_moe", "align_dense", "align_text-only",
                                                 "sft-grpo", "align_moe-grpo"]


def result(greedy, sampled, perception, mmd2):
    return {"greedy": {"acc": greedy, "perception": {"acc": perception}}, "sampled": {"acc": sampled},
            "drift": {"greedy": {"mmd2": mmd2}}}


def test_summary_means_spreads_and_paired_differences():
    per_seed = [{"sft-grpo": result(0.60, 0.50, 0.1, 0.02), "align_moe-grpo": result(0.64, 0.52, 0.2, None)},
                {"sft-grpo": result(0.70, 0.60, 0.3, 0.04), "align_moe-grpo": result(0.66, 0.61, 0.2, None)}]
    md = reproduce.summary(per_seed)
    # sft-grpo greedy: mean 0.65, sample std sqrt(((0.05)^2 * 2) / 1) = 0.0707
    assert "| sft-grpo | 0.650 ± 0.071 | 0.550 ± 0.071 | 0.200 ± 0.141 | 0.030 ± 0.014 |" in md
    assert "| align_moe-grpo | 0.650 ± 0.014 | 0.565 ± 0.064 | 0.200 ± 0.000 | n/a |" in md
    # Paired by seed: greedy +0.04 and -0.04 -> mean 0, std 0.0566, one seed of two above zero;
    # mean@k +0.02 and +0.01 -> 0.015 ± 0.007, both above zero.
    assert "| align_moe-grpo minus sft-grpo | 0.000 ± 0.057 (1/2 seeds > 0) | 0.015 ± 0.007 (2/2 seeds > 0) |" in md


def test_summary_one_seed_and_no_aligned_arm():
    md = reproduce.summary([{"sft": result(0.5, None, 0.1, None)}])
    assert "| sft | 0.500 ± 0.000 | n/a | 0.100 ± 0.000 | n/a |" in md
    assert "PRISM's claim" not in md


@pytest.mark.parametrize("argv, message", [
    (["--algos", "grpo,ppo"], "--algos: unknown ppo"),
    (["--kinds", "moe,sparse"], "--kinds: unknown sparse"),
    (["--algos", "grpo", "--ablation_algos", "dapo"], "--ablation_algos: unknown dapo"),
])
def test_bad_names_are_one_line_errors_before_any_stage(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()                                           # nothing ran


def test_a_failing_stage_is_a_one_line_exit(tmp_path):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "meta.json").write_text("{}")                              # skip writing the task
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--seeds", "0", "--sft_flags=--no_such_flag", "--out", str(tmp_path / "r"),
                        "--data", str(tmp_path / "task")])
    assert str(e.value).startswith("reproduce.py: sft.py failed for ") and "run again to resume" in str(e.value)
