"""The grounding probe (evaluate.grounding_probe) against hand-built scorers whose answers we know:
a scorer that checks content must score 1.0, its negation 0.0, a constant one exactly 0.5."""
import json
import math

import pytest

import data
import evaluate
import task


@pytest.fixture(scope="module")
def rows_and_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_data")
    task.write_dataset(str(out), seed=3, n_sft_public=4, n_sft_teacher=4, n_align=4, n_rl=4,
                       n_val=8, n_test=30)
    path = str(out / "test.parquet")
    rows = data.load_prompts(path, require_teacher=True, log=lambda *a: None)
    return rows, evaluate.task_records(path, rows)


def oracle(rows):
    """Scores 1 when the segment is true of the prompt's image: a caption naming exactly the
    image's objects, or steps ending in the right answer to the prompt's question."""
    scene_of = {r["images"][0]: evaluate.scene_objects(r["extra_info"]["scene"]) for r in rows}
    truth_of = {id(r): r["ground_truth"] for r in rows}  # questions repeat: key by the row itself

    def score(prompts, segments, which):
        out = []
        for p, s in zip(prompts, segments):
            if which == "cap":
                out.append(float(evaluate.parse_caption_objects(s) == scene_of[p["images"][0]]))
            else:
                out.append(float(data.parse_response("<caption></caption>" + s)["answer"] ==
                                 truth_of[id(p)]))
        return out
    return score


def test_records_are_regenerated(rows_and_records):
    rows, records = rows_and_records
    assert all(r is not None for r in records)
    assert [r["question"] for r in records] == [r["extra_info"]["question"] for r in rows]


def test_oracle_scores_one_and_its_negation_zero(rows_and_records):
    rows, records = rows_and_records
    result = evaluate.grounding_probe(oracle(rows), rows, records)
    assert set(result) == set(evaluate.PROBE_TESTS)
    for r in result.values():
        assert r["n"] == len(rows) and r["acc"] == 1.0 and r["se"] == 0.0 and r["gap"] == 1.0
    score = oracle(rows)
    negated = evaluate.grounding_probe(lambda p, s, w: [-x for x in score(p, s, w)], rows, records)
    assert all(r["acc"] == 0.0 for r in negated.values())


def test_blind_scorer_is_at_chance(rows_and_records):
    rows, records = rows_and_records
    # a constant scorer ties every pair: exactly 0.5, standard error sqrt(0.25 / n)
    result = evaluate.grounding_probe(lambda p, s, w: [3.0] * len(s), rows, records)
    for r in result.values():
        assert r["acc"] == 0.5 and math.isclose(r["se"], math.sqrt(0.25 / len(rows)))
    # a style-only scorer (longer is better) cannot see the swapped image: same caption both sides
    result = evaluate.grounding_probe(lambda p, s, w: [float(len(x)) for x in s], rows, records)
    assert result["cap_swapped_image"]["acc"] == 0.5


def test_pairs_differ_in_one_thing_only(rows_and_records):
    rows, records = rows_and_records
    pairs = evaluate.probe_pairs(rows, records)
    right_p, right_s, wrong_p, wrong_s, which = pairs["cap_misperceived"]
    assert which == "cap" and all(a is b for a, b in zip(right_p, wrong_p))
    for r, w in zip(right_s, wrong_s):  # only the objects line changed
        assert r != w and r.split("objects:")[0] == w.split("objects:")[0]
    right_p, right_s, wrong_p, wrong_s, _ = pairs["cap_swapped_image"]
    assert right_s == wrong_s and all(a["images"] != b["images"] and a["messages"] is b["messages"]
                                      for a, b in zip(right_p, wrong_p))
    _, right_s, _, wrong_s, which = pairs["cot_misperceived"]
    assert which == "cot"
    assert all(w.startswith("<think>") and w != r for r, w in zip(right_s, wrong_s))
    # the result goes to probe.json: it must serialise
    json.dumps(evaluate.grounding_probe(lambda p, s, w: [0.0] * len(s), rows, records))
