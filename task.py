"""
task.py -- the synthetic visual-reasoning task that every nanoPRISM stage trains and evaluates on.

Why synthetic? This machine cannot download datasets, and a task we generate ourselves has two things
a student needs: the ground truth is known exactly (so perception and reasoning can be scored
separately), and a tiny model learns it in minutes on a CPU (docs/measured.md#what-a-tiny-model-learns-on-2-cores).

The world: a white square image with 2-8 flat coloured shapes. Every question needs perception (what
is in the image?) AND reasoning (count, add, subtract, compare, pick an option). Three levels:
  level 1: 2-3 objects, one-step questions (count a colour / a shape / both)
  level 2: 3-5 objects, one- or two-step questions
  level 3: 5-8 objects, two-step questions (sum, difference, comparison, multiple choice)

Two black-box demonstrators answer in PRISM's three-block format (docs/algorithms.md#response-format-and-reward); only their
TEXT is ever used, never logits:
  teacher_response  high fidelity: the caption lists every object, every reasoning step, right answer.
                    It plays the paper's strong teacher whose references drive alignment (stage 2).
  public_response   low fidelity: terse or partial captions, skipped steps and `error_rate` wrong
                    answers (from a miscounted object). It plays the paper's large public SFT mixture.
The default SFT set is half public, half teacher, not the paper's "mostly public": with 6,000 public
and 1,000 teacher rows the tiny model was still at chance after 900 of its 1,200 SFT steps (val
accuracy 0.395 vs chance 0.414), while half/half reached 0.61 (sft.py defaults, seed 0).

Files written to DIR (official PRISM schemas, docs/data-formats.md; paths inside are relative to DIR):
  images/{split}_{i:06d}.png             one PNG per record
  sft_public.json, sft_teacher.json      LLaMA-Factory sharegpt lists                    (stage 1)
  align_prompts.parquet                  verl prompts + teacher_caption/_cot/_response   (stage 2)
  rl_prompts.parquet                     verl prompts without the teacher columns        (stage 3)
  val.parquet, test.parquet              held-out prompts with teacher columns           (evaluation)
  meta.json                              seed, sizes, text-only chance rate, answer distribution
All training files come from the "train" split; train/val/test never share a scene.

Usage:
  python task.py --out data/tiny --seed 0  # default sizes: 10,700 images, 5-6 s wall on 2 CPU cores
                                           # (measured), 48 MB; text-only chance 0.418, public errors 0.197
  python task.py -h                        # every option
"""
import argparse
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from data import SYSTEM_PROMPT  # the instruction text has one home: data.py

# ----------------------------------------------------------------------------------------------------
# The world

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
# Saturated and far apart in RGB, so an 8x8 patch of one colour is never ambiguous for a tiny ViT.
RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 230), "yellow": (240, 200, 20)}
BACKGROUND = (255, 255, 255)
MIN_SIZE, MAX_SIZE, GAP = 14, 20, 2  # object side in px; min free px between bounding boxes

# Which question types each difficulty level may ask (one-step = a single count).
ONE_STEP = ["count_color", "count_shape", "count_both"]
TWO_STEP = ["sum", "diff", "compare", "choice"]
LEVELS = {1: dict(objects=(2, 3), qtypes=ONE_STEP),
          2: dict(objects=(3, 5), qtypes=ONE_STEP + TWO_STEP),
          3: dict(objects=(5, 8), qtypes=TWO_STEP)}
ANSWERS = [str(i) for i in range(9)] + ["yes", "no", "A", "B", "C", "D"]  # every legal answer string
DATA_SOURCE = "nanoprism/shapes"


def check_image_size(image_size):
    # Multiples of 32 keep every patch size / spatial merge we use (8x2, 16x2) an exact tiling; below
    # 64 px even a level-2 scene may not fit its objects.
    if image_size % 32 != 0 or image_size < 64:
        raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {image_size}")


def _apart(x, y, size, o):
    """True if the box (x, y, size) keeps at least GAP free pixels from object o's box."""
    return (x + size + GAP <= o["x"] or o["x"] + o["size"] + GAP <= x or
            y + size + GAP <= o["y"] or o["y"] + o["size"] + GAP <= y)


def sample_scene(rng, n_objects, image_size=96):
    """Place n_objects non-overlapping objects by rejection sampling; restart if the image gets full."""
    check_image_size(image_size)
    for _restart in range(1000):
        objects = []
        while len(objects) < n_objects:
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            for _try in range(200):
                x, y = rng.randint(0, image_size - size), rng.randint(0, image_size - size)
                if all(_apart(x, y, size, o) for o in objects):
                    break
            else:
                break  # no room left for this one: throw the whole scene away
            # Colour and shape are uniform and independent, so no attribute predicts another.
            objects.append(dict(color=rng.choice(COLORS), shape=rng.choice(SHAPES), x=x, y=y, size=size))
        if len(objects) == n_objects:
            return dict(objects=objects, image_size=image_size)
    raise RuntimeError(f"cannot place {n_objects} objects in a {image_size}px image")


def scene_key(scene):
    """The scene's identity for split disjointness: the sorted multiset of its objects."""
    return tuple(sorted((o["color"], o["shape"], o["x"], o["y"], o["size"]) for o in scene["objects"]))


def render(scene):
    """Draw the scene: flat fills, no anti-aliasing, so an object's pixels are exactly its colour."""
    s = scene["image_size"]
    image = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        x, y, z, fill = o["x"], o["y"], o["size"], RGB[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([x, y, x + z - 1, y + z - 1], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x, y, x + z - 1, y + z - 1], fill=fill)
        else:  # apex up; the box centre lies inside, which the render test relies on
            draw.polygon([(x + (z - 1) / 2, y), (x, y + z - 1), (x + z - 1, y + z - 1)], fill=fill)
    return image


# ----------------------------------------------------------------------------------------------------
# Questions. Each function is (objects, params, rng, level) -> (question_text, answer_str, steps).
# On the first call `params` is empty and the function fills it with its random choices (which colour,
# which pair, ...); called again with the filled params it re-asks the SAME question about another
# object list. That is how the public demonstrator answers a question about a scene it misperceived.

ATTRS = {"color": COLORS, "shape": SHAPES}  # params keys are "colors" / "shapes": lists of values


def count(objects, color=None, shape=None):
    return sum((color is None or o["color"] == color) and (shape is None or o["shape"] == shape)
               for o in objects)


def label(color=None, shape=None):
    """How questions and reasoning steps name a group: 'red objects', 'circles', 'blue squares'."""
    return f"{color} {shape}s" if color and shape else f"{color} objects" if color else f"{shape}s"


def _pick(rng, objects, attr, k=1):
    """k distinct colours or shapes: each half the time one present in the image, half the time any, so
    absent ones (answer 0) are asked about too. Only-present would make "1" the answer to most level-1
    questions, only-any would make it "0": either way the text alone would give the answer away."""
    present = sorted({o[attr] for o in objects}, key=ATTRS[attr].index)
    picked = []
    while len(picked) < k:
        value = rng.choice(present if rng.random() < 0.5 else ATTRS[attr])
        if value not in picked:
            picked.append(value)
    return picked


def q_count(objects, p, rng=None, level=2, attrs=("color",)):
    """count_color / count_shape / count_both: a single count."""
    if not p:
        if len(attrs) == 1:
            p[attrs[0] + "s"] = _pick(rng, objects, attrs[0])
        elif rng.random() < 0.5:  # count_both: a real object half the time (else the pair is mostly absent)
            o = rng.choice(objects)
            p.update(colors=[o["color"]], shapes=[o["shape"]])
        else:  # ... and any colour + shape the other half
            p.update(colors=[rng.choice(COLORS)], shapes=[rng.choice(SHAPES)])
    what = dict(color=p.get("colors", [None])[0], shape=p.get("shapes", [None])[0])
    n = count(objects, **what)
    return f"How many {label(**what)} are there?", str(n), [f"{label(**what)}: {n}"]


def q_sum(objects, p, rng=None, level=2):
    if not p:
        p["colors"] = _pick(rng, objects, "color", k=2)
    (a, b), (na, nb) = p["colors"], [count(objects, color=c) for c in p["colors"]]
    return (f"How many {a} or {b} objects are there in total?", str(na + nb),
            [f"{label(a)}: {na}", f"{label(b)}: {nb}", f"{na} + {nb} = {na + nb}"])


def q_diff(objects, p, rng=None, level=2):
    if not p:  # order the pair so the true answer is >= 0 (a tie gives 0)
        p["colors"] = sorted(_pick(rng, objects, "color", k=2), key=lambda c: -count(objects, color=c))
    (a, b), (na, nb) = p["colors"], [count(objects, color=c) for c in p["colors"]]
    # On a misperceived scene this can be negative: "-1" is not in ANSWERS, so that mistake is skipped.
    return (f"How many more {a} objects than {b} objects are there?", str(na - nb),
            [f"{label(a)}: {na}", f"{label(b)}: {nb}", f"{na} - {nb} = {na - nb}"])


def q_compare(objects, p, rng=None, level=2):
    if not p:
        attr = rng.choice(list(ATTRS))
        for _ in range(3):  # a tie always answers "no": redraw a tied pair a few times
            pair = _pick(rng, objects, attr, k=2)
            if count(objects, **{attr: pair[0]}) != count(objects, **{attr: pair[1]}):
                break
        # Random order, so "yes" (first > second) is as likely as "no" and the text predicts neither.
        p[attr + "s"] = sorted(pair, key=lambda v: count(objects, **{attr: v}), reverse=rng.random() < 0.5)
    attr = "color" if "colors" in p else "shape"
    a, b = (label(**{attr: v}) for v in p[attr + "s"])
    na, nb = (count(objects, **{attr: v}) for v in p[attr + "s"])
    answer, sign = ("yes", ">") if na > nb else ("no", "<" if na < nb else "=")
    return (f"Are there more {a} than {b}? Answer yes or no.", answer,
            [f"{a}: {na}", f"{b}: {nb}", f"{na} {sign} {nb}, so {answer}"])


def q_choice(objects, p, rng=None, level=2):
    """A count question with four options; at level 3 the count itself is two-step (sum or diff)."""
    if not p:
        p.update(inner=rng.choice(["sum", "diff"] if level == 3 else ONE_STEP + ["sum"]), inner_params={})
    question, answer, steps = QUESTIONS[p["inner"]](objects, p["inner_params"], rng, level)
    n = int(answer)
    if "options" not in p:
        # Four consecutive numbers in 0..8 containing the answer, shuffled: the letter is uniform, and
        # where the window starts says little about the answer.
        start = rng.randint(max(0, n - 3), min(n, 5))
        p["options"] = rng.sample(range(start, start + 4), 4)
    options = " ".join(f"{L}. {v}" for L, v in zip("ABCD", p["options"]))
    letter = "ABCD"[p["options"].index(n)] if n in p["options"] else "none"  # "none" is not legal
    return (f"{question} Options: {options}. Answer with the letter.", letter,
            steps + [f"{n} is option {letter}"])


# The three count types share one function; partial fixes which attributes they ask about.
QUESTIONS = {"count_color": partial(q_count, attrs=("color",)),
             "count_shape": partial(q_count, attrs=("shape",)),
             "count_both": partial(q_count, attrs=("color", "shape")),
             "sum": q_sum, "diff": q_diff, "compare": q_compare, "choice": q_choice}


def make_records(split, n, seed, image_size=96, levels=(1, 2, 3), exclude=()):
    """n records of one split: dict(split, index, scene, level, qtype, question, answer, steps, params).
    Each split has its own derived seed; scenes in `exclude` (scene_key) or already drawn are resampled."""
    rng = random.Random(f"nanoprism/{split}/{seed}")  # str seeds hash with sha512: stable across runs
    taken, records = set(exclude), []
    while len(records) < n:
        # Levels are mixed uniformly, not as a curriculum: stage 3 later keeps the prompts whose pass
        # rate is strictly between 0 and 1 (docs/algorithms.md#difficulty-filter), so it needs easy and hard ones.
        level = rng.choice(list(levels))
        lo, hi = LEVELS[level]["objects"]
        scene = sample_scene(rng, rng.randint(lo, hi), image_size)
        if scene_key(scene) in taken:
            continue
        taken.add(scene_key(scene))
        qtype, params = rng.choice(LEVELS[level]["qtypes"]), {}
        question, answer, steps = QUESTIONS[qtype](scene["objects"], params, rng, level)
        records.append(dict(split=split, index=len(records), scene=scene, level=level, qtype=qtype,
                            question=question, answer=answer, steps=steps, params=params))
    return records


# ----------------------------------------------------------------------------------------------------
# Demonstrators (black-box: they return text only)

def describe(objects):
    """'2 red circles, 1 red square, 1 blue triangle': grouped and sorted by COLORS then SHAPES order."""
    groups = Counter((o["color"], o["shape"]) for o in objects)
    keys = sorted(groups, key=lambda k: (COLORS.index(k[0]), SHAPES.index(k[1])))
    return ", ".join(f"{groups[k]} {k[0]} {k[1]}{'s' if groups[k] != 1 else ''}" for k in keys) or "none"


def format_response(caption_lines, think_lines, answer):
    return ("<caption>\n" + "\n".join(caption_lines) + "\n</caption>\n<think>\n" +
            "\n".join(think_lines) + f"\n</think>\n<answer>{answer}</answer>")


def split_response(response):
    """(caption, cot): '<caption>...</caption>' and '<think>...</think>\\n<answer>...</answer>'."""
    cut = response.index("</caption>") + len("</caption>")
    return response[:cut].strip(), response[cut:].strip()


def teacher_response(scene, record):
    """High fidelity: style line, EVERY object, 'no text' line, every reasoning step, right answer.
    Compact on purpose (< ~70 words) because a tiny model has to generate it token by token."""
    # The three bullets of the official caption (style, key objects, text); our images hold no text,
    # but keeping the bullet keeps the paper's caption shape.
    caption = ["- style: flat shapes on a white background",
               "- objects: " + describe(scene["objects"]), "- text: none"]
    return format_response(caption, record["steps"], record["answer"])


def _relevant(o, qtype, p):
    """Is object o about what the question asks? (for the public demonstrator's partial captions)"""
    if qtype == "choice":
        return _relevant(o, p["inner"], p["inner_params"])
    return (o["color"] in p.get("colors", [o["color"]])) and (o["shape"] in p.get("shapes", [o["shape"]]))


def _misperceptions(objects):
    """Every single-object perception mistake: missed it, counted it twice, mistook colour/shape."""
    out = []
    for i, o in enumerate(objects):
        rest = objects[:i] + objects[i + 1:]
        out += [rest, objects + [o]]
        out += [rest + [dict(o, color=c, shape=s)] for c in COLORS for s in SHAPES
                if (c, s) != (o["color"], o["shape"])]
    return out


def misperceive(objects, record, rng):
    """A wrong answer whose reasoning is consistent with one misperceived object.
    Returns (perceived objects, steps, answer). We try single mistakes in random order and keep the
    first that changes the answer to another legal one. Rarely none does (e.g. "more circles than
    squares?" with 0 vs 4): then the demonstrator slips in its last reasoning step instead."""
    # Consistent reasoning on top of a wrong perception is the error that PRISM's two experts separate:
    # the caption is wrong (perception), the think block is right given that caption (reasoning).
    qfn, params = QUESTIONS[record["qtype"]], record["params"]  # params are complete: nothing is re-drawn
    candidates = _misperceptions(objects)
    rng.shuffle(candidates)
    for seen in candidates:
        _, answer, steps = qfn(seen, params)
        if answer != record["answer"] and answer in ANSWERS:
            return seen, steps, answer
    a = record["answer"]
    same_kind = ["yes", "no"] if a in ("yes", "no") else list("ABCD") if a in "ABCD" else \
        [str(int(a) - 1), str(int(a) + 1)]
    wrong = rng.choice([w for w in same_kind if w != a and w in ANSWERS])
    return objects, record["steps"][:-1] + [f"so the answer is {wrong}"], wrong


def public_response(scene, record, rng, error_rate=0.2):
    """Low fidelity, mixture of styles: still three valid blocks, but the caption is partial / a total /
    vague, the reasoning is all steps / only the last / one sentence, and with probability error_rate
    the answer is wrong because an object was misperceived (caption and steps follow that mistake)."""
    # Why this matters: SFT on such data teaches the format but a sloppy perception habit (a caption
    # that skips objects), which is exactly what stage 2's perception expert is there to correct.
    objects, steps, answer = scene["objects"], record["steps"], record["answer"]
    if rng.random() < error_rate:
        objects, steps, answer = misperceive(objects, record, rng)
    style = rng.choice(["relevant", "total", "vague", "list"])
    if style == "relevant":  # only what the question is about
        caption = ["- objects: " + describe([o for o in objects
                                             if _relevant(o, record["qtype"], record["params"])])]
    elif style == "total":
        caption = [f"- objects: {len(objects)} shapes"]
    elif style == "vague":
        caption = ["- some coloured shapes"]
    else:  # the full list but without the style and text bullets
        caption = ["- objects: " + describe(objects)]
    think = rng.choice(["full", "final", "sentence"])
    lines = steps if think == "full" else steps[-1:] if think == "final" else \
        [rng.choice(["The answer is {}.", "Looking at the image, the answer is {}."]).format(answer)]
    return format_response(caption, lines, answer)


# ----------------------------------------------------------------------------------------------------
# Baselines and tokenizer corpus

def text_only_chance(train_records, test_records):
    """Test accuracy of the best text-only predictor learned on train: the most frequent training answer
    for the exact question text, else for its question type, else overall. If this were near 1 the
    model could ignore the image; it is the floor that every stage must beat."""
    by_text, by_type, overall = defaultdict(Counter), defaultdict(Counter), Counter()
    for r in train_records:
        by_text[r["question"]][r["answer"]] += 1
        by_type[r["qtype"]][r["answer"]] += 1
        overall[r["answer"]] += 1
    hits, totals = Counter(), Counter()
    for r in test_records:
        table = by_text.get(r["question"]) or by_type.get(r["qtype"]) or overall
        hits[r["qtype"]] += table.most_common(1)[0][0] == r["answer"]
        totals[r["qtype"]] += 1
    return dict(overall=sum(hits.values()) / max(1, len(test_records)),
                by_type={t: hits[t] / totals[t] for t in sorted(totals)})


def corpus(seed=0, n=2000):
    """Texts covering everything the tokenizer will see: the system prompt, questions of every type,
    teacher and public responses (including wrong ones), and every legal answer string."""
    rng = random.Random(f"nanoprism/corpus-public/{seed}")
    # Wrong public answers are included on purpose: the tokenizer must cover whatever the policy may
    # write, not only correct text. The system prompt appears once; how to weight it is the caller's call.
    texts = [SYSTEM_PROMPT, " ".join(ANSWERS)]
    for r in make_records("corpus", n, seed):
        texts += ["<image>\n" + r["question"], teacher_response(r["scene"], r),
                  public_response(r["scene"], r, rng)]
    return texts


# ----------------------------------------------------------------------------------------------------
# Writers. Every file goes to a temp name first and is renamed into place, so a crashed or concurrent
# run never leaves a half-written file that a later stage would silently read.

def _atomic_json(path, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def sft_example(record, response):
    """One LLaMA-Factory sharegpt example: one <image> placeholder for the one image path."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": "<image>\n" + record["question"]},
                         {"role": "assistant", "content": response}],
            "images": [record["image"]]}


def _prompt_schema(with_teacher):
    # Explicit schema: pyarrow would otherwise infer `bytes` (always null here) as type null, which
    # verl/HF-datasets image loaders do not expect.
    s, i = pa.string(), pa.int64()
    fields = [("data_source", s), ("prompt", pa.list_(pa.struct([("role", s), ("content", s)]))),
              ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", s)]))), ("ability", s),
              ("reward_model", pa.struct([("style", s), ("ground_truth", s)])),
              ("extra_info", pa.struct([("split", s), ("index", i), ("answer", s), ("question", s),
                                        ("qtype", s), ("level", i), ("scene", s)]))]
    if with_teacher:
        fields += [(k, s) for k in ("teacher_caption", "teacher_cot", "teacher_response")]
    return pa.schema(fields)


def prompt_row(record, with_teacher):
    """One verl prompt row. The scene rides along as JSON so later stages can score perception."""
    r = record
    row = dict(data_source=DATA_SOURCE,
               prompt=[{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": "<image>\n" + r["question"] + "\n"}],
               images=[{"bytes": None, "path": r["image"]}], ability="visual_reasoning",
               reward_model={"style": "rule", "ground_truth": r["answer"]},
               extra_info=dict(split=r["split"], index=r["index"], answer=r["answer"],
                               question=r["question"], qtype=r["qtype"], level=r["level"],
                               scene=json.dumps(r["scene"], sort_keys=True)))
    if with_teacher:
        response = teacher_response(r["scene"], r)
        caption, cot = split_response(response)
        row.update(teacher_caption=caption, teacher_cot=cot, teacher_response=response)
    return row


def _write_prompts(path, records, with_teacher):
    table = pa.Table.from_pylist([prompt_row(r, with_teacher) for r in records],
                                 schema=_prompt_schema(with_teacher))
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_dataset(out, seed=0, n_sft_public=3500, n_sft_teacher=3500, n_align=1000, n_rl=2000,
                  n_val=200, n_test=500, image_size=96, error_rate=0.2, levels=(1, 2, 3)):
    """Generate every split, render the images and write all files into `out`. Returns meta.json's dict."""
    t0 = time.time()
    check_image_size(image_size)  # before anything is written
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    # Held-out splits first; each later split resamples any scene an earlier one holds, so no scene
    # (hence no image) is ever in two splits, and train can never leak into evaluation.
    splits, taken = {}, set()
    n_train = n_sft_public + n_sft_teacher + n_align + n_rl
    for split, n in [("test", n_test), ("val", n_val), ("train", n_train)]:
        splits[split] = make_records(split, n, seed, image_size, levels, exclude=taken)
        taken |= {scene_key(r["scene"]) for r in splits[split]}
    for r in splits["test"] + splits["val"] + splits["train"]:
        r["image"] = f"images/{r['split']}_{r['index']:06d}.png"
        path = os.path.join(out, r["image"])
        render(r["scene"]).save(path + ".tmp", format="PNG")  # lossless: pixel colours stay exact
        os.replace(path + ".tmp", path)
    # The train split is cut into four consecutive, hence scene-disjoint, pieces: the SFT sets, the
    # alignment prompts and the RL prompts never repeat an image either (as in the paper's recipe).
    train, a = splits["train"], n_sft_public
    b, c = a + n_sft_teacher, a + n_sft_teacher + n_align
    parts = dict(sft_public=train[:a], sft_teacher=train[a:b], align_prompts=train[b:c], rl_prompts=train[c:],
                 val=splits["val"], test=splits["test"])

    rng = random.Random(f"nanoprism/public/{seed}")
    public = [sft_example(r, public_response(r["scene"], r, rng, error_rate)) for r in parts["sft_public"]]
    wrong = sum(re.search(r"<answer>(.*?)</answer>", row["messages"][2]["content"]).group(1) != r["answer"]
                for row, r in zip(public, parts["sft_public"]))
    _atomic_json(os.path.join(out, "sft_public.json"), public)
    _atomic_json(os.path.join(out, "sft_teacher.json"),
                 [sft_example(r, teacher_response(r["scene"], r)) for r in parts["sft_teacher"]])
    for name in ["align_prompts", "rl_prompts", "val", "test"]:  # RL prompts carry no teacher reference
        _write_prompts(os.path.join(out, name + ".parquet"), parts[name], with_teacher=name != "rl_prompts")

    # Chance is learned from the public SFT questions (what stage 1 sees) and measured on test.
    chance = text_only_chance(parts["sft_public"], parts["test"])
    meta = dict(seed=seed, image_size=image_size, colors=COLORS, shapes=SHAPES, levels=list(levels),
                error_rate=error_rate, public_error_rate_measured=wrong / max(1, len(public)),
                sizes={name: len(recs) for name, recs in parts.items()},
                chance=chance,  # the text-only baseline: overall and by question type
                answer_distribution={name: dict(sorted(Counter(r["answer"] for r in recs).items()))
                                     for name, recs in parts.items()})
    _atomic_json(os.path.join(out, "meta.json"), meta)  # no timestamps: same seed -> same bytes
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in meta["sizes"].items()) +
          f"; public errors {meta['public_error_rate_measured']:.3f}; "
          f"text-only chance {chance['overall']:.3f}; {time.time() - t0:.1f}s")
    return meta


def ensure_default(paths, out="data/tiny", log=print):
    """Write the embedded dataset (seed 0, default sizes) when a stage asks for files under `out` that
    are not there yet, so `python sft.py` works on a fresh clone without a separate step."""
    if any(os.path.normpath(p).startswith(os.path.normpath(out) + os.sep) and not os.path.exists(p) for p in paths):
        log(f"{out} is missing: writing the embedded synthetic task (python task.py --out {out} --seed 0)")
        write_dataset(out, seed=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the nanoPRISM synthetic shapes dataset.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--seed", type=int, default=0, help="everything is derived from this seed")
    ap.add_argument("--n_sft_public", type=int, default=3500, help="low-fidelity SFT examples")
    ap.add_argument("--n_sft_teacher", type=int, default=3500, help="teacher SFT examples")
    ap.add_argument("--n_align", type=int, default=1000, help="alignment prompts (with teacher refs)")
    ap.add_argument("--n_rl", type=int, default=2000, help="RLVR prompts")
    ap.add_argument("--n_val", type=int, default=200, help="validation prompts")
    ap.add_argument("--n_test", type=int, default=500, help="test prompts")
    ap.add_argument("--image_size", type=int, default=96, help="image side in px, a multiple of 32")
    ap.add_argument("--error_rate", type=float, default=0.2, help="public demonstrator's wrong-answer rate")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                    help="difficulty levels to sample uniformly from")
    args = ap.parse_args(argv)
    try:  # bad values end as a one-line usage error, not a traceback
        check_image_size(args.image_size)
        if not 0 <= args.error_rate <= 1:
            raise ValueError(f"error_rate must be in [0, 1], got {args.error_rate}")
    except ValueError as e:
        ap.error(str(e))
    write_dataset(**{k: (tuple(v) if k == "levels" else v) for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
