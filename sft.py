"""Stage 1 of PRISM: supervised fine-tuning (SFT) on multimodal demonstrations.

What it does: teaches the policy the answer format
<caption>…</caption><think>…</think><answer>…</answer> and a first version of the task, by
next-token cross-entropy on demonstration answers.

The algorithm (docs/algorithms.md#sft), and where we differ from the paper:
  - loss = cross-entropy on assistant tokens only (system, prompt and image tokens carry label
    -100); we also train on each assistant turn's closing <|im_end|> so generation learns to stop.
  - the loss is a token mean over the whole optimizer step: every micro-batch and every rank divides
    its summed token losses by the step's global token count, so gradient accumulation and data
    parallelism give exactly the gradient of one big batch (a per-micro-batch mean would weight
    short answers more).
  - vision tower and projector frozen (paper; the official code's only frozen stage) for
    pretrained models, the embedded `tiny` included: it is pretrained to see (pretrain.py), as the
    paper's Qwen3-VL. Only a random-init model (`tiny-random`) trains its tower here (`--vision
    auto`: a frozen random encoder cannot learn to see). AdamW, cosine schedule with linear
    warm-up (paper: lr 1e-5, 10% warm-up, 1 epoch). The tiny models' defaults differ: lr 2e-3,
    betas (0.9, 0.95), a fixed number of steps over several epochs.
  - data: the paper mixes a large "public" SFT set with a small high-fidelity teacher set; the
    default here does the same with the synthetic task's two demonstrators (task.py).

Run it:
  CPU, embedded tiny model (about 5 minutes on 2 cores):
      python sft.py
  one GPU, QLoRA on a real model and the official sharegpt files:
      python sft.py --model Qwen3-VL-4B --qlora --grad_ckpt --data sft_mix.json \\
          --val_data val.parquet --lr 1e-5 --batch_size 32 --micro_batch_size 2 --steps 2000 \\
          --max_len 8192
  one node, 8 processes (FSDP2: weights, gradients and AdamW states sharded; --dist ddp replicates):
      torchrun --nproc_per_node=8 sft.py --model Qwen3-VL-4B --dist fsdp --data sft_mix.json \\
          --lr 1e-5 ...
The result is out_dir/final (a Hugging Face folder) for align.py / rlvr.py --model.
"""
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
import data
import model as models
import task


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # ---- the optimisation (paper: AdamW, lr 1e-5, cosine, 10% warm-up, 1 epoch)
    lr: float = 2e-3  # peak learning rate (paper, real models: 1e-5)
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_frac: float = 0.05  # fraction of steps with linear warm-up (paper: 0.1)
    weight_decay: float = 0.01  # AdamW weight decay
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    steps: int = 1200  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step, summed over ranks and accumulation
    seed: int = 0  # seed for data order and initialisation (each rank adds its rank)
    # ---- data
    model: str = "tiny"  # tiny | small | Qwen3-VL-2B/4B/8B | hub id | local dir (e.g. a checkpoint)
    data: str = ("data/tiny/sft_public.json,"  # comma-separated sharegpt JSON/JSONL files
                 "data/tiny/sft_teacher.json")
    val_data: str = "data/tiny/val.parquet"  # parquet/JSONL prompts, ground truths, teacher answers
    out_dir: str = "runs/sft"  # checkpoints, metrics.jsonl, final model
    max_len: int = 1024  # rows longer than this many tokens are skipped (and counted)
    skip_bad_rows: bool = False  # skip (and count) malformed data rows instead of stopping
    # image size bounds in pixels (as align.py / rlvr.py: the official runs' qwen-vl-utils bounds)
    min_pixels: int = 4096  # smaller images are scaled up to this many pixels
    max_pixels: int = 16777216  # larger images are scaled down to this many pixels
    # ---- evaluation, logging, checkpoints
    eval_every: int = 300  # evaluate every this many steps (0 = only at the end)
    eval_rows: int = 200  # validation prompts per evaluation
    eval_batch_size: int = 64  # prompts per generate call in evaluation
    max_new_tokens: int = 128  # generation budget in evaluation
    save_every: int = 300  # checkpoint every this many steps
    resume: bool = False  # continue from out_dir's latest checkpoint
    stop_after: int = 0  # stop after this step, no final save, as if interrupted (0 = off)
    max_bad_steps: int = 5  # stop after this many NaN/Inf steps in a row, each skipped (0 = never)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # also send metrics.jsonl there
    # ---- model and system
    lora: bool = False  # train LoRA adapters on the language model instead of all weights
    qlora: bool = False  # 4-bit nf4 base weights + LoRA (needs bitsandbytes)
    lora_r: int = 16  # LoRA rank
    # the vision tower + projector; auto freezes pretrained ones (paper) but trains the random-init
    # embedded ones (a frozen random encoder cannot learn to see)
    vision: Literal["auto", "frozen", "trained"] = "auto"  # auto: frozen if pretrained else trained
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    # padding-free micro-batches: a micro-batch's rows laid end to end in one row (see pack())
    pack: Literal["auto", "on", "off"] = "auto"  # padding-free; auto: on with flash_attention_2
    # auto: trained weights and AdamW states in fp32 (fsdp: bf16 compute), a LoRA base in bf16
    # where the GPU has it (model.stage_dtype); bf16 for full fine-tuning is refused
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights' dtype (auto: see above)
    grad_ckpt: bool = False  # gradient checkpointing: less activation memory, +1 forward per step
    micro_batch_size: int = 32  # sequences per forward/backward on one rank
    # under torchrun: auto = fsdp for models of 1B+ parameters (a replica does not fit), else ddp
    dist: Literal["auto", "ddp", "fsdp"] = "auto"  # ddp (replicas) | fsdp (FSDP2 sharding)
    cpu_offload: bool = False  # fsdp only: keep sharded weights and optimizer states in CPU RAM
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    cache_encoded: bool = True  # keep tokenised rows in RAM after first use (off for data > RAM)

def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr_frac * lr (as a pure function of the step, so a
    resumed run needs no scheduler state)."""
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_frac
                     + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    """A fresh seeded permutation of the n rows for each epoch."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen, device="cpu").tolist()


def step_positions(step, batch_size, n, seed):
    """Dataset indices of optimizer step `step`. A pure function of (step, seed): resuming at step k
    replays exactly the batches an uninterrupted run would have seen."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [epoch_order(seed, pos // n, n)[pos % n] for pos in positions]


# ----------------------------------------------------------------------------- helpers
def token_loss_sum(model, batch):
    """Summed cross-entropy over label tokens, and their count. We shift ourselves instead of
    passing labels= to the model, because the model would return a mean over this micro-batch
    only."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def pack(model, batch):
    """A padding-free micro-batch: the rows of a right-padded batch laid end to end in one row of N
    real tokens. Position ids restart at 0 with every row, which is how transformers tells the rows
    apart: flash-attn 2 runs them as variable-length sequences (no compute on padding at all),
    sdpa and eager build a block-diagonal causal mask. Qwen3-VL's position_ids are (4, 1, N): the
    text positions, then each row's own M-RoPE (time, height, width) positions from get_rope_index.
    In the loss, a row's last token "predicts" the next row's first token, whose label is -100 (it
    opens the system turn), so nothing leaks between rows. use_cache=False: transformers looks for
    packed rows only when no KV cache is passed."""
    keep = batch["attention_mask"].bool()  # (B, T)
    rope, _ = models.hf_model(model).model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"])  # (3, B, T)
    text = keep.long().cumsum(-1) - 1  # (B, T): 0, 1, 2, ... within each row
    token_keys = ("input_ids", "labels", "mm_token_type_ids")
    packed = {k: batch[k][keep][None] for k in token_keys}  # (1, N) each
    packed["position_ids"] = torch.cat([text[None], rope])[:, keep][:, None]  # (4, 1, N)
    packed.update({k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
    return {**packed, "use_cache": False}


@torch.no_grad()
def evaluate(model, processor, val_rows, val_items, cfg, rank, world, device):
    """Validation loss on the teacher answers, plus greedy pass@1 accuracy and format-valid rate.

    Each rank takes every world-th row; the sums are all-reduced so every rank sees the same
    numbers. We run the unwrapped model: a DDP forward may broadcast buffers, a collective that
    would hang when ranks hold different numbers of validation batches."""
    model = models.unwrap(model)
    model.eval()
    loss_sum = torch.zeros(2, device="cpu")  # (summed token loss, token count)
    with models.gathered(model):  # FSDP: full weights, so uneven batch counts need no collectives
        for i in range(rank * cfg.eval_batch_size, len(val_items), world * cfg.eval_batch_size):
            batch = data.collate_sft(val_items[i:i + cfg.eval_batch_size],
                                     processor.tokenizer.pad_token_id)
            loss, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            loss_sum += torch.stack([loss.cpu(), n.cpu().float()])
    mine = val_rows[rank::world]
    # at most as many tokens in flight as a training micro-batch holds
    responses = models.generate(model, processor, mine, cfg.max_new_tokens, cfg.eval_batch_size,
                                token_budget=cfg.micro_batch_size * cfg.max_len)
    rewards = [data.reward(r, row["ground_truth"]) for r, row in zip(responses, mine)]
    counts = torch.tensor([sum(x["acc"] for x in rewards), sum(x["format"] for x in rewards),
                           len(rewards)], dtype=torch.float, device="cpu")
    common.all_reduce_sum(loss_sum)  # every rank needs the global numbers to log the same line
    common.all_reduce_sum(counts)
    model.train()
    samples = [{"prompt": row["messages"][-1]["content"], "response": r,
                "ground_truth": row["ground_truth"], **x}
               for r, row, x in list(zip(responses, mine, rewards))[:3]]
    return {"val_loss": (loss_sum[0] / loss_sum[1]).item(),
            "val_acc": (counts[0] / counts[2]).item(),
            "val_format": (counts[1] / counts[2]).item()}, samples


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    # ---- distributed init (torchrun sets RANK / WORLD_SIZE; without them: one process)
    rank, world, device, log = common.start(cfg)
    master = rank == 0
    cfg.dist = models.pick_dist(cfg, world, log)  # --dist auto: by model size
    models.check_memory("sft", cfg, world, device, log)  # on a GPU: fits, or which flags to add
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch_size {cfg.batch_size} must be divisible by the "
                         f"{world} ranks")

    # ---- data (files only; the embedded task is written by task.py when its folder is missing)
    try:
        if master:
            task.ensure_default(cfg.data.split(",") + [cfg.val_data], log=log)
        common.barrier()  # the other ranks read the files rank 0 may have just written
        rows = [r for path in cfg.data.split(",")
                for r in data.load_sft(path, cfg.skip_bad_rows, log=log)]
        val_rows = data.load_prompts(cfg.val_data, require_teacher=True,
                                     skip_bad_rows=cfg.skip_bad_rows, log=log)[:cfg.eval_rows]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")

    # ---- model
    model, processor, resume_from = models.load_policy(cfg, device, log)
    # validation loss is measured on the teacher's answers to the validation prompts
    val_items = [data.encode_sft(
        {"messages": r["messages"] + [{"role": "assistant", "content": r["teacher_response"]}],
         "images": r["images"]}, processor) for r in val_rows]
    log(f"data: {len(rows)} training conversations, {len(val_rows)} validation prompts")
    model = models.wrap_distributed(model, device, cfg.dist, cpu_offload=cfg.cpu_offload)

    # ---- optimizer: AdamW, no weight decay on norms and biases (1-D tensors)
    params = [p for p in model.parameters() if p.requires_grad]
    decay_params = [p for p in params if p.dim() >= 2]
    nodecay_params = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                                   {"params": nodecay_params, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, cfg.beta2))
    # bad counts the steps skipped for NaN/Inf: in all, and in a row
    start_step, bad = 0, {"bad_steps": 0, "bad_streak": 0}
    if resume_from:
        state = common.load_trainer_state(resume_from, rank)
        models.load_optimizer_state(model, optimizer, state["optimizer"])
        start_step, bad["bad_steps"] = state["step"], state.get("bad_steps", 0)

    # ---- loop
    per_rank = cfg.batch_size // world
    micro = min(cfg.micro_batch_size, per_rank)
    pad_id = processor.tokenizer.pad_token_id
    packing = cfg.pack == "on" or (cfg.pack == "auto" and cfg.attn == "flash_attention_2")
    metrics_path, samples_path = common.open_logs(cfg.out_dir, start_step, master)
    write_metrics = common.metrics_writer(cfg, metrics_path, master)  # + TensorBoard / W&B
    info = common.run_info(cfg)
    from tqdm import tqdm
    # Rows are tokenised when first used (the image processor is the slow part: ~2 ms a row for the
    # tiny task) and, with --cache_encoded, kept for later epochs. Rows over max_len are skipped and
    # counted: cutting them could cut through an image's tokens.
    cache, too_long = {}, set()

    def encoded(i):
        if i in cache:
            return cache[i]
        x = data.encode_sft(rows[i], processor)
        if len(x["input_ids"]) > cfg.max_len:
            too_long.add(i)
            return None
        if cfg.cache_encoded:
            cache[i] = x
        return x

    record = {}
    # mininterval: a log file gets a line every 30 s, not 3 per second
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not master, desc="sft", mininterval=1 if sys.stderr.isatty() else 30)
    model.train()
    for step in bar:
        t0 = time.time()
        # this rank's share of the step, in the order step_positions fixes (so a resume replays it)
        mine = [x for i in step_positions(step, cfg.batch_size, len(rows), cfg.seed)[rank::world]
                if (x := encoded(i)) is not None]
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The global token count of the step, so every micro-batch on every rank divides by the same
        # number (see the module docstring). all_reduce: ranks hold different rows.
        n_tokens = common.all_reduce_sum(torch.tensor(
            sum(int((x["labels"][1:] != -100).sum()) for x in mine), device="cpu"))
        loss_total = 0.0
        # under FSDP every rank must run as many micro-batches (rows over max_len make them differ):
        # padding copies of the first one count 0 (models.even_split)
        starts, real = models.even_split(list(range(0, len(mine), micro)))
        for n_done, (j, keep) in enumerate(zip(starts, real), 1):
            collated = data.collate_sft(mine[j:j + micro], pad_id)
            batch = {k: v.to(device) for k, v in collated.items()}
            if packing:
                batch = pack(model, batch)
            # DDP all-reduces gradients in backward; skipping that on all but the last micro-batch
            # saves one collective per micro-batch and gives the same sum.
            last = n_done == len(starts)
            skip_sync = world > 1 and not last and hasattr(model, "no_sync")
            sync = model.no_sync() if skip_sync else contextlib.nullcontext()
            with sync:
                loss_sum, _ = token_loss_sum(model, batch)
                # DDP and our FSDP setup average gradients over ranks; multiplying by world turns
                # that average back into the global sum / global token count.
                (loss_sum * (world if keep else 0) / n_tokens).backward()
            loss_total += loss_sum.item() if keep else 0.0
        grad_norm = common.clip_grad_norm(params, cfg.grad_clip)
        # the loss is the global token mean (all_reduce: each rank summed only its rows). It and
        # the (DDP-averaged) gradient norm are the same on every rank, so all ranks skip a NaN/Inf
        # step together.
        loss = common.all_reduce_sum(torch.tensor(loss_total, device="cpu")) / n_tokens.clamp_min(1)
        why = common.nonfinite(loss=loss, grad_norm=grad_norm)
        if not why:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.count_bad_step(bad, why, step + 1, log)

        # ---- log
        dt = time.time() - t0
        record = {"step": step + 1,
                  "loss": round(loss.item(), 5),
                  "lr": lr,
                  "grad_norm": round(grad_norm.item(), 4),
                  "tokens_per_s": round(n_tokens.item() / dt, 1),
                  "step_s": round(dt, 3),
                  "peak_mem_mb": round(common.peak_memory_mb(device), 1),
                  "skipped_long_rows": len(too_long),
                  "bad_steps": bad["bad_steps"]}
        last_step = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last_step:
            scores, samples = evaluate(model, processor, val_rows, val_items, cfg, rank, world,
                                       device)
            record.update({k: round(v, 4) for k, v in scores.items()})
            if master:
                for s in samples:
                    common.append_jsonl(samples_path, {"step": step + 1, **s})
                tqdm.write(" ".join(f"{k}={v}" for k, v in record.items()))
        if master:
            write_metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", refresh=False)

        # ---- checkpoint (never on a skipped step, nor after too many of them in a row)
        common.stop_if_diverged(bad, cfg.max_bad_steps, step + 1, cfg.out_dir)
        if ((cfg.save_every and (step + 1) % cfg.save_every == 0) or last_step) and not why:
            common.save_checkpoint(cfg.out_dir, step + 1,
                                   lambda path: models.save_pretrained(model, processor, path),
                                   {"optimizer": models.optimizer_state(model, optimizer),
                                    "step": step + 1,
                                    "bad_steps": bad["bad_steps"]}, info, rank)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            log(f"stopping after step {step + 1} (--stop_after); continue with --resume")
            return

    # ---- save
    final_dir = common.save_final(cfg.out_dir,
                                  lambda path: models.save_pretrained(model, processor, path), info)
    log(f"saved {final_dir}")
    if master:
        # The held-out summary; the synthetic task's meta.json knows the text-only chance rate
        meta = os.path.join(os.path.dirname(cfg.val_data), "meta.json")
        chance = json.load(open(meta))["chance"]["overall"] if os.path.exists(meta) else None
        if "val_acc" in record:
            log(f"\n| held-out ({cfg.val_data}, {len(val_rows)} prompts) | after SFT |\n|---|---|\n"
                f"| format-valid rate | {record['val_format']:.3f} |\n"
                f"| answer accuracy (greedy pass@1) | {record['val_acc']:.3f} |"
                + (f"\n| text-only chance rate | {chance:.3f} |" if chance is not None else ""))
    common.finish()


if __name__ == "__main__":
    main()
