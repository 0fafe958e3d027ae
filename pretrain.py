"""The pretrained embedded base: a random-init tiny Qwen3-VL taught to see the shapes world before
PRISM's stage 1, so that our `tiny` plays the part Qwen3-VL plays in the paper.

Why: PRISM starts from a model that already perceives. Its SFT freezes the vision tower, and the
drift that alignment repairs is in how the language model uses what it sees. A random-init model
that only learns to see during SFT (and is frozen afterwards) leaves nothing for stages 2-3 to act
on, and a discriminator upcycled from random weights cannot judge captions against images
(docs/results.md, "Grounding probe").

What it does (`build`, called by model.resolve_model for `tiny` and `small`):
  1. the random-init model of the same shape (model.build_embedded, `tiny-random` / `small-random`)
  2. next-token cross-entropy on answer tokens (sft.token_loss_sum) over fresh scenes of the task's
     world, every weight trained (vision tower included), AdamW + warm-up + cosine (sft.lr_at). The
     data is generic perception, in plain text and NOT in PRISM's three-block format, so SFT still
     has the format and the multi-step reasoning to teach. Each row is a short chat about one image:
         "List the objects in the image."   -> "2 red circles, 1 blue square."   (describe_frac)
         then `questions` of these:
         "How many red shapes are there?"   -> "2"      (a colour, a shape, or both)
         "Is there a blue triangle?"        -> "no"
     No system prompt, so the policy's instruction (data.SYSTEM_PROMPT) is new to it at SFT. A
     tenth of the scenes hold a single object: a clean view of one shape.
  3. held-out perception: greedy object lists on `eval_scenes` fresh scenes, exact multiset match
     (evaluate.parse_caption_objects) -> pretrain.json beside the weights.
Scenes come from their own seeded stream ("nanoprism/pretrain/..."), drawn with the task's
sampler and renderer (2-8 objects, 96 px); the chance of meeting a test scene exactly is nil.

Deterministic and cached like the random build: the folder name hashes the recipe (RECIPES, the
random build's folder, the seed), so changing the recipe rebuilds and nothing stale is reused. The
weights can differ in the last bits with the number of CPU threads (float sums), not the recipe.

Usage:
  python pretrain.py --preset tiny                  # build (or reuse); print folder and accuracy
  python pretrain.py --preset tiny --eval_every 300 # also print held-out accuracy while training
  NANOPRISM_BASE=random makes `tiny`/`small` mean the random-init builds (the tests use it: those
  build in a second).
"""
import argparse
import hashlib
import io
import json
import os
import random
import shutil
import time

import torch

# The recipe per preset. `tiny`: the settings that learn fast here (docs/measured.md: lr 2e-3,
# batch 32, betas 0.9/0.95). Held-out object-list accuracy rises late (docs/results.md: 0.495
# after 1,800 steps, 0.840 with steps=3600 at twice the build time); 1,800 is what the measured
# downstream runs used, not where it levels off. `small` has had no tuning run.
RECIPES = {
    "tiny": dict(random="tiny-random", steps=1800, batch_size=32, lr=2e-3, warmup_frac=0.03,
                 min_lr_frac=0.05, describe_frac=0.9, questions=1, single_frac=0.1, image_size=96,
                 eval_scenes=200, version=3),
    "small": dict(random="small-random", steps=3000, batch_size=32, lr=1e-3, warmup_frac=0.03,
                  min_lr_frac=0.05, describe_frac=0.9, questions=1, single_frac=0.1, image_size=96,
                  eval_scenes=200, version=3),
}
DESCRIBE = "List the objects in the image."  # evaluate.DESCRIBE asks the same


# ----------------------------------------------------------------------------- data
def _plural(shape, n):
    return shape + ("s" if n != 1 else "")


def conversation(scene, rng, describe_frac, questions):
    """The turns about one scene -> [(question, answer), ...]: the object list first (with
    probability describe_frac), then `questions` simple questions. Several turns share the image's
    encoding, and an object list in (nearly) every row is what made the task's SFT learn to see
    (docs/measured.md): the first recipe, one turn per row, was at 0.16 after 1,500 steps."""
    turns = [(DESCRIBE, describe(scene))] if rng.random() < describe_frac else []
    return turns + [question(scene, rng) for _ in range(questions)]


def describe(scene):
    import task
    return task.describe(scene["objects"]) + "."


def question(scene, rng):
    """One simple question about a scene -> (question, answer), plain text."""
    import task
    objects = scene["objects"]
    kind = rng.choice(["color", "shape", "both", "exists"])
    color, shape = rng.choice(task.COLORS), rng.choice(task.SHAPES)
    if kind == "color":
        return f"How many {color} shapes are there?", str(task.count(objects, color=color))
    if kind == "shape":
        return f"How many {_plural(shape, 2)} are there?", str(task.count(objects, shape=shape))
    if kind == "both":
        n = task.count(objects, color, shape)
        return f"How many {color} {_plural(shape, 2)} are there?", str(n)
    return f"Is there a {color} {shape}?", "yes" if task.count(objects, color, shape) else "no"


def scenes(rng, n, image_size, single_frac=0.0):
    """n scenes drawn from rng as the task draws them (a level uniformly, then its 2-3, 3-5 or 5-8
    objects), except that a share single_frac holds one object: a clean view of one shape, the
    part of perception a tiny vision tower learns last (colours come first)."""
    import task
    out = []
    for _ in range(n):
        lo, hi = task.LEVELS[rng.choice(sorted(task.LEVELS))]["objects"]
        k = 1 if rng.random() < single_frac else rng.randint(lo, hi)
        out.append(task.sample_scene(rng, k, image_size))
    return out


def messages(turns):
    """[(question, answer), ...] -> chat messages; the image goes with the first question."""
    out = []
    for i, (q, a) in enumerate(turns):
        out += [{"role": "user", "content": ("<image>\n" if i == 0 else "") + q},
                {"role": "assistant", "content": a}]
    return out


def encode_batch(processor, convs, images):
    """Conversations + PIL images -> a right-padded training batch, labels on the answer tokens and
    their <|im_end|> only. One processor call for the whole batch (one per row: ~0.1 s/step)."""
    import data
    tok = processor.tokenizer
    texts = [tok.apply_chat_template(data.chat_messages(m), tokenize=False) for m in convs]
    enc = processor(text=texts, images=images, padding=True, padding_side="right",
                    return_tensors="pt")
    ids = enc["input_ids"]  # (B, T)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(ids, -100)  # (B, T)
    for i, row in enumerate(ids.tolist()):
        for j in range(len(row) - len(header) + 1):  # every assistant turn
            if row[j:j + len(header)] == header:
                end = row.index(im_end, j + len(header))
                labels[i, j + len(header):end + 1] = ids[i, j + len(header):end + 1]
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels,
            "mm_token_type_ids": enc["mm_token_type_ids"], "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"]}


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()  # data.open_image reads bytes


# ----------------------------------------------------------------------------- measuring
@torch.no_grad()
def perception_accuracy(model, processor, n=200, seed=0, image_size=96, batch_size=64):
    """Held-out object-list accuracy: greedy answer to DESCRIBE on n fresh scenes, exact multiset
    match -> (accuracy, [(answer, truth)...]). Scenes from their own stream (never trained on)."""
    import evaluate
    import task
    rng = random.Random(f"nanoprism/pretrain-eval/{seed}")
    pool = scenes(rng, n, image_size)
    rows = [{"images": [_png(task.render(s))], "extra_info": {"scene": s}} for s in pool]
    acc, answers = evaluate.plain_perception(model, processor, rows, batch_size)
    return acc, list(zip(answers, [task.describe(s["objects"]) for s in pool]))


# ----------------------------------------------------------------------------- building
def recipe_key(preset, seed, random_path):
    spec = RECIPES[preset]
    return hashlib.sha256(json.dumps([spec, seed, os.path.basename(random_path)],
                                     sort_keys=True).encode()).hexdigest()[:10]


def build(preset="tiny", seed=0, cache_dir=None, eval_every=0, log=print):
    """Build (or reuse from cache) the pretrained base for `preset`; return its folder."""
    import model as models
    from common import barrier, get_rank, publish_build
    cache_dir = cache_dir or models.CACHE_DIR
    spec = RECIPES[preset]
    random_path = models.build_embedded(spec["random"], seed=seed, cache_dir=cache_dir)
    key = recipe_key(preset, seed, random_path)
    path = os.path.join(cache_dir, f"{preset}-pretrained-seed{seed}-{key}")
    # rank 0 builds, the others wait (as build_embedded: save_pretrained writes on rank 0 only)
    if get_rank() != 0 or os.path.exists(os.path.join(path, "model.safetensors")):
        barrier()
        return path
    log(f"pretrain: building the {preset} base from {random_path} ({spec['steps']} steps, once)")
    model, processor, _ = models.load_model(random_path, torch.device("cpu"), dtype="fp32",
                                            train_vision=True, seed=seed)
    train(model, processor, spec, seed, eval_every, log)
    t0 = time.time()
    acc, samples = perception_accuracy(model, processor, spec["eval_scenes"], seed,
                                       spec["image_size"])
    info = {"preset": preset, "seed": seed, "recipe": spec, "from": os.path.basename(random_path),
            "heldout_object_list_acc": acc, "eval_scenes": spec["eval_scenes"],
            "train_s": model.train_s, "threads": torch.get_num_threads(), "samples": samples[:5]}
    log(f"pretrain: held-out object-list accuracy {acc:.3f} on {spec['eval_scenes']} scenes "
        f"({time.time() - t0:.0f}s); training took {model.train_s:.0f}s")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.tokenizer.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=2)
    publish_build(tmp, path)
    barrier()
    return path


def train(model, processor, spec, seed, eval_every=0, log=print):
    """The pretraining loop (module docstring, step 2). Fresh scenes every step: no epochs."""
    import task
    from sft import lr_at, token_loss_sum
    rng = random.Random(f"nanoprism/pretrain/{seed}")
    torch.manual_seed(seed)
    sched = argparse.Namespace(**{k: spec[k] for k in ("steps", "lr", "warmup_frac",
                                                        "min_lr_frac")})
    params = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices only (as sft.py)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.95))
    model.train()
    t0, running = time.time(), None
    for step in range(spec["steps"]):
        batch_scenes = scenes(rng, spec["batch_size"], spec["image_size"], spec["single_frac"])
        convs = [messages(conversation(s, rng, spec["describe_frac"], spec["questions"]))
                 for s in batch_scenes]
        batch = encode_batch(processor, convs, [task.render(s) for s in batch_scenes])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, sched)
        loss_sum, n = token_loss_sum(model, batch)
        loss = loss_sum / n  # a plain token mean: one micro-batch per step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"pretrain step {step + 1}/{spec['steps']} loss {running:.4f} "
                f"({time.time() - t0:.0f}s)")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < spec["steps"]:
            acc, _ = perception_accuracy(model, processor, 100, seed + 1, spec["image_size"])
            log(f"pretrain step {step + 1}: object-list accuracy {acc:.3f} (100 dev scenes)")
            model.train()
    model.train_s = time.time() - t0
    model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(RECIPES), help="which base to build")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random build and of the data")
    ap.add_argument("--eval_every", type=int, default=0,
                    help="dev accuracy every this many steps (0 = off)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    ap.add_argument("--set", default="",
                    help="tuning: recipe overrides k=v,... (the cache key follows them)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for item in filter(None, args.set.split(",")):
        k, v = item.split("=")
        RECIPES[args.preset][k] = type(RECIPES[args.preset][k])(v)
    path = build(args.preset, args.seed, eval_every=args.eval_every)
    with open(os.path.join(path, "pretrain.json")) as f:
        info = json.load(f)
    print(f"{path}: held-out object-list accuracy {info['heldout_object_list_acc']:.3f}, "
          f"trained {info['train_s']:.0f}s")


if __name__ == "__main__":
    main()
