"""Tests for task.py: the synthetic shapes task, its demonstrators and the files it writes."""
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import task  # noqa: E402
from data import SYSTEM_PROMPT  # noqa: E402

# The valid-format definition, verbatim from REFERENCE.md section 1.
FORMAT_RE = re.compile(r"^\s*<caption>.*?</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$",
                       re.DOTALL)
SMALL = dict(n_sft_public=40, n_sft_teacher=10, n_align=10, n_rl=10, n_val=8, n_test=30)


def obj(color, shape, x, y, size=16):
    return dict(color=color, shape=shape, x=x, y=y, size=size)


# 2 red circles + 1 blue square, placed by hand.
HAND = dict(image_size=96, objects=[obj("red", "circle", 4, 4), obj("blue", "square", 40, 40),
                                    obj("red", "circle", 70, 10, 20)])


def ask(qtype, params, objects=HAND["objects"]):
    return task.QUESTIONS[qtype](objects, params)


def brute_answer(record):
    """Recompute the answer from the scene with no shared code beyond the record's params."""
    objs, p, qt = record["scene"]["objects"], record["params"], record["qtype"]
    n = lambda **kw: sum(all(o[k] == v for k, v in kw.items()) for o in objs)  # noqa: E731
    if qt == "choice":
        inner = dict(record, qtype=p["inner"], params=p["inner_params"])
        return "ABCD"[p["options"].index(int(brute_answer(inner)))]
    if qt == "count_color":
        return str(n(color=p["colors"][0]))
    if qt == "count_shape":
        return str(n(shape=p["shapes"][0]))
    if qt == "count_both":
        return str(n(color=p["colors"][0], shape=p["shapes"][0]))
    if qt in ("sum", "diff"):
        a, b = (n(color=c) for c in p["colors"])
        return str(a + b if qt == "sum" else a - b)
    key = "color" if "colors" in p else "shape"
    a, b = (n(**{key: v}) for v in p[key + "s"])
    return "yes" if a > b else "no"


@pytest.fixture(scope="module")
def records():
    return task.make_records("train", 1500, seed=3)


# ---------------------------------------------------------------------------------------------------
# World and questions

def test_hand_checked_scene():
    assert ask("count_color", {"colors": ["red"]})[1] == "2"
    assert ask("count_color", {"colors": ["green"]})[1] == "0"  # absent colour
    assert ask("count_shape", {"shapes": ["square"]})[1] == "1"
    assert ask("count_both", {"colors": ["blue"], "shapes": ["circle"]})[1] == "0"
    q, a, steps = ask("sum", {"colors": ["red", "blue"]})
    assert (q, a) == ("How many red or blue objects are there in total?", "3")
    assert steps == ["red objects: 2", "blue objects: 1", "2 + 1 = 3"]
    q, a, steps = ask("diff", {"colors": ["red", "blue"]})
    assert (q, a, steps[-1]) == ("How many more red objects than blue objects are there?", "1", "2 - 1 = 1")
    # Re-asked about a (mis)perceived scene, a reversed pair must give an illegal answer, not |a - b|.
    assert ask("diff", {"colors": ["blue", "red"]})[1] == "-1" and "-1" not in task.ANSWERS
    q, a, _ = ask("compare", {"shapes": ["circle", "square"]})
    assert (q, a) == ("Are there more circles than squares? Answer yes or no.", "yes")
    assert ask("compare", {"colors": ["blue", "red"]})[1] == "no"
    assert ask("compare", {"colors": ["green", "yellow"]})[1] == "no"  # 0 vs 0: a tie is "no"
    q, a, steps = ask("choice", {"inner": "count_color", "inner_params": {"colors": ["red"]},
                                 "options": [3, 1, 2, 0]})
    assert q == "How many red objects are there? Options: A. 3 B. 1 C. 2 D. 0. Answer with the letter."
    assert a == "C" and steps[-1] == "2 is option C"
    caption, cot = task.split_response(task.teacher_response(HAND, {"steps": steps, "answer": a}))
    assert "- objects: 2 red circles, 1 blue square\n" in caption


def test_every_answer_matches_brute_force(records):
    assert set(r["qtype"] for r in records) == set(task.QUESTIONS)
    for r in records:
        assert r["answer"] == brute_answer(r), r
        assert r["answer"] in task.ANSWERS
        assert r["qtype"] in task.LEVELS[r["level"]]["qtypes"]
        lo, hi = task.LEVELS[r["level"]]["objects"]
        assert lo <= len(r["scene"]["objects"]) <= hi
    answers = Counter(r["answer"] for r in records)
    assert answers["0"] > 0 and answers["yes"] > 0 and answers["no"] > 0  # absent attributes get asked
    assert all(answers[L] > 0 for L in "ABCD")
    assert {r["level"] for r in records} == {1, 2, 3}


def test_scene_geometry(records):
    for r in records[:300]:
        s, objs = r["scene"]["image_size"], r["scene"]["objects"]
        for i, o in enumerate(objs):
            assert 14 <= o["size"] <= 20 and o["color"] in task.COLORS and o["shape"] in task.SHAPES
            assert 0 <= o["x"] <= s - o["size"] and 0 <= o["y"] <= s - o["size"]
            for q in objs[i + 1:]:  # bounding boxes at least 2 px apart
                assert (o["x"] + o["size"] + 2 <= q["x"] or q["x"] + q["size"] + 2 <= o["x"] or
                        o["y"] + o["size"] + 2 <= q["y"] or q["y"] + q["size"] + 2 <= o["y"])


def test_image_size_validated():
    for bad in (100, 95, 32):
        with pytest.raises(ValueError):
            task.sample_scene(random.Random(0), 3, bad)
    assert task.sample_scene(random.Random(0), 3, 128)["image_size"] == 128


def test_render_colour_at_centre(records):
    for r in records[:50]:
        image = task.render(r["scene"])
        assert image.mode == "RGB" and image.size == (96, 96)
        assert image.getpixel((0, 0)) == task.BACKGROUND or any(
            o["x"] == 0 and o["y"] == 0 for o in r["scene"]["objects"])
        for o in r["scene"]["objects"]:
            centre = (o["x"] + o["size"] // 2, o["y"] + o["size"] // 2)
            assert image.getpixel(centre) == task.RGB[o["color"]]
    assert len(set(task.RGB.values())) == len(task.COLORS)


# ---------------------------------------------------------------------------------------------------
# Demonstrators

def test_teacher_response(records):
    for r in records[:300]:
        response = task.teacher_response(r["scene"], r)
        assert FORMAT_RE.match(response)
        caption, cot = task.split_response(response)
        assert caption.startswith("<caption>") and caption.endswith("</caption>")
        assert re.fullmatch(r"<think>.*</think>\n<answer>.*</answer>", cot, re.S)
        assert response == caption + "\n" + cot
        assert cot.endswith(f"<answer>{r['answer']}</answer>")
        assert len(response.split()) < 70
        # The object list names every object, grouped and sorted by colour then shape.
        listed = re.search(r"- objects: (.*)\n", caption).group(1).split(", ")
        seen = []
        for item in listed:
            n, color, shape = item.split()
            singular = shape[:-1] if n != "1" else shape  # "1 red circle" but "2 red circles"
            assert singular in task.SHAPES, item
            seen.append((task.COLORS.index(color), task.SHAPES.index(singular), int(n)))
        assert seen == sorted(seen)
        truth = Counter((task.COLORS.index(o["color"]), task.SHAPES.index(o["shape"]))
                        for o in r["scene"]["objects"])
        assert {(c, s): n for c, s, n in seen} == dict(truth)


def test_public_response_format_and_error_rate(records):
    rng = random.Random(0)
    wrong, captions = 0, Counter()
    for r in records:
        response = task.public_response(r["scene"], r, rng, error_rate=0.2)
        assert FORMAT_RE.match(response), response
        answer = re.search(r"<answer>(.*)</answer>", response).group(1)
        assert answer in task.ANSWERS
        wrong += answer != r["answer"]
        captions[response.split("\n")[1].split(":")[0]] += 1
    assert abs(wrong / len(records) - 0.2) < 0.035
    assert len(captions) >= 2  # a mixture of caption styles, not one template
    rng = random.Random(1)
    assert all(re.search(r"<answer>(.*)</answer>", task.public_response(r["scene"], r, rng, 0.0)).group(1)
               == r["answer"] for r in records)


def test_public_errors_follow_a_misperception(records):
    """A wrong public answer comes with reasoning consistent with a scene that differs by one object."""
    rng, consistent = random.Random(2), 0
    for r in records[:400]:
        seen, steps, answer = task.misperceive(r["scene"]["objects"], r, rng)
        assert answer != r["answer"] and answer in task.ANSWERS
        if task.QUESTIONS[r["qtype"]](seen, r["params"])[1:] == (answer, steps):
            consistent += 1
            assert abs(len(seen) - len(r["scene"]["objects"])) <= 1
    assert consistent >= 0.9 * 400


# ---------------------------------------------------------------------------------------------------
# Splits, chance rate, corpus

def test_splits_deterministic_and_disjoint():
    a, b = task.make_records("val", 30, seed=5), task.make_records("val", 30, seed=5)
    assert a == b
    assert a != task.make_records("val", 30, seed=6)
    scenes = lambda recs: [r["scene"] for r in recs]  # noqa: E731
    assert scenes(a) != scenes(task.make_records("test", 30, seed=5))  # each split has its own seed
    exclude = {task.scene_key(r["scene"]) for r in a}
    c = task.make_records("val", 30, seed=5, exclude=exclude)  # same stream, all its scenes taken
    assert not exclude & {task.scene_key(r["scene"]) for r in c}
    assert len({task.scene_key(r["scene"]) for r in c}) == 30


def test_text_only_chance():
    train, test = task.make_records("train", 3000, seed=0), task.make_records("test", 600, seed=0)
    chance = task.text_only_chance(train, test)
    assert 0.2 < chance["overall"] < 0.6
    assert set(chance["by_type"]) == set(task.QUESTIONS)
    # The predictor learns from train, so on train itself it does at least as well as on test.
    assert task.text_only_chance(train, train)["overall"] >= chance["overall"] - 0.05
    # Sanity of the definition on a hand-made case: exact text first, then the type's majority.
    tr = [dict(question="q1", qtype="t", answer="1"), dict(question="q1", qtype="t", answer="1"),
          dict(question="q2", qtype="t", answer="2")]
    te = [dict(question="q1", qtype="t", answer="1"), dict(question="q3", qtype="t", answer="2")]
    assert task.text_only_chance(tr, te) == dict(overall=0.5, by_type={"t": 0.5})


def test_corpus_covers_vocabulary():
    texts = task.corpus(seed=0, n=150)
    joined = "\n".join(texts)
    assert SYSTEM_PROMPT in texts
    for word in task.COLORS + task.SHAPES + ["yes", "no", "Options", "<caption>", "</answer>", "total"]:
        assert word in joined
    for a in task.ANSWERS:
        assert f"<answer>{a}</answer>" in joined or a in texts[1].split()
    assert task.corpus(seed=0, n=20) == task.corpus(seed=0, n=20)


# ---------------------------------------------------------------------------------------------------
# Files on disk

def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


def test_write_dataset_deterministic(tmp_path, capsys):
    task.write_dataset(tmp_path / "a", seed=0, **SMALL)
    task.write_dataset(tmp_path / "b", seed=0, **SMALL)
    task.write_dataset(tmp_path / "c", seed=1, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert not any(name.endswith(".tmp") for name in a)
    n_images = sum(SMALL.values())
    assert sum(name.startswith("images/") for name in a) == n_images
    assert "text-only chance" in capsys.readouterr().out


def test_files_round_trip(tmp_path):
    meta = task.write_dataset(str(tmp_path), seed=0, **SMALL)
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads(json.dumps(meta))
    assert meta["sizes"]["sft_public"] == SMALL["n_sft_public"] and 0 < meta["chance"]["overall"] < 1

    scenes = {}
    for name, n in [("sft_public", SMALL["n_sft_public"]), ("sft_teacher", SMALL["n_sft_teacher"])]:
        rows = json.loads((tmp_path / f"{name}.json").read_text())
        assert len(rows) == n
        for row in rows:
            system, user, assistant = row["messages"]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert system["content"] == SYSTEM_PROMPT and user["content"].startswith("<image>\n")
            assert user["content"].count("<image>") == len(row["images"]) == 1
            assert FORMAT_RE.match(assistant["content"])
            assert (tmp_path / row["images"][0]).is_file() and row["images"][0].startswith("images/train_")

    columns = ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    teacher = ["teacher_caption", "teacher_cot", "teacher_response"]
    for name, n, with_teacher in [("align_prompts", 10, True), ("rl_prompts", 10, False),
                                  ("val", 8, True), ("test", 30, True)]:
        rows = pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
        assert len(rows) == n
        assert list(rows[0]) == columns + (teacher if with_teacher else [])
        for row in rows:
            info = row["extra_info"]
            assert row["data_source"] == "nanoprism/shapes" and row["ability"] == "visual_reasoning"
            assert row["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": "<image>\n" + info["question"] + "\n"}]
            image = f"images/{info['split']}_{info['index']:06d}.png"
            assert row["images"] == [{"bytes": None, "path": image}]
            assert (tmp_path / row["images"][0]["path"]).is_file()
            assert row["reward_model"] == {"style": "rule", "ground_truth": info["answer"]}
            assert set(info) == {"split", "index", "answer", "question", "qtype", "level", "scene"}
            scene = json.loads(info["scene"])
            key = task.scene_key(scene)
            assert scenes.setdefault(key, name) == name  # no scene in two files
            if with_teacher:
                assert row["teacher_response"] == row["teacher_caption"] + "\n" + row["teacher_cot"]
                assert FORMAT_RE.match(row["teacher_response"])
                assert row["teacher_cot"].endswith(f"<answer>{info['answer']}</answer>")
                assert task.describe(scene["objects"]) in row["teacher_caption"]


def test_cli_help_lists_every_option(capsys, tmp_path):
    with pytest.raises(SystemExit):
        task.main(["-h"])
    out = capsys.readouterr().out
    for flag in ["--out", "--seed", "--n_sft_public", "--n_sft_teacher", "--n_align", "--n_rl", "--n_val",
                 "--n_test", "--image_size", "--error_rate", "--levels"]:
        assert flag in out
    for bad in (["--image_size", "100"], ["--error_rate", "1.5"], ["--levels", "4"], ["--bogus", "1"]):
        with pytest.raises(SystemExit):  # a usage error, before anything is written
            task.main(["--out", str(tmp_path / "bad")] + bad)
        assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError):
        task.write_dataset(str(tmp_path / "bad"), image_size=100)
