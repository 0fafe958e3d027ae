"""Evaluation of each stage's policy: accuracy, perception vs reasoning errors, drift, lengths.

On one prompt file: how often each policy is right, whether its errors come from seeing or from
reasoning, how far its answers drift from the teacher's, and how long they are.

Per model (`--models name=path,...`, in stage order, loaded one at a time):
  1. accuracy    greedy pass@1 (model.generate); mean accuracy and pass@k over --k samples at
                 temperature 1 (rollout.sample); format-valid rate; by difficulty level and question
                 type when the rows carry them (extra_info level / qtype).
  2. error split PRISM's perception / reasoning framing, measured on the synthetic task: perception
                 accuracy = the caption's "objects:" line names exactly the scene's multiset of
                 (count, colour, shape) (missing or unreadable = wrong); a softer per-object-type
                 count accuracy; answer accuracy given a right caption (the errors left are
                 reasoning errors) and given a wrong one. Rows without a scene (real benchmarks): n/a.
  3. drift       from the teacher references, when the file has them: structural proxies (segment
                 lengths, tag-use rates, format rate) and an embedding-space divergence (below).
  4. efficiency  mean response and <think> lengths in tokens.
Into --out_dir: results.json (everything, greedy and sampled), results.md (the tables printed at the
end; greedy responses: reproducible and one per prompt, like the teacher's) and PNG plots: accuracy
per stage, the discriminator's score gaps over alignment steps (--align_log) and reward curves over
RL steps (--rl_logs); a plot whose log is absent is skipped with a note.

The divergence. The PRISM paper lists the lack of a direct measure of how far the policy's output
distribution drifts from the teacher's as a limitation; this is a cheap stand-in. Every response
(text only: no image, no chat template) goes through the language model of ONE frozen encoder, the
same for all models so the numbers compare; the last hidden states are mean-pooled. Then
  MMD^2    unbiased, RBF kernel exp(-|a - b|^2 / (2 s^2)), s = the median pairwise distance within
           the teacher set (median heuristic), fixed across models; can dip just below 0
  Frechet  |mu_p - mu_t|^2 + Tr(S_p + S_t - 2 (S_p S_t)^(1/2)) as in FID, with the square root's
           trace taken from the symmetric PSD product S_t^(1/2) S_p S_t^(1/2) by eigh (no scipy)
The encoder defaults to the first model neither named "base" nor an embedded preset (random weights
embed text poorly); its tokenizer also counts every length, the teacher's included. Caveats: that
encoder learned from teacher-style text, so it is not a neutral judge; and Frechet estimates
hidden-size covariances from n responses, so compare it only at equal n.
Simplifications: single process (no torchrun); the first --max_rows rows.

Run it:
  CPU, the embedded pipeline (84 s for 5 tiny models on 500 prompts, k=4, in make demo):
      python evaluate.py --models base=tiny,sft=runs/sft/final,aligned=runs/align/final \\
          --data data/tiny/test.parquet --out_dir runs/eval --align_log runs/align/metrics.jsonl \\
          --rl_logs "sft->grpo=runs/rl_sft/metrics.jsonl,align->grpo=runs/rl_align/metrics.jsonl"
  one GPU, real models on a verl prompt file (perception n/a without scenes):
      python evaluate.py --models sft=ckpt/sft,prism=ckpt/prism_grpo --data mathvista.parquet \\
          --max_new_tokens 2048 --batch_size 16
"""
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import torch

import common
import data
import model as models
import rollout
import task


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    models: str = "base=tiny,sft=runs/sft/final"  # comma-separated name=path, in stage order (a bare path names itself)
    data: str = "data/tiny/test.parquet"  # prompt file (verl parquet / JSONL) with ground truths
    out_dir: str = "runs/eval"  # results.json, results.md and the plots go here
    k: int = 4  # samples per prompt for mean accuracy / pass@k (0 = greedy only)
    temperature: float = 1.0  # sampling temperature of the k samples
    max_rows: int = 0  # evaluate the first this many rows (0 = all)
    max_new_tokens: int = 128  # response budget
    batch_size: int = 64  # prompts per generate / sample / embedding call
    token_budget: int = 65536  # rollout tokens per sampling chunk (memory knob, see rollout.sample)
    encoder: str = ""  # frozen encoder for MMD / Frechet ("" = first non-base model; or a name or path)
    align_log: str = ""  # align.py metrics.jsonl for the score-gap plot ("" = no plot)
    rl_logs: str = ""  # comma-separated name=metrics.jsonl of rlvr.py runs for the reward plot
    smooth: int = 20  # moving-average window (steps) of the training-curve plots
    seed: int = 0  # sampling seed (the same for every model); also the embedded presets' build seed
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    probe: str = ""  # a discriminator folder: its grounding probe on --data, no --models
    probe_scenes: int = 200  # scenes (prompt rows) of the grounding probe


# ----------------------------------------------------------------------------- perception
# The teacher's caption has a line "- objects: 2 green triangles, 1 yellow triangle" (task.describe).
# We read that line back into a multiset and compare it with the scene's. Order, singular/plural and
# "and" between items do not matter; anything we cannot read makes the whole line unreadable.
_NUMBERS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"])}
_NUMBERS.update(a=1, an=1)
_ITEM = re.compile(rf"(\d+|{'|'.join(_NUMBERS)})\s+({'|'.join(task.COLORS)})\s+({'|'.join(task.SHAPES)})s?")
_OBJECTS_LINE = re.compile(r"\bobjects\s*:([^\n<]*)", re.IGNORECASE)  # to the end of the line or a tag


def parse_caption_objects(caption):
    """'2 green triangles, 1 yellow triangle' (inside a caption) -> Counter({(colour, shape): n}),
    Counter() for "none", or None when there is no objects line or it cannot be read."""
    m = _OBJECTS_LINE.search(caption) if isinstance(caption, str) else None
    body = m.group(1).strip().rstrip(".").strip().lower() if m else ""
    if not body:
        return None
    if body in ("none", "nothing", "no objects"):
        return Counter()
    counts = Counter()
    for item in re.split(r",|;|\band\b", body):
        if not item.strip():
            continue
        hit = _ITEM.fullmatch(item.strip())
        if hit is None:
            return None  # e.g. the public demonstrator's "5 shapes": no multiset to check
        n = int(hit.group(1)) if hit.group(1).isdigit() else _NUMBERS[hit.group(1)]
        counts[(hit.group(2), hit.group(3))] += n
    return +counts  # drops "0 red circles" entries


def scene_objects(scene):
    """A task scene (dict or its JSON string) -> Counter({(colour, shape): n})."""
    scene = json.loads(scene) if isinstance(scene, str) else scene
    return Counter((o["color"], o["shape"]) for o in scene["objects"])


def object_count_accuracy(said, truth):
    """The softer score: over the object types named by the caption or present in the scene, the
    fraction whose count is right (1.0 = exact; a hallucinated type counts against it). 0 when the
    caption is unreadable."""
    if said is None:
        return 0.0
    types = set(said) | set(truth)
    return sum(said[t] == truth[t] for t in types) / len(types) if types else 1.0


def perception_correct(response, scene):
    """True when the response's caption names exactly the scene's objects."""
    return parse_caption_objects(data.parse_response(response)["caption"]) == scene_objects(scene)


# ----------------------------------------------------------------------------- scoring responses
def score_response(text, row, count_tokens=lambda s: len(s.split())):
    """Everything we measure about one response to one prompt row -> a flat dict."""
    parsed = data.parse_response(text)
    extra = row.get("extra_info") or {}
    out = {"acc": data.reward(text, row["ground_truth"])["acc"], "format": float(parsed["valid"]),
           "level": extra.get("level"), "qtype": extra.get("qtype"), "perception": None, "objects": None,
           "response_len": count_tokens(text)}
    for seg in ("caption", "think", "answer"):  # lengths of the blocks found, even in invalid answers
        out[f"has_{seg}"] = float(parsed[seg] is not None)
        out[f"{seg}_len"] = count_tokens(parsed[seg]) if parsed[seg] is not None else None
    if extra.get("scene"):
        said, truth = parse_caption_objects(parsed["caption"]), scene_objects(extra["scene"])
        out["perception"] = float(said == truth)
        out["objects"] = object_count_accuracy(said, truth)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(records):
    """Aggregate score_response dicts. The reasoning split: answer accuracy among responses whose
    caption was right (errors there are reasoning errors) and among those whose caption was wrong."""
    seen = [r for r in records if r["perception"] is not None]
    right, wrong = [r for r in seen if r["perception"]], [r for r in seen if not r["perception"]]
    out = {"n": len(records), "acc": _mean([r["acc"] for r in records]),
           "format": _mean([r["format"] for r in records]),
           "perception": {"acc": _mean([r["perception"] for r in seen]),
                          "objects": _mean([r["objects"] for r in seen]), "n": len(seen)} if seen else None,
           "reasoning": {"acc_correct_caption": _mean([r["acc"] for r in right]), "n_correct_caption": len(right),
                         "acc_wrong_caption": _mean([r["acc"] for r in wrong]), "n_wrong_caption": len(wrong)}
           if seen else None,
           "lengths": {seg: _mean([r[f"{seg}_len"] for r in records]) for seg in ("response", "caption", "think", "answer")},
           "tags": {seg: _mean([r[f"has_{seg}"] for r in records]) for seg in ("caption", "think", "answer")}}
    for key in ("level", "qtype"):  # breakdowns only when the rows carry the field
        groups = defaultdict(list)
        for r in records:
            if r[key] is not None:
                groups[str(r[key])].append(r)
        out[f"by_{key}"] = {g: {"n": len(rs), "acc": _mean([r["acc"] for r in rs]),
                                "format": _mean([r["format"] for r in rs]),
                                "perception": _mean([r["perception"] for r in rs])}
                            for g, rs in sorted(groups.items())}
    return out


# ----------------------------------------------------------------------------- divergence
def _sq_dists(x, y):
    """(n, m) squared Euclidean distances in float64 (cdist's matmul shortcut loses the zeros)."""
    x, y = x.double(), y.double()
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def median_bandwidth(x):
    """Median heuristic: the median pairwise distance within x (n, d); 1.0 if they all coincide."""
    med = torch.pdist(x.double()).median().item() if len(x) > 1 else 0.0  # the n(n-1)/2 pairs i < j
    return med if med > 0 else 1.0


def mmd2(x, y, bandwidth):
    """Unbiased MMD^2 (Gretton et al. 2012) between samples x (n, d) and y (m, d), RBF kernel:
    mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j).
    Unbiased means it can be slightly negative when the distributions are equal."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        return float("nan")
    kxx, kyy, kxy = (torch.exp(-_sq_dists(a, b) / (2 * bandwidth ** 2)) for a, b in ((x, x), (y, y), (x, y)))
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean()).item()


def frechet(x, y):
    """Frechet distance between Gaussians fitted to x (n, d) and y (m, d) (FID's formula):
    |mu_x - mu_y|^2 + Tr(S_x) + Tr(S_y) - 2 Tr((S_x S_y)^(1/2)), where
    Tr((S_x S_y)^(1/2)) = sum sqrt(eig(S_y^(1/2) S_x S_y^(1/2))): the same eigenvalues, but of a
    symmetric PSD matrix, so eigh applies (S_x S_y itself is not symmetric)."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    x, y = x.double(), y.double()
    sx, sy = torch.cov(x.T), torch.cov(y.T)  # (d, d), unbiased
    w, v = torch.linalg.eigh(sy)
    root = (v * w.clamp_min(0).sqrt()) @ v.T  # S_y^(1/2); rounding's tiny negative eigenvalues -> 0
    middle = root @ sx @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = ((x.mean(0) - y.mean(0)) ** 2).sum() + sx.trace() + sy.trace() - 2 * cross
    return max(value.item(), 0.0)  # identical sets give ~ -1e-12 from rounding


@torch.no_grad()
def embed(model, tokenizer, texts, batch_size=64, max_len=1024):
    """(N, H) mean-pooled last hidden states of the model's language model over each text's tokens
    (text only: no image, no chat template). An empty text is embedded as the eos token."""
    hf = models.hf_model(model)
    lm = hf.model.language_model if hasattr(hf.model, "language_model") else hf.get_decoder()
    device = next(lm.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = [t if t and t.strip() else tokenizer.eos_token for t in texts[i:i + batch_size]]
        enc = tokenizer(chunk, padding=True, padding_side="right", truncation=True, max_length=max_len,
                        add_special_tokens=False, return_tensors="pt").to(device)
        h = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (b, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
        out.append(((h * mask).sum(1) / mask.sum(1).clamp_min(1)).float().cpu())  # (b, H)
    return torch.cat(out)


# ----------------------------------------------------------------------------- plain perception
DESCRIBE = "List the objects in the image."  # the base's own describe question (pretrain.py)


def read_objects(answer):
    """An object list answered in any of our formats -> Counter, or None: a caption with an
    "objects:" line (SFT-trained models), or the base's bare "2 red circles, 1 blue square."."""
    return parse_caption_objects(answer if _OBJECTS_LINE.search(answer) else "objects: " + answer)


def plain_perception(model, processor, rows, batch_size=64, max_new_tokens=64):
    """Perception without PRISM's format: each row's image with the plain question DESCRIBE (no
    system prompt, the pretraining format) -> (exact object-list accuracy, answers), or (None, [])
    when no row has a scene. This is the measure a base and its SFT descendant share, so the two can
    be compared on the same scenes (the perception drift SFT causes)."""
    rows = [r for r in rows if (r.get("extra_info") or {}).get("scene") and len(r["images"]) == 1]
    if not rows:
        return None, []
    question = [{"role": "user", "content": "<image>\n" + DESCRIBE}]
    prompts = [{"messages": question, "images": r["images"]} for r in rows]
    answers = models.generate(model, processor, prompts, max_new_tokens, batch_size)
    hits = [read_objects(a) == scene_objects(r["extra_info"]["scene"])
            for a, r in zip(answers, rows)]
    return sum(hits) / len(hits), answers


# ----------------------------------------------------------------------------- one model
def evaluate_model(model, processor, rows, k=4, max_new_tokens=128, batch_size=64, temperature=1.0,
                   token_budget=65536, count_tokens=None, seed=0):
    """Greedy and k-sample responses of one model on rows -> (results, texts). results holds a
    summarise() dict for "greedy" and "sampled" (None when k = 0; plus pass_at_k); texts the raw
    responses, for the divergence and for inspection."""
    count_tokens = count_tokens or (lambda s: len(processor.tokenizer(s, add_special_tokens=False)["input_ids"]))
    greedy = models.generate(model, processor, rows, max_new_tokens, batch_size)
    results = {"greedy": summarise([score_response(t, r, count_tokens) for t, r in zip(greedy, rows)]),
               "sampled": None}
    texts = {"greedy": greedy, "sampled": []}
    if k > 0:
        torch.manual_seed(seed)  # every model draws from the same random stream
        for i in range(0, len(rows), batch_size):
            texts["sampled"] += rollout.sample(model, processor, rows[i:i + batch_size], k, max_new_tokens,
                                               temperature, 1.0, token_budget).texts  # prompt-major: k per prompt
        sampled_rows = [r for r in rows for _ in range(k)]
        records = [score_response(t, r, count_tokens) for t, r in zip(texts["sampled"], sampled_rows)]
        results["sampled"] = summarise(records)
        # pass@k: a prompt counts when any of its k samples is right
        results["sampled"]["pass_at_k"] = _mean([max(x["acc"] for x in records[j:j + k])
                                                 for j in range(0, len(records), k)])
    results["plain_perception"], plain = plain_perception(model, processor, rows, batch_size)
    results["examples"] = [{"question": r["messages"][-1]["content"], "ground_truth": r["ground_truth"],
                            "response": t} for t, r in list(zip(greedy, rows))[:3]]
    return results, texts


# ----------------------------------------------------------------------------- report
def _f(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _get(d, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def markdown_table(results):
    """results.json's dict -> the markdown of results.md: one row per model (and the teacher), then
    greedy / mean@k accuracy by difficulty level and by question type."""
    k = results.get("k", 0)
    head = ["model", "greedy acc", f"mean@{k} acc", "format", "perception acc", "reasoning acc (caption right)",
            "reasoning acc (caption wrong)", "plain perception acc", "MMD^2", "Frechet",
            "response len", "think len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    entries = list(results["models"].items()) + ([("teacher (reference)", results["teacher"])]
                                                  if results.get("teacher") else [])
    for name, r in entries:
        g = r["greedy"]
        cells = [name, _f(g["acc"]), _f(_get(r, "sampled", "acc")), _f(g["format"]), _f(_get(g, "perception", "acc")),
                 _f(_get(g, "reasoning", "acc_correct_caption")), _f(_get(g, "reasoning", "acc_wrong_caption")),
                 _f(r.get("plain_perception")),
                 _f(_get(r, "drift", "greedy", "mmd2"), 4), _f(_get(r, "drift", "greedy", "frechet"), 2),
                 _f(g["lengths"]["response"], 1), _f(g["lengths"]["think"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    for key, title in (("by_level", "level"), ("by_qtype", "question type")):
        groups = {g: v["n"] for r in results["models"].values() for g, v in r["greedy"][key].items()}
        if not groups:
            continue
        rows = ["| model | " + " | ".join(f"{title} {g} (n={n})" for g, n in groups.items()) + " |",
                "|" + "---|" * (len(groups) + 1)]
        for name, r in results["models"].items():
            rows.append(f"| {name} | " + " | ".join(
                f"{_f(_get(r, 'greedy', key, g, 'acc'))} / {_f(_get(r, 'sampled', key, g, 'acc'))}" for g in groups) + " |")
        out += f"\n\nGreedy / mean@{k} accuracy by {title}:\n\n" + "\n".join(rows)
    return out


def read_jsonl(path):
    """Records of a metrics.jsonl; a half-written last line (the run is still going) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def moving_average(values, window):
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _figure(width=6.0):
    import matplotlib  # lazy, and headless: importing evaluate.py needs no matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, 3.5))


def _save(fig, ax, path, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)  # pyplot keeps every figure alive until it is closed


def plot_accuracy(results, path):
    """Bar chart: greedy (and mean@k) accuracy of each model, the stages in --models order."""
    names = list(results["models"])
    bars = [([results["models"][n]["greedy"]["acc"] for n in names], "greedy pass@1")]
    if results["k"]:
        bars.append(([_get(results["models"][n], "sampled", "acc") or 0.0 for n in names], f"mean@{results['k']}"))
    fig, ax = _figure(1.6 * len(names) + 2)
    width = 0.8 / len(bars)
    for i, (values, label) in enumerate(bars):
        drawn = ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(names))], values, width, label=label)
        ax.bar_label(drawn, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.1)
    _save(fig, ax, path, "model", "answer accuracy",
          f"accuracy per stage ({os.path.basename(results['data'])}, {results['n_prompts']} prompts)")


def plot_align_gaps(records, path, window=20):
    """The two experts' score gaps (teacher - policy) over alignment steps: raw and moving average.
    A gap shrinking towards 0 means the discriminator can no longer tell policy from teacher."""
    fig, ax = _figure()
    for key, label in (("gap_cap", "perception (caption)"), ("gap_cot", "reasoning (think + answer)")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            steps, values = zip(*pts)
            line, = ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, moving_average(values, window), color=line.get_color(), label=f"{label}, MA {window}")
    ax.axhline(0, color="gray", lw=0.8)
    _save(fig, ax, path, "alignment step", "score gap t - s", "discriminator score gaps during alignment")


def plot_rl_rewards(logs, path, window=20):
    """Reward (moving average) and held-out greedy accuracy (points) over RL steps, one colour per
    run. logs: {name: metrics records}."""
    fig, ax = _figure()
    for name, records in logs.items():
        pts = [(r["step"], r["reward_mean"]) for r in records if "reward_mean" in r]
        val = [(r["step"], r["val_acc"]) for r in records if "val_acc" in r]
        color = None
        if pts:
            steps, values = zip(*pts)
            color = ax.plot(steps, moving_average(values, window), label=f"{name} reward, MA {window}")[0].get_color()
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=4, lw=0.8, label=f"{name} held-out acc")
    _save(fig, ax, path, "RL step", "reward / accuracy", "RLVR: reward and held-out accuracy")


def parse_named(spec):
    """'a=x,b->c=y' -> {'a': 'x', 'b->c': 'y'}; an item without a name is named by its path."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, path = item.rpartition("=")
        out[name.strip() or path.strip()] = path.strip()
    return out


# ----------------------------------------------------------------------------- grounding probe
# Does the discriminator judge content or style? Three pairwise tests on held-out scenes, each a
# (right, wrong) pair that differs in one thing only; accuracy = share of pairs where D scores the
# right one higher (ties count half), chance 0.5, standard error sqrt(p (1 - p) / n).
#   cap_misperceived  perception expert: the teacher caption vs the same caption with one object
#                     misperceived (missed, doubled, or wrong colour/shape), same image and prompt
#   cap_swapped_image perception expert: the teacher caption with its own image vs with another
#                     scene's image (whose objects differ), same prompt
#   cot_misperceived  reasoning expert: the teacher's steps vs wrong-but-self-consistent steps on
#                     one misperceived object (task.misperceive), same image and prompt
# A D that learned only the teacher's style (docs/results.md, "Grounding probe") sits at 0.5 on all.
PROBE_TESTS = ("cap_misperceived", "cap_swapped_image", "cot_misperceived")


def task_records(data_path, rows):
    """The task records behind prompt rows of our test/val files (their question params, which
    task.misperceive needs, are not in the file): regenerated from meta.json's seed and sizes, as
    task.write_dataset drew them. None for a row whose regenerated question does not match."""
    meta_path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "meta.json")
    if not os.path.exists(meta_path):
        return [None] * len(rows)
    with open(meta_path) as f:
        meta = json.load(f)
    sizes = meta["sizes"]
    sizes = {"test": sizes["test"], "val": sizes["val"],
             "train": sum(sizes[k] for k in ("sft_public", "sft_teacher", "align_prompts",
                                             "rl_prompts"))}
    order = ["test", "val", "train"]  # write_dataset's order: each excludes the earlier scenes
    last = max((order.index(r["extra_info"].get("split")) for r in rows
                if r["extra_info"].get("split") in order), default=-1)
    drawn, taken = {}, set()
    for split in order[:last + 1]:  # no later split than the rows need (train is 10k records)
        drawn[split] = task.make_records(split, sizes[split], meta["seed"], meta["image_size"],
                                         tuple(meta["levels"]), exclude=taken)
        taken |= {task.scene_key(r["scene"]) for r in drawn[split]}
    out = []
    for row in rows:
        extra = row["extra_info"]
        records = drawn.get(extra.get("split"), [])
        i = extra.get("index")
        hit = records[i] if isinstance(i, int) and i < len(records) else None
        out.append(hit if hit is not None and hit["question"] == extra.get("question") else None)
    return out


def misperceived_caption(caption, seen):
    """The caption with its objects line saying `seen` (an object list) instead."""
    return _OBJECTS_LINE.sub(lambda m: "objects: " + task.describe(seen), caption, count=1)


def probe_pairs(rows, records, seed=0):
    """-> {test: (right_prompts, right_segments, wrong_prompts, wrong_segments, which)} (module
    comment above). Rows need a teacher caption/cot and a scene; records may hold None."""
    import random
    rng = random.Random(f"nanoprism/probe/{seed}")
    scenes = [json.loads(r["extra_info"]["scene"]) for r in rows]
    pairs = {t: ([], [], [], [], "cot" if t.startswith("cot") else "cap") for t in PROBE_TESTS}
    for i, (row, scene, record) in enumerate(zip(rows, scenes, records)):
        objects, caption = scene["objects"], row["teacher_caption"]
        wrong = misperceived_caption(caption, rng.choice(task._misperceptions(objects)))
        p = pairs["cap_misperceived"]
        p[0].append(row), p[1].append(caption), p[2].append(row), p[3].append(wrong)
        # the next scene whose object multiset differs: the caption is then false for that image
        j = next((k % len(rows) for k in range(i + 1, i + len(rows))
                  if scene_objects(scenes[k % len(rows)]) != scene_objects(scene)), None)
        if j is not None:
            p = pairs["cap_swapped_image"]
            p[0].append(row), p[1].append(caption)
            p[2].append({**row, "images": rows[j]["images"]}), p[3].append(caption)
        if record is not None:
            _, steps, answer = task.misperceive(objects, record, rng)
            _, cot = task.split_response(task.format_response([], steps, answer))
            p = pairs["cot_misperceived"]
            p[0].append(row), p[1].append(row["teacher_cot"]), p[2].append(row), p[3].append(cot)
    return pairs


def grounding_probe(score_fn, rows, records=None, seed=0):
    """Pairwise accuracy of a scorer on the probe's three tests -> {test: {acc, se, gap, n}}.

    score_fn(prompts, segments, which) -> (B,) scores (higher = more teacher-like); `which` is
    "cap" or "cot" as in discriminator.score. records: task_records(...) (None: no reasoning
    test)."""
    pairs = probe_pairs(rows, records or [None] * len(rows), seed)
    out = {}
    for t in PROBE_TESTS:
        right_p, right_s, wrong_p, wrong_s, which = pairs[t]
        if not right_p:
            out[t] = {"acc": None, "se": None, "gap": None, "n": 0}
            continue
        right = torch.as_tensor(score_fn(right_p, right_s, which), dtype=torch.float)  # (n,)
        wrong = torch.as_tensor(score_fn(wrong_p, wrong_s, which), dtype=torch.float)  # (n,)
        acc = ((right > wrong).float() + 0.5 * (right == wrong).float()).mean().item()
        out[t] = {"acc": acc, "se": math.sqrt(acc * (1 - acc) / len(right)),
                  "gap": (right - wrong).mean().item(), "n": len(right)}
    return out


def format_probe(result):
    return ", ".join(f"{t} {r['acc']:.3f} +- {r['se']:.3f} (n={r['n']})" if r["n"] else f"{t} n/a"
                     for t, r in result.items())


def probe_discriminator(disc_or_path, data_path, n=200, seed=0, processor=None, log=print):
    """The grounding probe of a discriminator (a folder, or a live (disc) with its processor) on
    the first n rows of data_path -> the result dict; logs one line."""
    import discriminator
    if isinstance(disc_or_path, str):
        disc, processor = discriminator.load(disc_or_path)
    else:
        disc = disc_or_path
    rows = data.load_prompts(data_path, require_teacher=True, log=lambda *a: None)
    rows = [r for r in rows if r["extra_info"].get("scene")][:n]
    was_training = disc.training
    disc.eval()

    @torch.no_grad()
    def score_fn(prompts, segments, which):
        return discriminator.score(disc, processor, prompts, segments, which)[0].float().cpu()

    result = grounding_probe(score_fn, rows, task_records(data_path, rows), seed)
    disc.train(was_training)
    log(f"grounding probe ({len(rows)} scenes of {data_path}): {format_probe(result)}")
    return result


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.probe:  # the discriminator's grounding probe, not a policy evaluation
        return probe_discriminator(cfg.probe, cfg.data, cfg.probe_scenes, cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # single process
    print(f"config: {json.dumps(asdict(cfg))}")
    specs = parse_named(cfg.models)
    if not specs:
        raise SystemExit("error: --models is empty (give name=path,...)")
    os.makedirs(cfg.out_dir, exist_ok=True)

    # ---- data
    try:
        task.ensure_default([cfg.data])
        rows = data.load_prompts(cfg.data, skip_bad_rows=cfg.skip_bad_rows)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    rows = rows[:cfg.max_rows] if cfg.max_rows else rows
    teacher = [r["teacher_response"] for r in rows]
    has_teacher = all(t is not None for t in teacher)
    print(f"data: {len(rows)} prompts from {cfg.data}" + ("" if has_teacher else " (no teacher references: no drift)"))

    # ---- the encoder: chosen first, because its tokenizer counts every length (models and teacher)
    encoder = specs.get(cfg.encoder, cfg.encoder) or next(
        (p for n, p in specs.items() if n != "base" and p not in models.PRESETS), next(iter(specs.values())))
    enc_processor = models.load_processor(models.resolve_model(encoder, seed=cfg.seed))

    def count_tokens(s):
        return len(enc_processor.tokenizer(s, add_special_tokens=False)["input_ids"])

    # ---- each model in turn: generate, sample, score
    results = {"data": cfg.data, "n_prompts": len(rows), "k": cfg.k, "encoder": encoder, "config": asdict(cfg),
               "models": {}, "teacher": None}
    texts = {}
    for name, path in specs.items():
        t0 = time.time()
        model, processor, _ = models.load_model(path, device, seed=cfg.seed)
        results["models"][name], texts[name] = evaluate_model(
            model, processor, rows, cfg.k, cfg.max_new_tokens, cfg.batch_size, cfg.temperature, cfg.token_budget,
            count_tokens, cfg.seed)
        results["models"][name].update(path=path, params=models.count_params(model)[0], time_s=round(time.time() - t0, 1))
        del model
        g = results["models"][name]["greedy"]
        print(f"{name}: greedy acc {_f(g['acc'])}, mean@{cfg.k} {_f(_get(results['models'][name], 'sampled', 'acc'))},"
              f" format {_f(g['format'])}, perception {_f(_get(g, 'perception', 'acc'))} ({time.time() - t0:.1f}s)")

    # ---- drift from the teacher: the same frozen encoder and bandwidth for every model
    if has_teacher:
        results["teacher"] = {"greedy": summarise([score_response(t, r, count_tokens) for t, r in zip(teacher, rows)])}
        encoder_model, _, _ = models.load_model(encoder, device, seed=cfg.seed)
        encoder_model.eval()
        tok = enc_processor.tokenizer
        ref = embed(encoder_model, tok, teacher, cfg.batch_size)  # (n, H)
        bandwidth = median_bandwidth(ref)
        results["bandwidth"] = bandwidth
        for name, t in texts.items():
            drift = results["models"][name]["drift"] = {}
            for kind in ("greedy", "sampled"):  # the k samples: n * k responses against n references
                if t[kind]:
                    e = embed(encoder_model, tok, t[kind], cfg.batch_size)  # (n or n * k, H)
                    drift[kind] = {"mmd2": mmd2(e, ref, bandwidth), "frechet": frechet(e, ref), "n": len(e)}
        del encoder_model

    # ---- save: results, tables, plots
    results["time_s"] = round(time.time() - t_start, 1)
    common.write_json_atomic(os.path.join(cfg.out_dir, "results.json"), results)
    table = markdown_table(results)
    notes = [f"Data: {cfg.data}, {len(rows)} prompts; mean@{cfg.k} at temperature {cfg.temperature}."]
    if has_teacher:
        notes.append(f"MMD^2 / Frechet: greedy responses vs teacher references, mean-pooled hidden states of "
                     f"{encoder} (frozen, text only), RBF bandwidth {bandwidth:.3f} (median heuristic on the teacher set).")
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(notes) + "\n")
    plot_accuracy(results, os.path.join(cfg.out_dir, "accuracy.png"))
    if cfg.align_log and os.path.exists(cfg.align_log):
        plot_align_gaps(read_jsonl(cfg.align_log), os.path.join(cfg.out_dir, "align_gaps.png"), cfg.smooth)
    else:
        print(f"note: no alignment log ({cfg.align_log or '--align_log not given'}): align_gaps.png skipped")
    rl = {n: read_jsonl(p) for n, p in parse_named(cfg.rl_logs).items() if os.path.exists(p)}
    for n, p in parse_named(cfg.rl_logs).items():
        if not os.path.exists(p):
            print(f"note: RL log {p} ({n}) not found: left out of rl_rewards.png")
    if rl:
        plot_rl_rewards(rl, os.path.join(cfg.out_dir, "rl_rewards.png"), cfg.smooth)
    else:
        print("note: no RL log: rl_rewards.png skipped")
    print("\n" + table + "\n\n" + "\n".join(notes))
    print(f"\nwrote {cfg.out_dir}/results.json, results.md and plots ({results['time_s']}s)")
    return results


if __name__ == "__main__":
    main()
