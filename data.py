"""Data for nanoPRISM: the response format, the verifiable reward, and reading data files.

Read top to bottom:
  1. the three-block response format every policy answer must follow
     (docs/algorithms.md#response-format-and-reward),
  2. parsing a response into caption / think / answer, and splitting it for the discriminator,
  3. the RLVR reward: 0 for a bad format, else 0.8 * correct + 0.2,
  4. loaders for the four file kinds of docs/data-formats.md (SFT chats, prompts with optional
     teacher references, discriminator warm-up pairs), which report bad rows instead of crashing.
Nothing here imports torch; the SFT collation section at the end does so lazily.
"""
import io
import json
import os
import re

from answers import answers_match

# ---- the response format ----

SYSTEM_PROMPT = (
    "Answer in exactly three blocks. First <caption></caption>: bullet points describing the "
    "image's style, its key objects and any text in it. Then <think></think>: your step-by-step "
    "reasoning. Then <answer></answer>: the final answer only."
)
# The definition of a valid response. We never run it on model output (see _locate for why);
# tests check that our linear-time parser agrees with it on every string.
FORMAT_RE = re.compile(
    r"^\s*<caption>.*?</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL
)
_CAPTION_END = re.compile(r"</caption>\s*<think>")
_THINK_END = re.compile(r"</think>\s*<answer>")


def _locate(text):
    """Where FORMAT_RE would match: (start, caption_end, think_end, end) or None.

    FORMAT_RE itself backtracks: on a string with many "</caption>"s, "</think>"s and "</answer>"s
    that fails at the very end it tries every combination, which is cubic. The same language in
    linear time: strip outer whitespace (str.strip and regex \\s agree on what whitespace is), the
    rest must start with <caption> and end with </answer>; then take the EARLIEST
    "</caption> <think>" and after it the earliest "</think> <answer>". Taking the earliest leaves
    the most room for what follows, so if any split works this one does, and it is also the split
    the non-greedy regex picks. The answer runs to the last </answer>.
    """
    start, end = len(text) - len(text.lstrip()), len(text.rstrip())
    if not text.startswith("<caption>", start) or not text.endswith("</answer>", start, end):
        return None
    cap = _CAPTION_END.search(text, start + len("<caption>"), end)
    if cap is None:
        return None
    think = _THINK_END.search(text, cap.end(), end)
    if think is None or think.end() > end - len("</answer>"):
        return None  # the <answer> tag would overlap the closing </answer>
    return start, cap, think, end


def _inner(text, tag):
    """Text between the first <tag> and the next </tag>, stripped; None if either is absent."""
    i = text.find(f"<{tag}>")
    j = text.find(f"</{tag}>", i + len(tag) + 2) if i >= 0 else -1
    return text[i + len(tag) + 2 : j].strip() if j >= 0 else None


def parse_response(text):
    """-> dict(caption, think, answer, valid). valid is exactly bool(FORMAT_RE.match(text)).
    Invalid responses still get whatever blocks can be found (None where absent): useful in logs."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    loc = _locate(text)
    if loc is None:
        return dict(caption=_inner(text, "caption"), think=_inner(text, "think"),
                    answer=_inner(text, "answer"), valid=False)
    start, cap, think, end = loc
    return dict(caption=text[start + len("<caption>") : cap.start()].strip(),
                think=text[cap.end() : think.start()].strip(),
                answer=text[think.end() : end - len("</answer>")].strip(), valid=True)


def split_segments(text):
    """-> (perception, reasoning): "<caption>...</caption>" and "<think>...</think>...<answer>...
    </answer>" as written (tags included), or (None, None) when the format is invalid. The
    discriminator scores the two separately (docs/algorithms.md#discriminator-scores)."""
    loc = _locate(text) if isinstance(text, str) else None
    if loc is None:
        return None, None
    start, cap, _, end = loc
    return (text[start : cap.start() + len("</caption>")],
            text[cap.end() - len("<think>") : end])


# ---- the verifiable reward ----
# The answer matcher (numbers, fractions, LaTeX, units, option letters, yes/no, math_verify with
# time guards) is long and self-contained, so it lives in answers.py.


def reward(response, ground_truth):
    """RLVR reward of docs/algorithms.md#response-format-and-reward -> dict(score, acc, format),
    all floats. Invalid format: 0. Valid: 0.8 * acc + 0.2, where acc = 1 if the <answer>
    (stripped) matches the truth; an empty answer or one of MAX_ANSWER_CHARS or more never does."""
    parsed = parse_response(response)
    if not parsed["valid"]:
        return dict(score=0.0, acc=0.0, format=0.0)
    acc = float(answers_match(parsed["answer"], ground_truth))
    return dict(score=0.8 * acc + 0.2, acc=acc, format=1.0)


# ---- reading files ----
# Real data is messy (docs/data-formats.md#bad-rows): unreadable images, null ground truths,
# mismatched <image> placeholders. The official loaders drop such rows silently or crash
# mid-training; ours check every row at load time (images included) and name the file, the row and
# the problem in one line.


class DataError(ValueError):
    """A bad file or row: "<path> row <r>: <problem>" (r is 1-based: the JSONL line, the JSON list
    index + 1 or the parquet row + 1), or "<path>: <problem>" for the whole file. Always one line,
    so it reads well in a log and greps well."""

    def __init__(self, path, row, problem):
        self.path, self.row = " ".join(str(path).splitlines()), row
        self.problem = " ".join(str(problem).splitlines())
        super().__init__(f"{self.path} row {row}: {self.problem}" if row is not None
                         else f"{self.path}: {self.problem}")

    def __reduce__(self):  # pickling re-creates exceptions from args; ours takes three
        return DataError, (self.path, self.row, self.problem)


def _iter_rows(path):
    """Yield (row_number, row), or (row_number, DataError) for a JSONL line that is not JSON, so
    that skip_bad_rows can skip it. Problems with the whole file raise at once."""
    path, ext = str(path), os.path.splitext(str(path))[1].lower()
    if not os.path.isfile(path):
        raise DataError(path, None, "file not found")
    if ext not in (".json", ".jsonl", ".parquet"):
        raise DataError(path, None, f"unknown extension {ext!r} (use .json, .jsonl or .parquet)")
    if ext == ".parquet":
        import pyarrow.parquet as pq  # lazy: importing data.py does no work
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # truncated or not parquet: pyarrow raises several types
            raise DataError(path, None, f"cannot read parquet file ({type(e).__name__}: {e})")
        yield from enumerate(rows, 1)
        return
    try:  # bytes, not text: a bad UTF-8 sequence then spoils one JSONL line, not the whole file
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(path, None, f"cannot read file ({e.strerror})")
    if ext == ".jsonl":
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not rows, but they are counted
            try:
                row = json.loads(line)
            # ValueError includes UnicodeDecodeError; RecursionError: [[[[... nesting
            except (ValueError, RecursionError) as e:
                row = DataError(path, line_no, f"invalid JSON line ({type(e).__name__}: {e})")
            yield line_no, row
        return
    try:
        rows = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DataError(path, None, f"invalid JSON ({type(e).__name__}: {e})")
    if not isinstance(rows, list):
        raise DataError(path, None, f"expected a JSON list of rows, got {type(rows).__name__}")
    yield from enumerate(rows, 1)


def read_rows(path):
    """All rows of a .json (a list), .jsonl or .parquet file; the first problem raises DataError."""
    rows = [row for _, row in _iter_rows(path)]
    for row in rows:
        if isinstance(row, DataError):
            raise row
    return rows


def _load(path, convert, skip_bad_rows, log):
    """The row loop shared by every loader. convert(row) returns the normalised row or raises
    ValueError("problem"); this adds the "source" tag and either stops at the first bad row or
    skips bad rows and logs ONE summary line (a line per bad row would bury the training log)."""
    good, bad, n = [], [], 0
    for r, row in _iter_rows(path):
        n += 1
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise ValueError(f"row is a {type(row).__name__}, not an object")
            good.append({**convert(row), "source": f"{path} row {r}"})
            continue
        except DataError as e:
            err = e
        except ValueError as e:
            err = DataError(path, r, e)
        except (KeyError, TypeError, AttributeError) as e:  # a field of an unexpected type
            err = DataError(path, r, f"malformed row ({type(e).__name__}: {e})")
        if not skip_bad_rows:
            raise err
        bad.append(err)
    first = f"first: row {bad[0].row}: {bad[0].problem}" if bad else ""
    if bad:
        log(f"{path}: skipped {len(bad)} of {n} rows ({first})")
    if not good:  # even when skipping: training on nothing is never what was meant
        raise DataError(path, None, f"no usable rows ({first})" if bad else "no usable rows")
    return good


def resolve_image(spec, base_dir):
    """A path, or a verl-style {"bytes", "path"} dict -> an absolute path str, or the bytes when
    embedded. Bytes win: HF-datasets exports store both and the path is often just a file name."""
    if isinstance(spec, dict):
        if isinstance(spec.get("bytes"), (bytes, bytearray)) and spec["bytes"]:
            return bytes(spec["bytes"])
        # JSON cannot hold bytes; a number here would make bytes(n) allocate n
        if spec.get("bytes"):
            raise ValueError(f"image bytes must be binary, got {type(spec['bytes']).__name__}")
        spec = spec.get("path")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"image spec must be a path or a {{bytes, path}} dict, got {spec!r:.60}")
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(spec)))


def _pil_open(resolved):
    from PIL import Image  # lazy, like every heavy import here
    return Image.open(io.BytesIO(resolved) if isinstance(resolved, bytes) else resolved)


def prompt_length(row, processor):
    """Tokens of a prompt row as the policy sees it: the chat text, with each image's placeholder
    expanded to the image's tokens as the processor's resize rule gives them from the image's
    size alone (its header is read, no pixels are decoded)."""
    tok = processor.tokenizer
    text = tok.apply_chat_template(chat_messages(row["messages"]), tokenize=False,
                                   add_generation_prompt=True)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    ip = processor.image_processor
    for x in row["images"]:
        with _pil_open(x) as im:
            width, height = im.size
        n += ip.get_number_of_image_patches(height, width, {}) // ip.merge_size ** 2 - 1
    return n


def drop_long_prompts(rows, processor, max_len):
    """rows without those over max_len tokens (prompt_length) -> (kept rows, number dropped), as
    verl's filter_overlong_prompts: a prompt cut short would lose its question or its image."""
    kept = [r for r in rows if prompt_length(r, processor) <= max_len]
    return kept, len(rows) - len(kept)


def open_image(resolved):
    """What resolve_image returned -> a PIL image in RGB (the processor expects 3 channels)."""
    with _pil_open(resolved) as im:
        return im.convert("RGB")


def _checked_image(spec, base_dir):
    """resolve_image, then check now that the image exists and PIL can verify it: a bad image found
    at load time costs a log line, found at step 4000 it costs the run."""
    resolved = resolve_image(spec, base_dir)
    name = (f"<{len(resolved)} bytes>" if isinstance(resolved, bytes)
            else spec if isinstance(spec, str) else spec["path"])
    if isinstance(resolved, str) and not os.path.isfile(resolved):
        raise ValueError(f"image {name}: missing")
    try:
        with _pil_open(resolved) as im:
            fmt = im.format
            im.verify()  # headers and checksums, without decoding every pixel
        # verify() checks PNG's CRCs but little else (a truncated JPEG passes): decode
        if fmt != "PNG":
            with _pil_open(resolved) as im:
                # JPEG: decode at 1/8 scale, still reading every byte (2x faster)
                im.draft("RGB", (1, 1))
                im.load()
    except Exception as e:
        raise ValueError(f"image {name}: unreadable ({type(e).__name__})")
    return resolved


_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
          "human": "user", "gpt": "assistant"}  # the older sharegpt names


def _chat(raw, role_key="role", content_key="content"):
    """A list of messages -> [{"role": system|user|assistant, "content": str}]."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw, 1):
        role = m.get(role_key) if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"message {i}: unknown role {role!r:.40}")
        if not isinstance(m.get(content_key), str):
            raise ValueError(f"message {i}: content is not a string")
        out.append({"role": _ROLES[role], "content": m[content_key]})
    return out


def _image_specs(row):
    specs = row.get("images") or []
    specs = [specs] if isinstance(specs, (str, dict)) else specs
    if not isinstance(specs, list):
        raise ValueError("images must be a list")
    return specs


def _images(row, messages, base_dir):
    """The row's images, resolved and checked. The processor expands each <image> placeholder into
    the image's tokens, so a count mismatch would crash later as "Image features and image tokens
    do not match" (docs/measured.md#vision-tokens-must-be-suppressed); we catch it here and name
    the row."""
    specs = _image_specs(row)
    n_tags = sum(m["content"].count("<image>") for m in messages)
    if n_tags != len(specs):
        raise ValueError(f"{n_tags} <image> placeholder(s) but {len(specs)} image(s)")
    return [_checked_image(s, base_dir) for s in specs]


def _text(v):
    return v if isinstance(v, str) and v.strip() else None


def load_sft(path, skip_bad_rows=False, log=print):
    """SFT chats (LLaMA-Factory sharegpt, docs/data-formats.md#sft-chats), "messages" or the older
    "conversations" form -> [{"messages": [{"role", "content"}], "images": [path or bytes],
    "source"}]."""
    base_dir = os.path.dirname(os.path.abspath(path))

    def convert(row):
        if row.get("messages") is not None:
            messages = _chat(row["messages"])
        elif row.get("conversations") is not None:
            messages = _chat(row["conversations"], "from", "value")
        else:
            raise ValueError("missing 'messages' (or 'conversations')")
        # SFT trains on assistant tokens only (docs/algorithms.md#sft): without a non-empty final
        # assistant turn the row has nothing to learn from, or a dangling user turn to learn nothing
        # from.
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if not answers:
            raise ValueError("no assistant turn")
        if not all(a.strip() for a in answers):
            raise ValueError("empty assistant turn")
        if messages[-1]["role"] != "assistant":
            raise ValueError("conversation does not end with the assistant")
        return {"messages": messages, "images": _images(row, messages, base_dir)}

    return _load(path, convert, skip_bad_rows, log)


def _ground_truth(row):
    """reward_model.ground_truth (verl), else a top-level ground_truth or answer column, plus
    reward_model.equivalent_answers -> a str, or a list when there are several."""
    rm = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    places = [(rm, "ground_truth"), (row, "ground_truth"), (row, "answer")]
    found = [d[k] for d, k in places if d.get(k) is not None]
    if not found:
        if any(k in d for d, k in places):
            raise ValueError("null ground truth")
        raise ValueError("missing ground truth (reward_model.ground_truth, ground_truth or answer)")
    answers = (found[0] if isinstance(found[0], list) else [found[0]])
    answers += list(rm.get("equivalent_answers") or [])
    answers = list(dict.fromkeys(str(a).strip() for a in answers  # dedupe, keep the order
                                 if a is not None and str(a).strip()))
    if not answers:  # an empty truth could only ever be matched by an empty answer, which is wrong
        raise ValueError("empty ground truth")
    return answers[0] if len(answers) == 1 else answers


def _teacher(row, require):
    """(response, caption, cot) from whichever the row has: the whole teacher response (split into
    the two segments the discriminator scores) or the two segments (joined)."""
    response, caption, cot = (_text(row.get(k)) for k in
                              ("teacher_response", "teacher_caption", "teacher_cot"))
    if response is not None and (caption is None or cot is None):
        perception, reasoning = split_segments(response)
        caption, cot = caption or perception, cot or reasoning
    elif response is None and caption is not None and cot is not None:
        response = caption.strip() + "\n" + cot.strip()
    if require and response is None:
        raise ValueError("missing teacher reference (teacher_response, or teacher_caption + "
                         "teacher_cot)")
    if require and not parse_response(response)["valid"]:  # it could not be split for scoring
        raise ValueError("teacher reference has an invalid format "
                         "(need <caption>..</caption><think>..</think><answer>..</answer>)")
    if require:
        _check_segments(caption, cot, "teacher")
    return response, caption, cot


def _check_segments(caption, cot, side):
    """The two scored segments must carry their tags, as the policy's do (data.split_segments): an
    untagged teacher segment would let the discriminator tell the sides apart by the tags alone."""
    if not parse_response(caption.strip() + "\n" + cot.strip())["valid"]:
        raise ValueError(f"{side}_caption / {side}_cot are not <caption>..</caption> and "
                         "<think>..</think><answer>..</answer> (tags included)")


def load_prompts(path, require_teacher=False, skip_bad_rows=False, log=print):
    """Alignment and RL prompts (verl parquet, docs/data-formats.md#alignment-prompts) ->
    [{"messages", "images", "ground_truth" (str, or list of equivalent answers), "teacher_caption",
    "teacher_cot", "teacher_response" (None when absent), "extra_info" (dict), "source"}].
    Alignment needs the teacher reference (require_teacher=True), RLVR does not. A plain-string
    prompt becomes SYSTEM_PROMPT plus the user turn "<image>\\n" + question (one placeholder per
    image)."""
    base_dir = os.path.dirname(os.path.abspath(path))

    def convert(row):
        prompt = row.get("prompt") if row.get("prompt") is not None else row.get("question")
        if isinstance(prompt, str):
            tags = "" if "<image>" in prompt else "<image>\n" * len(_image_specs(row))
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": tags + prompt}]
        elif prompt is None:
            raise ValueError("missing 'prompt'")
        else:
            messages = _chat(prompt)
        ground_truth = _ground_truth(row)
        response, caption, cot = _teacher(row, require_teacher)
        extra = row.get("extra_info")
        if isinstance(extra, str):  # some exports store it as a JSON string
            try:
                extra = json.loads(extra)
            except (ValueError, RecursionError):  # RecursionError: nested thousands deep
                raise ValueError("extra_info is a string but not valid JSON") from None
        if not isinstance(extra if extra is not None else {}, dict):
            raise ValueError("extra_info is not an object")
        return {"messages": messages, "images": _images(row, messages, base_dir),
                "ground_truth": ground_truth, "teacher_caption": caption, "teacher_cot": cot,
                "teacher_response": response, "extra_info": extra or {}}

    return _load(path, convert, skip_bad_rows, log)


def load_pairs(path, base_dir=None, skip_bad_rows=False, log=print):
    """Discriminator warm-up pairs (JSONL, docs/data-formats.md#discriminator-warm-up-pairs) ->
    [{"prompt", "image", "teacher_caption", "teacher_cot", "student_caption", "student_cot",
    "source"}]. Images resolve against base_dir, by default the file's folder."""
    base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))

    def convert(row):
        out = {"prompt": _text(row.get("prompt")) or _text(row.get("question"))}
        if out["prompt"] is None:
            raise ValueError("missing or empty 'prompt' (or 'question')")
        for k in ("teacher_caption", "teacher_cot", "student_caption", "student_cot"):
            out[k] = _text(row.get(k))
            if out[k] is None:  # a pair with an empty side teaches the discriminator nothing
                raise ValueError(f"missing or empty {k!r}")
        if row.get("image") is None:
            raise ValueError("missing 'image'")
        image = _checked_image(row["image"], base_dir)
        for side in ("teacher", "student"):
            _check_segments(out[f"{side}_caption"], out[f"{side}_cot"], side)
        # the prompt is plain text: discriminator.pair_prompt adds the one image's placeholder, so
        # one already written here would make two placeholders for one image
        out["prompt"] = out["prompt"].replace("<image>", "").strip()
        return {**out, "image": image}

    return _load(path, convert, skip_bad_rows, log)


# ---- SFT collation ----
# Real files write an image as the placeholder `<image>`; Qwen's chat template writes it as
# <|vision_start|><|image_pad|><|vision_end|>, and the processor then repeats <|image_pad|> once per
# merged image patch (36 times for a 96 px image on the tiny model), so the count always agrees
# with image_grid_thw.
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


def chat_messages(messages):
    """Our {role, content} messages with `<image>` placeholders turned into Qwen's vision tokens."""
    return [{"role": m["role"], "content": m["content"].replace("<image>", VISION_TOKENS)}
            for m in messages]


def encode_sft(row, processor):
    """Tokenise one conversation for SFT. Returns a dict of 1-D / per-row tensors.

    Labels are -100 everywhere except the assistant turns' tokens and their closing <|im_end|>
    (so the model learns to stop). We find the turns by their header tokens
    `<|im_start|>assistant\\n` rather than by re-tokenising prefixes: one processor call per row,
    and it works for multi-turn rows and for any Qwen-style template."""
    import torch
    tok = processor.tokenizer
    text = tok.apply_chat_template(chat_messages(row["messages"]), tokenize=False)
    images = [open_image(x) for x in row["images"]]
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0]  # (T,)
    labels = torch.full_like(ids, -100)  # (T,)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    seq, h = ids.tolist(), len(header)
    for i in range(len(seq) - h + 1):
        if seq[i:i + h] == header:
            start = i + h
            end = seq.index(im_end, start) if im_end in seq[start:] else len(seq) - 1
            labels[start:end + 1] = ids[start:end + 1]
    out = {"input_ids": ids, "labels": labels, "mm_token_type_ids": enc["mm_token_type_ids"][0]}
    if images:
        out["pixel_values"] = enc["pixel_values"]  # (patches, C*tp*p*p)
        out["image_grid_thw"] = enc["image_grid_thw"]  # (n_images, 3)
    return out


def collate_sft(items, pad_id):
    """Right-pad encoded rows into a batch. Right padding keeps every real token at the same
    position it had alone, so the loss of a row does not depend on its batch-mates."""
    import torch
    T = max(len(x["input_ids"]) for x in items)
    B = len(items)
    cpu = dict(dtype=torch.long, device="cpu")  # the stage moves the batch to its device
    batch = {"input_ids": torch.full((B, T), pad_id, **cpu),  # (B, T)
             "attention_mask": torch.zeros((B, T), **cpu),  # (B, T)
             "labels": torch.full((B, T), -100, **cpu),  # (B, T)
             "mm_token_type_ids": torch.zeros((B, T), **cpu)}  # (B, T)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        batch["input_ids"][i, :n] = x["input_ids"]
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = x["labels"]
        batch["mm_token_type_ids"][i, :n] = x["mm_token_type_ids"]
    with_images = [x for x in items if "pixel_values" in x]
    if with_images:
        batch["pixel_values"] = torch.cat(
            [x["pixel_values"] for x in with_images])  # (sum patches, D)
        batch["image_grid_thw"] = torch.cat(
            [x["image_grid_thw"] for x in with_images])  # (n_images, 3)
    return batch


def encode_prompts(rows, processor):
    """Left-padded batch of prompts ready for generate (one processor call for the whole batch).

    Left padding puts every prompt's last token at the same column, where generation appends."""
    tok = processor.tokenizer
    texts = [tok.apply_chat_template(chat_messages(r["messages"]), tokenize=False,
                                     add_generation_prompt=True)
             for r in rows]
    images = [open_image(x) for r in rows for x in r["images"]]
    return processor(text=texts, images=images or None, padding=True, padding_side="left",
                     return_tensors="pt")
