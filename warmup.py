"""Before alignment: the discriminator's warm-up, its own stage (discriminator.py is the model).

What it does: D, freshly upcycled from a VLM backbone (discriminator.build), learns on (teacher,
student) pairs to score the teacher's answer above a student's, one caption pair and one reasoning
pair per prompt (docs/algorithms.md#discriminator-warm-up):
    loss = -log sigmoid(t_cap - s_cap) - log sigmoid(t_cot - s_cot) + 0.01 * aux
           + 0.001 * mean(t_cap^2 + s_cap^2 + t_cot^2 + s_cot^2) / 4                   (batch means)
Pairs come from --pairs (official JSONL), or are built by sampling one answer per alignment prompt
from the SFT policy (format-invalid answers skipped and counted) and written to
out_dir/warmup_pairs.jsonl in the official format. AdamW, 10% linear warm-up, cosine, clip 1.0.

Deviations from the paper / official code, all deliberate:
  - Default backbone: the embedded `tiny` base, pretrained to see the shapes world (pretrain.py),
    the policy's own starting point, as the paper upcycles D from a pretrained Qwen3-VL-2B of the
    policy's family. lr 1e-3 (paper: 1e-5 for a 2B model). `--backbone tiny-random` is the old
    random-init D (docs/results.md: it cannot see; the grounding probe stays at chance).
  - `--hard_negatives R` (ours; official: 0) adds R extra pairs per training pair whose student is
    the teacher's answer with one object misperceived (hard_negative_pairs): style-matched, so
    only the image tells them apart. At the end, the grounding probe (evaluate.py) on
    `--probe_data` is printed and logged.
  - The warm-up adds the alignment loss's score regulariser (0.001 * mean score^2; official
    warm-up: none). Without it, 3 epochs at lr 1e-3 pushed most scores onto the +10 clamp, where a
    tied pair has zero gradient: held-out acc_cap/acc_cot 0.53/0.37, with it 0.84/0.74
    (--score_reg 0 = off).
  - Single-process (no torchrun). acc/gap skip pairs whose two segments are the same string (no
    signal, exactly zero gradient); their share is logged as same_cap / same_cot.

Run it:
  CPU, tiny backbone, pairs sampled from the SFT policy (3 epochs: ~2 min alone, 3.5 min shared):
      python warmup.py --policy runs/sft/final --out_dir runs/disc_warmup --epochs 3
  official pairs file, real backbone, one GPU:
      python warmup.py --pairs warmup.jsonl --backbone Qwen3-VL-2B --lr 1e-5 --batch_size 4 \\
          --grad_ckpt
The result is out_dir/final, a discriminator folder for align.py --disc.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

import common
import data
import model as models
import rl_losses
from discriminator import build, gradient_checkpointing, pair_prompt, param_groups, save, score
from sft import lr_at


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    backbone: str = "tiny"  # tiny | small | Qwen3-VL-2B (paper) | hub id | local folder
    # moe = official; dense and text-only are the paper's ablations
    kind: Literal["moe", "dense", "text-only"] = "moe"  # moe = official; others = paper's ablations
    # learned = the official code (one router over all experts); segment = the paper's wording
    routing: Literal["learned", "segment"] = "learned"  # learned: official; segment: paper wording
    experts: int = 4  # experts per MoE layer (official: 4)
    top_k: int = 2  # experts per token (official: 2)
    noise: float = 0.01  # std of the noise added to each expert copy (official: 0.01)
    max_segment_tokens: int = 512  # segments longer than this keep their first tokens (counted)
    # what D trains (discriminator.build): full = the paper; lora = LoRA experts + routers + head
    # (with --disc_4bit: the one-GPU recipe of docs/scaling.md); head = the value head alone
    disc_train: Literal["full", "lora", "head"] = "full"  # what D trains (full = the paper)
    disc_4bit: bool = False  # D's frozen language-model layers in nf4 (lora / head only)
    disc_lora_r: int = 16  # rank of D's LoRA experts (--disc_train lora)
    # the vision tower; auto trains the tower of the random-init embedded backbones only (as sft.py)
    vision: Literal["auto", "frozen", "trained"] = "auto"  # auto: frozen if pretrained else trained
    pairs: str = ""  # official-format warm-up pairs JSONL; empty = sample --policy on --prompts
    pairs_base: str = ""  # base folder of the pairs' image paths (empty = the pairs file's folder)
    # alignment prompts with teacher references, read only to build pairs
    prompts: str = "data/tiny/align_prompts.parquet"  # alignment prompts + teacher refs (for pairs)
    policy: str = "runs/sft/final"  # the SFT policy that plays the student (to build pairs)
    max_prompts: int = 0  # build pairs from the first this many prompts only (0 = all)
    max_new_tokens: int = 128  # student answer budget when sampling
    gen_batch_size: int = 64  # prompts per generate call
    out_dir: str = "runs/disc_warmup"  # warmup_pairs.jsonl, metrics.jsonl, final/
    seed: int = 0  # seed for sampling, initialisation and pair order
    epochs: int = 1  # passes over the training pairs when --steps is 0 (paper: 1)
    steps: int = 0  # optimizer steps (0 = --epochs passes over the pairs)
    batch_size: int = 8  # pairs per optimizer step
    lr: float = 1e-3  # peak learning rate (random tiny backbone; paper with Qwen3-VL-2B: 1e-5)
    min_lr_frac: float = 0.0  # cosine decays to lr * min_lr_frac
    warmup_frac: float = 0.1  # fraction of steps with linear warm-up (paper: 0.1)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm (paper: 1.0; 0 = off)
    aux_coef: float = 0.01  # weight of the MoE load-balancing loss (official: 0.01)
    score_reg: float = 0.001  # weight of mean(score^2), as in alignment (official warm-up: none)
    val_pairs: int = 64  # pairs held out and scored at the end (0 = none)
    # extra pairs per training pair whose student is the teacher's answer with one object
    # misperceived (0 = official)
    hard_negatives: float = 0.0  # hard-negative pairs per training pair (0 = official)
    # held-out prompts with scenes for the grounding probe printed at the end
    probe_data: str = "auto"  # grounding probe data (auto: test.parquet beside --prompts; "": off)
    micro_batch: int = 16  # sequences per forward when scoring held-out pairs
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on capable GPUs, else fp32
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    grad_ckpt: bool = False  # gradient checkpointing (real backbones: docs/distributed.md)


# ----------------------------------------------------------------------------- helpers
def build_pairs(cfg, device, log):
    """Sample one student answer per prompt from the policy and pair it with the teacher reference.
    Writes out_dir/warmup_pairs.jsonl (official format, image paths relative to out_dir) and returns
    its path. Format-invalid student answers cannot be split into segments: skipped and counted."""
    rows = data.load_prompts(cfg.prompts, require_teacher=True, skip_bad_rows=cfg.skip_bad_rows,
                             log=log)
    rows = rows[:cfg.max_prompts] if cfg.max_prompts else rows
    policy, policy_processor, _ = models.load_model(cfg.policy, device, dtype=cfg.dtype,
                                                    attn=cfg.attn, seed=cfg.seed)
    t0 = time.time()
    # paper: temperature 1.0, on-policy samples
    answers = models.generate(policy, policy_processor, rows, cfg.max_new_tokens,
                              cfg.gen_batch_size, do_sample=True, temperature=1.0)
    del policy
    path = os.path.join(cfg.out_dir, "warmup_pairs.jsonl")
    image_dir = os.path.join(cfg.out_dir, "pair_images")
    pairs, invalid = [], 0
    for i, (row, answer) in enumerate(zip(rows, answers)):
        caption, cot = data.split_segments(answer)
        if caption is None or len(row["images"]) != 1:  # a pair holds exactly one image
            invalid += 1
            continue
        image = row["images"][0]
        if isinstance(image, bytes):  # an embedded image gets a file: the pairs format holds a path
            os.makedirs(image_dir, exist_ok=True)
            data.open_image(image).save(os.path.join(image_dir, f"{i:06d}.png"))
            image = os.path.join(image_dir, f"{i:06d}.png")
        user_turn = next(m["content"] for m in row["messages"] if m["role"] == "user")
        question = user_turn.replace("<image>", "").strip()
        pairs.append({"prompt": question, "image": os.path.relpath(image, cfg.out_dir),
                      "teacher_caption": row["teacher_caption"], "teacher_cot": row["teacher_cot"],
                      "student_caption": caption, "student_cot": cot})
    log(f"pairs: sampled {len(rows)} student answers in {time.time() - t0:.1f}s, {invalid} skipped "
        f"(invalid format or not one image), {len(pairs)} pairs -> {path}")
    if not pairs:
        raise SystemExit(f"error: none of the {len(rows)} student answers from {cfg.policy} has a "
                         "valid format; warm up from an SFT policy (or pass --pairs)")
    with open(path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return path


def hard_negative_pairs(prompts_path, n, seed=0):
    """n warm-up pairs whose student is the teacher's own answer with ONE object misperceived
    (missed, doubled, wrong colour or shape): the caption's objects line changed, and the steps
    redone consistently on that perception (task.misperceive). Same style both sides, so only
    content tells them apart: what the sampled pairs alone did not teach (docs/results.md, probe).
    Needs prompts with scenes (extra_info.scene, as task.py writes); rows cycle when n > rows."""
    import evaluate
    import task
    rows = data.load_prompts(prompts_path, require_teacher=True, log=lambda *a: None)
    rows = [r for r in rows if r["extra_info"].get("scene") and len(r["images"]) == 1]
    records = evaluate.task_records(prompts_path, rows)
    rng = random.Random(f"nanoprism/hard-negatives/{seed}")
    out = []
    for k in range(n if rows else 0):
        row, record = rows[k % len(rows)], records[k % len(rows)]
        objects = json.loads(row["extra_info"]["scene"])["objects"]
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        if record is not None:  # perception and reasoning follow the same mistake
            seen, steps, answer = task.misperceive(objects, record, rng)
            cot = task.split_response(task.format_response([], steps, answer))[1]
        else:  # no question params: the caption alone is wrong, the reasoning pair ties
            seen, cot = rng.choice(task._misperceptions(objects)), row["teacher_cot"]
        caption = evaluate.misperceived_caption(row["teacher_caption"], seen)
        out.append({"prompt": question.replace("<image>", "").strip(), "image": row["images"][0],
                    "teacher_caption": row["teacher_caption"], "teacher_cot": row["teacher_cot"],
                    "student_caption": caption, "student_cot": cot})
    return out


def pair_loss(disc, processor, pairs, aux_coef=0.01, score_reg=0.001, micro_batch=0):
    """The warm-up objective on a list of pairs -> (loss scalar, metrics dict).

    Teacher and student segments of one kind go through one score() call (one forward unless
    micro_batch is set). acc/gap count only pairs whose two segments differ (module docstring)."""
    prompts = [pair_prompt(p) for p in pairs] * 2
    n, loss, aux, reg, record = len(pairs), 0.0, 0.0, 0.0, {}
    for which, key in (("cap", "caption"), ("cot", "cot")):
        segments = [p[f"teacher_{key}"] for p in pairs] + [p[f"student_{key}"] for p in pairs]
        scores, a = score(disc, processor, prompts, segments, which, micro_batch or 2 * n)  # (2n,)
        t, s = scores[:n], scores[n:]  # (n,) teacher, (n,) student
        # Bradley-Terry: the teacher's segment should outscore the student's
        # (docs/algorithms.md#discriminator-warm-up)
        bt = rl_losses.bt_loss(t, s, torch.ones(n, dtype=torch.bool, device=t.device))
        loss, aux, reg = loss + bt, aux + a / 2, reg + scores.pow(2).mean() / 2
        differ = torch.tensor([p[f"teacher_{key}"] != p[f"student_{key}"] for p in pairs])  # (n,)
        t, s = t.detach()[differ], s.detach()[differ]
        record.update({f"bt_{which}": bt.item(),
                       f"acc_{which}": (t > s).float().mean().item() if len(t) else None,
                       f"gap_{which}": (t - s).mean().item() if len(t) else None,
                       f"same_{which}": 1 - differ.float().mean().item(),
                       f"load_{which}": models.unwrap(disc).stats["load"]})
    # reg = mean(t_cap^2 + s_cap^2 + t_cot^2 + s_cot^2) / 4, the score regulariser of the alignment
    # loss (docs/algorithms.md#discriminator-loss): it keeps scores off the +-10 clamp, where a pair
    # ties with zero gradient.
    loss = loss + aux_coef * aux + score_reg * reg
    return loss, {"loss": loss.item(), "aux": aux.item(), "score_sq": reg.item(), **record}


def _rounded(record):
    return {k: round(v, 4) if isinstance(v, float)
            else [round(x, 3) for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    common.seed_everything(cfg.seed)
    _, _, _, device = common.init_distributed()  # single process: this only picks the device
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    os.makedirs(cfg.out_dir, exist_ok=True)

    # ---- data: the official pairs file, or pairs built from the SFT policy's samples
    try:
        path = cfg.pairs or build_pairs(cfg, device, print)
        pairs = data.load_pairs(path, base_dir=cfg.pairs_base or None,
                                skip_bad_rows=cfg.skip_bad_rows)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    random.Random(cfg.seed).shuffle(pairs)
    n_val = min(cfg.val_pairs, len(pairs) // 5)  # never hold out more than a fifth
    val, train = pairs[:n_val], pairs[n_val:]
    if cfg.hard_negatives:  # training only: the held-out pairs stay the sampled ones
        hard = hard_negative_pairs(cfg.prompts, round(cfg.hard_negatives * len(train)), cfg.seed)
        print(f"data: {len(hard)} hard-negative pairs (teacher vs one object misperceived) "
              f"from {cfg.prompts}")
        train = train + hard
    steps = cfg.steps or cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    cfg = dataclasses.replace(cfg, steps=steps)  # the schedule (lr_at) reads cfg.steps
    print(f"data: {len(train)} training pairs, {len(val)} held out, {steps} steps")

    # ---- model and optimizer. Trained weights stay fp32 (bf16 AdamW rounds small updates
    # away; model.stage_dtype): "auto" means fp32 unless only LoRA / the head train
    dtype = "fp32" if cfg.dtype == "auto" and cfg.disc_train == "full" else cfg.dtype
    try:
        disc, processor = build(cfg.backbone, device, kind=cfg.kind, n_experts=cfg.experts,
                                top_k=cfg.top_k, noise=cfg.noise, routing=cfg.routing,
                                vision=cfg.vision, max_segment_tokens=cfg.max_segment_tokens,
                                dtype=dtype, attn=cfg.attn, seed=cfg.seed,
                                train=cfg.disc_train, bits4=cfg.disc_4bit,
                                lora_r=cfg.disc_lora_r)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if cfg.grad_ckpt:
        gradient_checkpointing(disc)
    total, trainable = models.count_params(disc)
    print(f"discriminator: {cfg.kind} ({cfg.experts if cfg.kind != 'dense' else 1} experts, "
          f"{cfg.routing} routing) on {cfg.backbone}: {total / 1e6:.2f}M parameters, "
          f"{trainable / 1e6:.2f}M trainable")
    optimizer = torch.optim.AdamW(param_groups(disc, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95))

    # ---- loop
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    common.trim_jsonl(metrics_path, 0)  # a fresh run starts an empty log
    from tqdm import tqdm
    bar = tqdm(range(steps), desc="disc warm-up", mininterval=1 if sys.stderr.isatty() else 30)
    disc.train()
    order, epoch = [], 0
    for step in bar:
        t0 = time.time()
        while len(order) < cfg.batch_size:  # a fresh seeded permutation each epoch
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            order += torch.randperm(len(train), generator=gen).tolist()
            epoch += 1
        batch, order = [train[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, record = pair_loss(disc, processor, batch, cfg.aux_coef, cfg.score_reg)
        loss.backward()
        grad_norm = common.clip_grad_norm(disc.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log
        record = _rounded({"step": step + 1, **record, "lr": lr, "grad_norm": grad_norm.item(),
                           "step_s": time.time() - t0})
        common.append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc_cap=record["acc_cap"],
                        acc_cot=record["acc_cot"], refresh=False)

    # ---- held-out pairs, then save
    if val:
        disc.eval()
        with torch.no_grad():
            _, scores = pair_loss(disc, processor, val, cfg.aux_coef, cfg.score_reg,
                                  cfg.micro_batch)
        summary = _rounded({"step": cfg.steps,
                            "val_pairs": len(val),
                            **{f"val_{k}": v for k, v in scores.items()}})
        common.append_jsonl(metrics_path, summary)
        print(" ".join(f"{k}={v}" for k, v in summary.items() if "load" not in k))
    final = os.path.join(cfg.out_dir, "final")
    save(disc, processor, final, info=common.run_info(cfg))
    print(f"saved {final}")
    # does D judge content, or only style? (evaluate.grounding_probe) -> printed and probe.json
    probe_data = cfg.probe_data
    if probe_data == "auto":
        probe_data = os.path.join(os.path.dirname(cfg.prompts), "test.parquet")
    if probe_data and os.path.exists(probe_data):
        import evaluate
        probe = evaluate.probe_discriminator(disc, probe_data, seed=cfg.seed, processor=processor)
        common.write_json_atomic(os.path.join(cfg.out_dir, "probe.json"),
                                 {"data": probe_data, **probe})


if __name__ == "__main__":
    main()
