"""The released PRISM file kinds (REFERENCE.md section 7), written the way the official files are,
read through data.py's public loaders (load_sft, load_prompts, load_pairs).

tests/test_data.py already checks one-row files of each kind, every per-field error of the prompt
files (JSONL and parquet), and fuzzes all three loaders. This file adds what it does not cover:
  - whole files: several rows, multi-image and multi-turn chats, a JSON list next to the same rows
    as JSONL, the older `conversations` form loading to exactly what `messages` loads to;
  - parquet files with the explicit nested schema that verl / HF `datasets` exports have
    (images as list<struct<bytes, path>>, reward_model and extra_info as structs);
  - the RL file, which has no teacher_* columns at all;
  - warm-up pairs resolved against the file's folder, an explicit base folder, a relative one;
  - bad rows of the kinds test_data.py does not reach, and --skip_bad_rows counts for every kind.
The last three tests are loader gaps this file found (a deeply nested extra_info string, a pair
prompt holding <image>, segments without their tags), fixed in data.py since.
"""
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data import SYSTEM_PROMPT, DataError, load_pairs, load_prompts, load_sft, open_image

# ---------------------------------------------------------------------------------------------
# helpers: a dataset folder with images, and writers for the three container formats


def png_bytes(colour=(0, 0, 255), size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """tmp_path/images/{chart,geo,scene}.png (different sizes, so a test can tell them apart),
    tmp_path/images/broken.png (a PNG header and nothing else)."""
    (tmp_path / "images").mkdir()
    for name, size in (("chart", (16, 8)), ("geo", (8, 16)), ("scene", (12, 12))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "images" / f"{name}.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return tmp_path


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def write_jsonl(path, rows, blank_after=()):
    """One row per line; a blank line after the rows whose 1-based index is in blank_after (real
    files have them, and the error line numbers must still match the editor's)."""
    with open(path, "w") as f:
        for i, row in enumerate(rows, 1):
            f.write(json.dumps(row) + "\n" + ("\n" if i in blank_after else ""))
    return str(path)


# The column types of a verl prompt parquet as HF `datasets` writes it: the Image feature is a
# struct of (bytes, path), either of which may be null.
MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])
PROMPT_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(MESSAGE)),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string()),
                                ("equivalent_answers", pa.list_(pa.string()))])),
    ("extra_info", pa.struct([("answer", pa.string()), ("index", pa.int64()), ("question", pa.string()),
                              ("split", pa.string())])),
])
TEACHER_COLUMNS = [("teacher_caption", pa.string()), ("teacher_cot", pa.string()),
                   ("teacher_response", pa.string())]


def write_parquet(path, rows, teacher=True, schema=None):
    schema = schema or (pa.schema(list(PROMPT_SCHEMA) + TEACHER_COLUMNS) if teacher else PROMPT_SCHEMA)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return str(path)


def verl_row(i, question, answer, image, teacher=True, equivalent=None):
    """One row of the official alignment file (teacher=True) or RL file (teacher=False)."""
    row = {"data_source": "prism/geometry", "ability": "math",
           "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": f"<image>\n{question}\n"}],
           "images": [image],
           "reward_model": {"style": "rule", "ground_truth": answer, "equivalent_answers": equivalent},
           "extra_info": {"split": "train", "index": i, "answer": answer, "question": question}}
    if teacher:
        caption = f"<caption>- a diagram\n- the label {answer}</caption>"
        cot = f"<think>Read the label.</think>\n<answer>{answer}</answer>"
        row.update(teacher_caption=caption, teacher_cot=cot, teacher_response=caption + cot)
    return row


def one_line(excinfo, path, row, problem):
    """The error is one line that names the file, the row and the problem."""
    msg = str(excinfo.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"{path} row {row}: ") if row else msg.startswith(f"{path}: "), msg
    assert problem in msg, msg


# ---------------------------------------------------------------------------------------------
# SFT (LLaMA-Factory sharegpt): a JSON list or JSONL, `messages` or the older `conversations`

SFT_ROWS = [
    {"messages": [{"role": "system", "content": "You are a careful annotator."},
                  {"role": "user", "content": "<image>\nWhat does the chart show?"},
                  {"role": "assistant", "content": "<caption>- a bar chart</caption><think>Two bars.</think>"
                                                   "<answer>2</answer>"}],
     "images": ["images/chart.png"]},
    {"messages": [{"role": "user", "content": "Compare <image> with <image>: which is taller?"},
                  {"role": "assistant", "content": "The second."}],
     "images": ["images/chart.png", "images/geo.png"]},  # two images, in placeholder order
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "<image>Describe it."},
                  {"role": "assistant", "content": "A square."}],
     "images": ["images/scene.png"]},  # multi-turn, the image in the second user turn
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},  # text only
]
OLD_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_conversations(row):
    """The same row in the older sharegpt form."""
    out = {"conversations": [{"from": OLD_ROLE[m["role"]], "value": m["content"]} for m in row["messages"]]}
    return {**out, "images": row["images"]} if "images" in row else out


def test_sft_json_list_and_jsonl_of_several_rows(folder):
    """Every row's turns, its images resolved against the file's folder in placeholder order, and
    a source naming the row: the list index + 1 for JSON, the line number for JSONL."""
    as_json = load_sft(write_json(folder / "sft.json", SFT_ROWS))
    as_jsonl = load_sft(write_jsonl(folder / "sft.jsonl", SFT_ROWS, blank_after=(1,)))
    for rows, numbers, path in ((as_json, [1, 2, 3, 4], folder / "sft.json"),
                                (as_jsonl, [1, 3, 4, 5], folder / "sft.jsonl")):
        assert [r["messages"] for r in rows] == [r["messages"] for r in SFT_ROWS]
        assert [[os.path.relpath(p, folder) for p in r["images"]] for r in rows] == \
            [r.get("images", []) for r in SFT_ROWS]
        assert [r["source"] for r in rows] == [f"{path} row {n}" for n in numbers]
    assert [open_image(p).size for p in as_json[1]["images"]] == [(16, 8), (8, 16)]


def test_sft_older_conversations_form_loads_like_messages(folder):
    new = load_sft(write_jsonl(folder / "new.jsonl", SFT_ROWS))
    old = load_sft(write_jsonl(folder / "old.jsonl", [as_conversations(r) for r in SFT_ROWS]))
    assert [(r["messages"], r["images"]) for r in old] == [(r["messages"], r["images"]) for r in new]


def test_sft_parquet_with_embedded_image_bytes(folder):
    """sharegpt exported through HF datasets: images as {bytes, path} structs; bytes win over a
    path that is only a file name."""
    schema = pa.schema([("messages", pa.list_(MESSAGE)),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    rows = [{**SFT_ROWS[0], "images": [{"bytes": png_bytes(size=(5, 7)), "path": "000123.png"}]},
            {**SFT_ROWS[1], "images": [{"bytes": None, "path": "images/chart.png"},
                                       {"bytes": png_bytes(size=(3, 3)), "path": None}]}]
    loaded = load_sft(write_parquet(folder / "sft.parquet", rows, schema=schema))
    assert [open_image(x).size for r in loaded for x in r["images"]] == [(5, 7), (16, 8), (3, 3)]
    assert loaded[1]["images"][0] == str(folder / "images" / "chart.png")
    assert loaded[0]["messages"] == SFT_ROWS[0]["messages"]


def conv(*turns, images=None):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    return {**row, "images": images} if images is not None else row


# Bad rows test_data.py does not reach: the older form's placeholder and image checks, tool-call
# roles that LLaMA-Factory's sharegpt allows but PRISM's files never hold, bytes in an SFT file.
BAD_SFT = [
    ("sft.json", {"messages": [{"role": "user", "content": "<image><image>Which?"},
                               {"role": "assistant", "content": "A"}], "images": ["images/chart.png"]},
     "2 <image> placeholder(s) but 1 image(s)"),
    ("sft.json", {"messages": [{"role": "model", "content": "hi"}]}, "message 1: unknown role 'model'"),
    ("old.jsonl", conv(("human", "What is shown?"), ("gpt", "A chart."), images=["images/chart.png"]),
     "0 <image> placeholder(s) but 1 image(s)"),
    ("old.jsonl", conv(("human", "<image>Q"), ("gpt", "A"), images=["images/missing.png"]),
     "image images/missing.png: missing"),
    ("old.jsonl", conv(("human", "<image>Q"), ("gpt", "A"), images=["images/broken.png"]),
     "image images/broken.png: unreadable"),
    ("old.jsonl", conv(("human", "Q"), ("function_call", "{}"), ("gpt", "A")),
     "message 2: unknown role 'function_call'"),
    ("old.jsonl", conv(("human", "Q"), ("gpt", "A"), ("human", "And?")), "does not end with the assistant"),
]


@pytest.mark.parametrize("name,bad,problem", BAD_SFT)
def test_bad_sft_row_is_one_line_naming_file_and_row(folder, name, bad, problem):
    good = SFT_ROWS[0] if name == "sft.json" else as_conversations(SFT_ROWS[0])
    writer = write_json if name.endswith(".json") else write_jsonl
    path = writer(folder / name, [good, good, bad, good])
    with pytest.raises(DataError) as e:
        load_sft(path)
    one_line(e, path, 3, problem)


def test_bad_image_bytes_in_an_sft_parquet(folder):
    schema = pa.schema([("messages", pa.list_(MESSAGE)),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    rows = [{**SFT_ROWS[0], "images": [{"bytes": png_bytes(), "path": None}]},
            {**SFT_ROWS[0], "images": [{"bytes": b"\xff\xd8\xff not a jpeg", "path": "a.jpg"}]}]
    path = write_parquet(folder / "sft.parquet", rows, schema=schema)
    with pytest.raises(DataError) as e:
        load_sft(path)
    one_line(e, path, 2, "image <14 bytes>: unreadable")


# ---------------------------------------------------------------------------------------------
# alignment prompts (verl parquet + teacher_*) and RL prompts (the same without teacher_*)


def test_official_alignment_parquet(folder):
    rows = [verl_row(0, "What is the angle ABC?", "45", {"bytes": png_bytes(size=(6, 4)), "path": "geo_0.png"}),
            verl_row(1, "How many bars?", "3", {"bytes": None, "path": "images/chart.png"}),
            verl_row(2, "What fraction is shaded?", "1/2", {"bytes": None, "path": "images/geo.png"},
                     equivalent=["0.5", "50%"])]
    path = write_parquet(folder / "align.parquet", rows)
    loaded = load_prompts(path, require_teacher=True)
    for got, want, n in zip(loaded, rows, (1, 2, 3)):
        assert got["messages"] == want["prompt"]  # the system instruction and "<image>\n{question}\n"
        assert got["teacher_caption"] == want["teacher_caption"] and got["teacher_cot"] == want["teacher_cot"]
        assert got["teacher_response"] == want["teacher_response"]
        assert got["extra_info"] == want["extra_info"]
        assert got["source"] == f"{path} row {n}"
    assert [r["ground_truth"] for r in loaded] == ["45", "3", ["1/2", "0.5", "50%"]]
    assert isinstance(loaded[0]["images"][0], bytes) and open_image(loaded[0]["images"][0]).size == (6, 4)
    assert loaded[1]["images"] == [str(folder / "images" / "chart.png")]


def test_rl_parquet_has_no_teacher_columns(folder):
    rows = [verl_row(i, f"Q{i}?", str(i), {"bytes": None, "path": "images/chart.png"}, teacher=False)
            for i in range(3)]
    path = write_parquet(folder / "rl.parquet", rows, teacher=False)
    assert "teacher_response" not in pq.read_schema(path).names
    loaded = load_prompts(path)  # rlvr.py --data, --val_data; align.py --val_data; evaluate.py --data
    assert [r["ground_truth"] for r in loaded] == ["0", "1", "2"]
    assert all(r["teacher_caption"] is r["teacher_cot"] is r["teacher_response"] is None for r in loaded)
    assert loaded[2]["extra_info"] == {"split": "train", "index": 2, "answer": "2", "question": "Q2?"}
    # what needs a teacher (align.py --data, sft.py --val_data, discriminator warm-up --prompts)
    # refuses it at the first row, naming the columns it looked for
    with pytest.raises(DataError) as e:
        load_prompts(path, require_teacher=True)
    one_line(e, path, 1, "missing teacher reference (teacher_response, or teacher_caption + teacher_cot)")


@pytest.mark.parametrize("teacher", [True, False])
@pytest.mark.parametrize("role", ["bot", "model", None])
def test_wrong_role_in_a_verl_prompt(folder, teacher, role):
    good = verl_row(0, "Q?", "1", {"bytes": None, "path": "images/chart.png"}, teacher=teacher)
    bad = {**good, "prompt": [good["prompt"][0], {"role": role, "content": good["prompt"][1]["content"]}]}
    path = write_parquet(folder / "p.parquet", [good, bad], teacher=teacher)
    with pytest.raises(DataError) as e:
        load_prompts(path, require_teacher=teacher)
    one_line(e, path, 2, f"message 2: unknown role {role!r}")


# ---------------------------------------------------------------------------------------------
# discriminator warm-up pairs (JSONL), images relative to a base folder

PAIR = {"prompt": "How many bars are there?", "image": "images/chart.png",
        "teacher_caption": "<caption>- a bar chart with 3 bars</caption>",
        "teacher_cot": "<think>Count them: 3.</think>\n<answer>3</answer>",
        "student_caption": "<caption>- a chart</caption>",
        "student_cot": "<think>Looks like 2.</think>\n<answer>2</answer>"}


def test_pairs_resolve_against_the_file_folder_or_a_base(folder, tmp_path_factory, monkeypatch):
    beside = load_pairs(write_jsonl(folder / "pairs.jsonl", [PAIR, {**PAIR, "image": "images/geo.png"}]))
    assert [r["image"] for r in beside] == [str(folder / "images" / n) for n in ("chart.png", "geo.png")]
    assert {k: beside[0][k] for k in PAIR if k != "image"} == {k: v for k, v in PAIR.items() if k != "image"}
    # pairs written elsewhere: --pairs_base names the folder the paths are relative to; a relative
    # base is taken from the working directory
    elsewhere = write_jsonl(tmp_path_factory.mktemp("pairs") / "warmup_pairs.jsonl", [PAIR])
    assert load_pairs(elsewhere, base_dir=str(folder))[0]["image"] == str(folder / "images" / "chart.png")
    monkeypatch.chdir(folder.parent)
    assert load_pairs(elsewhere, base_dir=folder.name)[0]["image"] == str(folder / "images" / "chart.png")
    with pytest.raises(DataError) as e:  # without the base, the images are looked for beside the file
        load_pairs(elsewhere)
    one_line(e, elsewhere, 1, "image images/chart.png: missing")


@pytest.mark.parametrize("change,problem", [
    ({"image": "images/broken.png"}, "image images/broken.png: unreadable"),
    ({"image": "images/missing.png"}, "image images/missing.png: missing"),
    ({"image": None}, "missing 'image'"),
    ({"image": ["images/chart.png"]}, "image spec must be a path or a {bytes, path} dict"),
    ({"student_cot": "   "}, "missing or empty 'student_cot'"),
    ({"prompt": "", "question": None}, "missing or empty 'prompt' (or 'question')"),
])
def test_bad_pair_rows(folder, change, problem):
    path = write_jsonl(folder / "pairs.jsonl", [PAIR, {**PAIR, **change}], blank_after=(1,))
    with pytest.raises(DataError) as e:
        load_pairs(path)
    one_line(e, path, 3, problem)  # line 3: the blank line 2 is counted


# ---------------------------------------------------------------------------------------------
# --skip_bad_rows: every kind skips its bad rows and reports them in one line


def skip_cases(folder):
    """(loader kwargs, path, the row numbers that load, how many were bad) for each file kind."""
    img = {"bytes": None, "path": "images/chart.png"}
    sft_bad = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
               "images": ["images/chart.png"]}
    align = [verl_row(0, "Q0", "0", img), {**verl_row(1, "Q1", "1", img), "teacher_response": None,
                                           "teacher_caption": None},
             verl_row(2, "Q2", "2", img), verl_row(3, "Q3", "3", {"bytes": b"junk", "path": None})]
    rl = [verl_row(0, "Q0", "0", img, teacher=False),
          {**verl_row(1, "Q1", "1", img, teacher=False), "reward_model": {"style": "rule", "ground_truth": None}},
          {**verl_row(2, "Q2", "2", img, teacher=False), "images": []}, verl_row(3, "Q3", "3", img, teacher=False)]
    return [
        (load_sft, {}, write_json(folder / "sft.json", [sft_bad, SFT_ROWS[0], sft_bad, SFT_ROWS[1]]), [2, 4], 2),
        (load_sft, {}, write_jsonl(folder / "old.jsonl", [as_conversations(SFT_ROWS[0]), conv(("bot", "x")),
                                                           as_conversations(SFT_ROWS[3])]), [1, 3], 1),
        (load_prompts, {"require_teacher": True}, write_parquet(folder / "align.parquet", align), [1, 3], 2),
        (load_prompts, {}, write_parquet(folder / "rl.parquet", rl, teacher=False), [1, 4], 2),
        (load_pairs, {}, write_jsonl(folder / "pairs.jsonl", [{**PAIR, "image": "images/missing.png"}, PAIR,
                                                               {**PAIR, "teacher_cot": None}, PAIR]), [2, 4], 2),
    ]


@pytest.mark.parametrize("case", range(5), ids=["sft-json", "sft-conversations", "align-parquet",
                                                 "rl-parquet", "pairs-jsonl"])
def test_skip_bad_rows_counts_for_every_kind(folder, case):
    loader, kwargs, path, kept, n_bad = skip_cases(folder)[case]
    with pytest.raises(DataError):  # without the flag the first bad row stops the load
        loader(path, **kwargs)
    lines = []
    rows = loader(path, skip_bad_rows=True, log=lines.append, **kwargs)
    assert [r["source"] for r in rows] == [f"{path} row {n}" for n in kept]
    total = len(kept) + n_bad
    assert len(lines) == 1 and lines[0].startswith(f"{path}: skipped {n_bad} of {total} rows (first: row "), lines


# ---------------------------------------------------------------------------------------------
# loader gaps found while writing this file (issue 6), fixed in data.py


def test_deeply_nested_extra_info_string_is_a_bad_row(folder):
    good = verl_row(0, "Q?", "1", "images/chart.png")
    path = write_jsonl(folder / "p.jsonl", [good, {**good, "extra_info": "[" * 100_000}])
    with pytest.raises(DataError) as e:
        load_prompts(path, require_teacher=True)
    one_line(e, path, 2, "extra_info")


def test_pair_prompt_with_an_image_placeholder(folder):
    """The official pairs hold plain text; discriminator.pair_prompt puts "<image>\\n" in front. A
    prompt that already has one gives two placeholders for one image, and the processor fails at
    the first batch that draws the row. The loader should strip it or name the row."""
    path = write_jsonl(folder / "pairs.jsonl", [PAIR, {**PAIR, "prompt": "<image>\nHow many bars?"}])
    try:
        rows = load_pairs(path)
    except DataError as e:
        assert str(e).startswith(f"{path} row 2: ")
    else:
        assert "<image>" not in rows[1]["prompt"]


@pytest.mark.parametrize("kind", ["align", "pairs"])
def test_segments_without_their_tags(folder, kind):
    """teacher_caption is `<caption>..</caption>` and teacher_cot `<think>..</think><answer>..</answer>`
    (REFERENCE 7); the discriminator compares them with the policy's tagged segments, so an untagged
    one is told apart by its tags alone. The loader should name the row."""
    if kind == "align":
        row = {**verl_row(0, "Q?", "1", "images/chart.png"), "teacher_caption": "- a bar chart"}
        path, load = write_jsonl(folder / "a.jsonl", [row]), lambda p: load_prompts(p, require_teacher=True)
    else:
        path, load = write_jsonl(folder / "pairs.jsonl", [{**PAIR, "teacher_cot": "3"}]), load_pairs
    with pytest.raises(DataError) as e:
        load(path)
    one_line(e, path, 1, "teacher_")
