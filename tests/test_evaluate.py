"""evaluate.py: perception scoring on known scenes, the reasoning-given-caption bookkeeping, the two
divergences on Gaussian samples, the markdown table, and a short end-to-end run with plots."""
import itertools
import json
import os
from collections import Counter

import pytest
import torch

import evaluate
import task

torch.set_num_threads(1)

SCENE = {"image_size": 96, "objects": [
    {"color": "green", "shape": "triangle", "x": 0, "y": 0, "size": 14},
    {"color": "green", "shape": "triangle", "x": 20, "y": 0, "size": 14},
    {"color": "blue", "shape": "circle", "x": 40, "y": 0, "size": 14},
    {"color": "yellow", "shape": "square", "x": 60, "y": 0, "size": 14}]}


def answer(objects_line, extra_lines=("- style: flat shapes on a white background",), final="2"):
    caption = "\n".join([*extra_lines, objects_line]) if objects_line is not None else "- some coloured shapes"
    return f"<caption>\n{caption}\n- text: none\n</caption>\n<think>\ngreen objects: 2\n</think>\n<answer>{final}</answer>"


@pytest.mark.parametrize("line, right", [
    ("- objects: " + task.describe(SCENE["objects"]), True),                    # the teacher's own line
    ("- objects: 1 yellow square, 1 blue circle, 2 green triangles", True),     # any order
    ("- Objects: 2 green triangles, a blue circle and one yellow square.", True),  # words, "and", full stop
    ("- objects: 1 green triangle, 1 green triangle, 1 blue circle, 1 yellow square", True),  # split group
    ("- objects: 2 green triangle, 1 blue circles, 1 yellow square", True),     # plural/singular slips
    ("- objects: 3 green triangles, 1 blue circle, 1 yellow square", False),    # wrong count
    ("- objects: 2 green triangles, 1 blue circle", False),                     # missing object
    ("- objects: 2 green triangles, 1 blue circle, 1 yellow square, 1 red circle", False),  # extra object
    ("- objects: 2 green triangles, 1 blue circle, 1 yellow square, 0 red circles", True),  # a zero is no object
    ("- objects: 4 shapes", False),                                             # the public "total" style
    ("- objects: ###", False),                                                  # garbage
    ("- objects:", False),                                                      # empty line
    (None, False),                                                              # no objects line at all
])
def test_perception_on_known_scene(line, right):
    response = answer(line)
    assert evaluate.perception_correct(response, SCENE) is right
    assert evaluate.perception_correct(response, json.dumps(SCENE)) is right  # the JSON string form


def test_caption_parser_and_soft_score():
    truth = evaluate.scene_objects(SCENE)
    assert truth == Counter({("green", "triangle"): 2, ("blue", "circle"): 1, ("yellow", "square"): 1})
    assert evaluate.parse_caption_objects(None) is None  # missing caption
    assert evaluate.parse_caption_objects("<caption>- objects: none</caption>") == Counter()
    said = evaluate.parse_caption_objects("- objects: 3 green triangles, 1 blue circle, 1 red square")
    # types named or present: green triangle (wrong), blue circle (right), red square (extra), yellow square (missed)
    assert evaluate.object_count_accuracy(said, truth) == pytest.approx(1 / 4)
    assert evaluate.object_count_accuracy(truth, truth) == 1.0
    assert evaluate.object_count_accuracy(None, truth) == 0.0


def test_reasoning_given_caption_bookkeeping():
    row = {"ground_truth": "2", "extra_info": {"scene": json.dumps(SCENE), "level": 1, "qtype": "count_color"}}
    good = "- objects: 2 green triangles, 1 blue circle, 1 yellow square"
    bad = "- objects: 1 green triangle"
    responses = [answer(good, final="2"), answer(good, final="2"), answer(good, final="3"),  # right caption: 2/3
                 answer(bad, final="2"), answer(bad, final="1"), answer(None, final="1"),   # wrong caption: 1/3
                 "<answer>2</answer>"]  # no format: wrong answer, no caption
    s = evaluate.summarise([evaluate.score_response(t, row) for t in responses])
    assert s["n"] == 7 and s["acc"] == pytest.approx(3 / 7) and s["format"] == pytest.approx(6 / 7)
    assert s["perception"]["acc"] == pytest.approx(3 / 7) and s["perception"]["n"] == 7
    assert s["reasoning"] == {"acc_correct_caption": pytest.approx(2 / 3), "n_correct_caption": 3,
                              "acc_wrong_caption": pytest.approx(1 / 4), "n_wrong_caption": 4}
    assert s["tags"]["caption"] == pytest.approx(6 / 7) and s["by_level"]["1"]["n"] == 7
    # a real benchmark row (no scene): perception and reasoning are n/a, accuracy still counts
    plain = evaluate.summarise([evaluate.score_response(answer(good), {"ground_truth": "2"})])
    assert plain["perception"] is None and plain["reasoning"] is None and plain["acc"] == 1.0
    assert plain["by_level"] == {} and plain["by_qtype"] == {}


def test_divergences_zero_for_identical_sets_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    bandwidth = evaluate.median_bandwidth(x)
    assert abs(evaluate.mmd2(x, x, bandwidth)) < 0.01  # unbiased: ~ -2/n, not exactly 0
    assert evaluate.frechet(x, x) < 1e-8
    mmds = [evaluate.mmd2(noise + s, x, bandwidth) for s in (0.0, 0.5, 1.0, 2.0)]
    fids = [evaluate.frechet(noise + s, x) for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(mmds[0]) < 0.01 and fids[0] < 0.5  # a fresh sample of the same distribution
    assert all(a < b for a, b in itertools.pairwise(mmds)) and all(a < b for a, b in itertools.pairwise(fids))
    # the mean term of Frechet is exact: shifting every one of 8 dims by 2 adds 8 * 2^2 = 32
    assert fids[3] - fids[0] == pytest.approx(32, rel=0.1)


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    # Tr((S1 S2)^(1/2)) for diagonal covariances is sum sqrt(s1_i s2_i): check the eigh route
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0])
    y = torch.randn(4000, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0]) + 1.0
    sx, sy = torch.cov(x.T).diagonal().double(), torch.cov(y.T).diagonal().double()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum().item() + ((sx.sqrt() - sy.sqrt()) ** 2).sum().item()
    assert evaluate.frechet(x, y) == pytest.approx(expected, rel=0.05)


def summary(acc, perception=None):
    return {"n": 4, "acc": acc, "format": 1.0, "perception": perception and {"acc": perception, "objects": 0.9, "n": 4},
            "reasoning": perception and {"acc_correct_caption": 0.75, "n_correct_caption": 2,
                                         "acc_wrong_caption": 0.25, "n_wrong_caption": 2},
            "lengths": {"response": 50.0, "caption": 20.0, "think": 9.5, "answer": 1.0},
            "tags": {"caption": 1.0, "think": 1.0, "answer": 1.0},
            "by_level": {"1": {"n": 2, "acc": acc}, "2": {"n": 2, "acc": acc / 2}}, "by_qtype": {}}


def test_markdown_table_key_cells():
    results = {"data": "x.parquet", "n_prompts": 4, "k": 4, "teacher": {"greedy": summary(1.0, 1.0)}, "models": {
        "base": {"greedy": summary(0.0), "sampled": None, "drift": {"greedy": {"mmd2": 1.23456, "frechet": 80.0}}},
        "sft": {"greedy": summary(0.625, 0.5), "sampled": summary(0.5, 0.5),
                "drift": {"greedy": {"mmd2": -0.0077, "frechet": 1.29}}}}}
    md = evaluate.markdown_table(results)
    lines = md.splitlines()
    assert lines[0].startswith("| model | greedy acc | mean@4 acc | format | perception acc |")
    # plain perception (the base's describe question) is n/a: these results carry none
    assert ("| base | 0.000 | n/a | 1.000 | n/a | n/a | n/a | n/a | 1.2346 | 80.00 | 50.0 | 9.5 |"
            in lines)
    assert ("| sft | 0.625 | 0.500 | 1.000 | 0.500 | 0.750 | 0.250 | n/a | -0.0077 | 1.29 | 50.0 "
            "| 9.5 |" in lines)
    assert any(line.startswith("| teacher (reference) | 1.000 | n/a |") for line in lines)
    assert "| model | level 1 (n=2) | level 2 (n=2) |" in md and "| sft | 0.625 / 0.500 | 0.312 / 0.250 |" in md
    assert "question type" not in md  # no qtype breakdown in these results: no table


def test_read_objects_in_either_format():
    # the base answers a bare list, an SFT model a caption: both read as the same multiset
    bare = evaluate.read_objects("2 red circles, 1 blue square.")
    assert bare == Counter({("red", "circle"): 2, ("blue", "square"): 1})
    caption = ("<caption>\n- style: flat\n- objects: 1 blue square, 2 red circles\n- text: none\n"
               "</caption>")
    assert evaluate.read_objects(caption) == bare
    assert evaluate.read_objects("some shapes") is None


def test_end_to_end_with_plots(tmp_path, capsys):
    data_dir = tmp_path / "data"
    task.main(["--out", str(data_dir), "--seed", "0", "--n_sft_public", "4", "--n_sft_teacher", "4", "--n_align", "4",
               "--n_rl", "4", "--n_val", "4", "--n_test", "6", "--image_size", "64"])
    align_log, rl_log = tmp_path / "align.jsonl", tmp_path / "rl.jsonl"
    align_log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "val_acc": 0.5}] + [
        {"step": s, "gap_cap": 3.0 / s, "gap_cot": 2.0 / s} for s in range(1, 9)]) + '{"step": 9, "gap')  # a run still writing
    rl_log.write_text("".join(json.dumps({"step": s, "reward_mean": 0.1 * s, **({"val_acc": 0.5} if s % 4 == 0 else {})})
                              + "\n" for s in range(1, 9)))
    out = tmp_path / "eval"
    results = evaluate.main(["--models", "base=tiny", "--data", str(data_dir / "test.parquet"), "--out_dir", str(out),
                             "--k", "2", "--max_new_tokens", "16", "--threads", "1", "--align_log", str(align_log),
                             "--rl_logs", f"grpo={rl_log},missing={tmp_path / 'nope.jsonl'}", "--smooth", "3"])
    saved = json.loads((out / "results.json").read_text())
    base = saved["models"]["base"]
    assert saved["n_prompts"] == 6 and base["greedy"]["n"] == 6 and base["sampled"]["n"] == 12
    assert 0 <= base["greedy"]["acc"] <= 1 and base["greedy"]["perception"]["n"] == 6
    assert set(base["drift"]) == {"greedy", "sampled"} and base["drift"]["sampled"]["n"] == 12
    assert saved["teacher"]["greedy"]["perception"]["acc"] == 1.0  # the teacher's captions are exact
    assert saved["encoder"] == "tiny" and results["models"]["base"]["greedy"] == base["greedy"]
    assert "| base |" in (out / "results.md").read_text()
    for png in ("accuracy.png", "align_gaps.png", "rl_rewards.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "nope.jsonl (missing) not found" in capsys.readouterr().out  # a missing log is a note, not an error


def test_helpers(tmp_path):
    results = {"data": "x.parquet", "n_prompts": 4, "k": 0,
               "models": {"sft": {"greedy": summary(0.5), "sampled": None}}}
    evaluate.plot_accuracy(results, tmp_path / "acc.png")  # k = 0: greedy bars only
    assert os.path.exists(tmp_path / "acc.png")
    assert evaluate.parse_named("a=x, b->c=y ,z") == {"a": "x", "b->c": "y", "z": "z"}
    assert evaluate.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
