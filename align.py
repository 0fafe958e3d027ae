"""Stage 2 of PRISM: alignment by black-box on-policy distillation against a MoE discriminator.

What it does: before RL, pulls the SFT policy's own answers towards the teacher's, without any
teacher logits. The policy's rollouts and the teacher's text-only reference answers play an
adversarial game: a discriminator D (discriminator.py) learns to tell them apart, and the policy is
rewarded for answers D finds teacher-like. D scores the two halves of an answer separately: the
perception segment <caption>...</caption> and the reasoning segment <think>...</think><answer>...
</answer>, so the policy learns to see and to reason like the teacher, each with its own signal.

One step, in the order of docs/algorithms.md#alignment-step-order (each is a section of the loop):
  1. rollout    B prompts x N samples from the policy (rollout.sample)
  2. score      D scores every valid rollout's caption (s_cap) and reasoning (s_cot), and the
                teacher reference of each prompt (t_cap, t_cot); D as it is BEFORE its update,
                without gradients
  3. advantage  invalid rollouts get the group's worst valid score - 1, then
                A = alpha * GN(s_cap) + (1 - alpha) * GN(s_cot) - format_penalty * invalid
                (rl_losses.prism_advantages; GN = normalise within the prompt's group)
  4. update D   on the same batch: Bradley-Terry, teacher should outscore student, over valid
                rollouts, + a small score regulariser; if no rollout on any rank is valid, a weak
                "push teacher scores up" fallback (rl_losses.disc_loss); a second forward of D,
                now with gradients, --disc_chunk prompts at a time
  5. update pi  the policy loss of --algo (rl_losses.ALGOS, grpo by default), no KL: log-probs
                -> loss -> backward -> optimizer step, written out in the loop
  6. log, evaluate, checkpoint (policy and D together)
Where we differ from the paper (docs/algorithms.md#reference-hyperparameters):
  - the tiny embedded models get their own learning rates (policy 3e-5 and D 1e-4, constant; paper
    1e-6 for both), 4 prompts x 8 samples (paper 4 x 16), 128 new tokens (paper 6144).
  - D's update adds 0.01 x the MoE load-balancing loss (as in its warm-up) so its router keeps
    using every expert; --aux_coef 0 gives the paper's loss exactly.
  - under torchrun, D's Bradley-Terry means are per rank and its gradients are averaged over
    ranks (the paper's verl averages over the global batch); the all-invalid fallback is global.
  - the old log-probs are the ones recorded while sampling (rollout.py), not a second forward.
  - D scores each batch twice (step 2 without gradients, step 4 with them); the official code
    scores once. The extra forward costs time, not results: the scores are the same.
  - --algo's dynamic sampling and overlong penalty (DAPO) do not apply here: D gives the reward.
  - "Why is the policy loss 0?" With one update per batch (the default, as in PRISM) every ratio is
    1 and the loss is about -mean(A) ~ 0; the gradient is not zero (rl_losses.py).

Run it (after sft.py and `python warmup.py`):
  CPU, embedded tiny models (200 steps: 9.5 min measured with 3 jobs sharing 2 cores; 150 in
  2.6 min alone):
      python align.py --model runs/sft/final --disc runs/disc_warmup/final
  one 80 GB GPU, a LoRA 4B policy and a warmed-up Qwen3-VL-2B discriminator (docs/distributed.md):
      python align.py --model runs/sft/final --lora --grad_ckpt --disc runs/disc_warmup/final \\
          --disc_chunk 1 --disc_grad_ckpt --data align.parquet --lr 1e-6 --disc_lr 1e-6 \\
          --group_size 16 ...
  one node, 8 processes, FSDP2 (both models sharded):
      torchrun --nproc_per_node=8 align.py --model runs/sft/final --disc runs/disc_warmup/final \\
          --dist fsdp --grad_ckpt --disc_chunk 1 --disc_grad_ckpt --prompts_per_step 8 \\
          --group_size 16 ...
The result is out_dir/final (the policy, for rlvr.py --model) and out_dir/final/discriminator.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

import common
import data
import discriminator
import evaluate
import model as models
import rl_losses
import rollout
import task


# ----------------------------------------------------------------------------- config
AGG = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class Config:
    # ---- PRISM's alignment game
    alpha: float = 0.5  # weight of the perception score in the advantage (paper: 0.5)
    format_penalty: float = 1.5  # advantage penalty of a format-invalid rollout (paper: 1.5)
    disc_lr: float = 1e-4  # discriminator learning rate, constant
    disc_steps: int = 1  # discriminator updates per policy update (same batch)
    score_reg: float = 1e-3  # discriminator score regulariser (paper: 0.001)
    fallback: float = 0.01  # weight of the all-invalid fallback loss (paper: 0.01)
    aux_coef: float = 0.01  # MoE load-balancing loss weight in D's update (0 = the paper's loss)
    # ---- the policy's loss: a row of rl_losses.ALGOS; the knobs override that row (None = keep)
    algo: str = "grpo"  # grpo | dapo | gspo | drgrpo | cispo, or a row you add to rl_losses.ALGOS
    eps_low: float | None = None  # lower clip range (ALGOS: 0.2; gspo 3e-4; cispo 1 = none)
    eps_high: float | None = None  # upper clip range (ALGOS: 0.2; dapo, cispo 0.28; gspo 4e-4)
    agg: AGG | None = None  # loss aggregation (ALGOS: seq-mean-token-mean; dapo, cispo token-mean)
    # ---- the loop
    model: str = "runs/sft/final"  # start policy: checkpoint, tiny | small, Qwen3-VL-4B, hub id
    disc: str = "runs/disc_warmup/final"  # D: a warm-up folder, or a backbone name (built fresh)
    disc_kind: Literal["moe", "dense", "text-only"] = "moe"  # for a fresh D (paper's ablations)
    # for a fresh D: what it trains (discriminator.build; a warm-up folder keeps its own setting)
    disc_train: Literal["full", "lora", "head"] = "full"  # full = the paper; lora / head: 1 GPU
    disc_4bit: bool = False  # fresh D: frozen language-model layers in nf4 (lora / head only)
    disc_lora_r: int = 16  # fresh D: rank of its LoRA experts (--disc_train lora)
    data: str = "data/tiny/align_prompts.parquet"  # prompts + teacher references (parquet / JSONL)
    val_data: str = "data/tiny/val.parquet"  # held-out prompts for greedy evaluation
    out_dir: str = "runs/align"  # checkpoints, metrics.jsonl, samples.jsonl, final policy and D
    seed: int = 0  # seed for prompt order and sampling (each rank adds its rank)
    steps: int = 200  # alignment steps (paper: 500)
    prompts_per_step: int = 4  # prompts per step, summed over ranks (paper: 4)
    group_size: int = 8  # rollouts per prompt, N (paper: 16)
    max_new_tokens: int = 128  # response budget (paper: 6144)
    max_prompt_len: int = 2048  # longer prompts, image tokens included, are skipped (paper: 2048)
    temperature: float = 1.0  # sampling temperature (paper: 1.0); the loss uses the same one
    lr: float = 3e-5  # policy learning rate, constant (paper, real models: 1e-6)
    weight_decay: float = 0.01  # AdamW weight decay, both models (paper: 0.01)
    grad_clip: float = 1.0  # clip each model's gradient norm (0 = off)
    ppo_epochs: int = 1  # passes over each batch of rollouts
    mini_batches: int = 1  # policy optimizer steps per pass
    # ---- evaluation, logging, checkpoints
    eval_every: int = 50  # held-out evaluation every this many steps (and at the end; 0 = end only)
    eval_rows: int = 200  # held-out prompts per evaluation (0 = no held-out evaluation at all)
    eval_batch_size: int = 64  # prompts per generate call in evaluation
    eval_k: int = 4  # also sample this many answers per held-out prompt at T=1 (val_acc_k; 0 = off)
    samples_every: int = 10  # write a few rollouts with their scores to samples.jsonl this often
    save_every: int = 50  # checkpoint every this many steps
    resume: bool = False  # continue from out_dir's latest checkpoint
    stop_after: int = 0  # stop after this step without the final save, as if interrupted (0 = off)
    skip_bad_rows: bool = False  # skip (and count) malformed data rows instead of stopping
    max_bad_steps: int = 5  # stop after this many skipped NaN/Inf steps in a row (0 = never)
    # ---- model and system
    lora: bool = False  # policy: LoRA adapters instead of all weights
    qlora: bool = False  # policy: 4-bit base weights + LoRA (needs bitsandbytes)
    lora_r: int = 16  # LoRA rank
    # auto: frozen for a pretrained tower, trained for a random-init one. The official code
    # freezes the tower only in SFT and trains it in stages 2-3: --vision trained (the demo's)
    vision: Literal["auto", "frozen", "trained"] = "auto"  # vision tower + projector
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    # auto: trained weights and AdamW states in fp32 (fsdp: bf16 compute), a LoRA base in bf16
    # where the GPU has it (model.stage_dtype); bf16 for full fine-tuning is refused
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights' dtype (auto: see above)
    grad_ckpt: bool = False  # policy gradient checkpointing
    token_budget: int = 32768  # padded tokens per forward (micro-batch size) and rollout chunk
    # image size bounds in pixels: the official runs set none, so verl's image loading applied
    # qwen-vl-utils' defaults, 4 to 16,384 image tokens of 32 x 32 pixels (patch 16, merge 2)
    min_pixels: int = 4096  # smaller images are scaled up to this many pixels
    max_pixels: int = 16777216  # larger images are scaled down to this many pixels
    disc_micro_batch: int = 64  # sequences per discriminator forward
    disc_chunk: int = 0  # prompts whose D graphs are alive at once in D's update (0 = all; real: 1)
    disc_grad_ckpt: bool = False  # discriminator gradient checkpointing (real models: on)
    # auto: under torchrun, fsdp for models of 1B+ parameters (a replica does not fit), else ddp
    dist: Literal["auto", "ddp", "fsdp"] = "auto"  # ddp (replicas) | fsdp (FSDP2 sharding)
    cpu_offload: bool = False  # fsdp only: keep sharded weights and optimizer states in CPU RAM
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # also send metrics.jsonl there


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    # ---- distributed init (torchrun sets RANK / WORLD_SIZE; without them: one process)
    rank, world, device, log = common.start(cfg)
    master = rank == 0
    # the --algo row of rl_losses.ALGOS with overrides, and how the groups spread over the ranks
    algo, layout = rollout.check_config(cfg, world)
    cfg.dist = models.pick_dist(cfg, world, log)  # --dist auto: by model size
    models.check_memory("align", cfg, world, device, log)  # on a GPU: fits, or which flags to add
    log(f"algorithm: {json.dumps({k: getattr(v, '__name__', v) for k, v in algo.items()})}")
    if cfg.disc_chunk < 0:
        raise SystemExit(f"error: --disc_chunk {cfg.disc_chunk}: give a number of prompts, "
                         "or 0 for all of them")

    # ---- data: every prompt carries its teacher reference (text only)
    try:
        if master:
            task.ensure_default([cfg.data, cfg.val_data], log=log)
        common.barrier()  # the other ranks read the files rank 0 may have just written
        rows = data.load_prompts(cfg.data, require_teacher=True, skip_bad_rows=cfg.skip_bad_rows,
                                 log=log)
        val_rows = data.load_prompts(cfg.val_data, skip_bad_rows=cfg.skip_bad_rows, log=log)
        val_rows = val_rows[:cfg.eval_rows]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    log(f"data: {len(rows)} alignment prompts, {len(val_rows)} held-out prompts")

    # ---- models: the policy, and the discriminator (warmed up, or fresh from a backbone)
    model, processor, resume_from = models.load_policy(cfg, device, log)
    # prompts over --max_prompt_len tokens (image tokens included) are dropped and counted, as
    # verl's filter_overlong_prompts: truncating one would cut its question or its image
    rows, dropped = data.drop_long_prompts(rows, processor, cfg.max_prompt_len)
    if dropped:
        log(f"data: {dropped} prompts over --max_prompt_len {cfg.max_prompt_len} tokens skipped")
    if not rows:
        raise SystemExit(f"error: no prompt of {cfg.data} fits in --max_prompt_len "
                         f"{cfg.max_prompt_len} tokens")
    disc_path = os.path.join(resume_from, "discriminator") if resume_from else cfg.disc
    # D's weights: fp32 where they are trained (model.stage_dtype)
    disc_dtype = models.stage_dtype(cfg, trains_all_weights=cfg.disc_train == "full")
    if os.path.isdir(disc_path):
        disc, disc_processor = discriminator.load(disc_path, device, dtype=disc_dtype,
                                                  attn=cfg.attn, meta=models.meta_load(cfg))
    elif disc_path.startswith(("/", ".", "~", "runs")):
        raise SystemExit(f"error: discriminator folder {disc_path} not found; warm one up first: "
                         "python warmup.py --policy runs/sft/final "
                         "--out_dir runs/disc_warmup")
    else:
        log(f"discriminator: none warmed up, building a fresh {cfg.disc_kind} one on {disc_path}")
        try:
            disc, disc_processor = discriminator.build(
                disc_path, device, kind=cfg.disc_kind, seed=cfg.seed, dtype=disc_dtype,
                meta=models.meta_load(cfg), train=cfg.disc_train, bits4=cfg.disc_4bit,
                lora_r=cfg.disc_lora_r)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    models.set_image_size(disc_processor, cfg)  # D sees the images as the policy does
    if cfg.disc_grad_ckpt:
        discriminator.gradient_checkpointing(disc)
    d_total, d_trainable = models.count_params(disc)
    log(f"discriminator: {disc.cfg['kind']}, {disc.cfg['n_experts']} experts "
        f"({d_total / 1e6:.2f}M parameters, {d_trainable / 1e6:.2f}M trainable)")
    # No DDP wrapper: the update calls the model in two pieces (prompt, then completions), which
    # DDP's bookkeeping does not allow, so the updates below reduce the gradients themselves. Under
    # FSDP2 both models are sharded and their gradients reduced in backward: the policy's summed
    # (its loss is divided by global counts), the discriminator's averaged (its loss is per rank).
    if cfg.dist == "fsdp":
        model = models.wrap_distributed(model, device, "fsdp", grads="sum",
                                        cpu_offload=cfg.cpu_offload)
        disc = models.wrap_distributed(disc, device, "fsdp", grads="mean",
                                       cpu_offload=cfg.cpu_offload)

    # ---- optimizers: one per model, separate learning rates, constant (paper)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    disc_params = [p for p in disc.parameters() if p.requires_grad]
    disc_optimizer = torch.optim.AdamW(discriminator.param_groups(disc, cfg.weight_decay),
                                       lr=cfg.disc_lr)
    start_step, cursor = 0, 0
    bad = {"bad_steps": 0, "bad_streak": 0}  # steps skipped for NaN/Inf
    if resume_from:
        state = common.load_trainer_state(resume_from, rank)
        models.load_optimizer_state(model, optimizer, state["optimizer"])
        models.load_optimizer_state(disc, disc_optimizer, state["disc_optimizer"])
        start_step, cursor = state["step"], state["cursor"]
        bad["bad_steps"] = state.get("bad_steps", 0)

    # ----------------------------------------------------------------------------- helpers

    def segments(r):
        """(valid (BN,) bool, captions, reasonings) of the rollouts; invalid ones get empty
        strings (they are never scored: their scores are replaced in the advantage)."""
        split = [data.split_segments(t) for t in r.texts]
        valid = torch.tensor([c is not None for c, _ in split], device="cpu")  # (BN,)
        return valid, [c or "" for c, _ in split], [k or "" for _, k in split]

    def score(r, opened, valid, caps, cots, prompts):
        """D's scores of some prompts' teacher references and their valid rollouts ->
        (mine, {which: (t (prompts,), s (mine,), aux, D's stats)}) for which in cap, cot.
        mine: the indices of those prompts' rollouts; s is 0 where a rollout is invalid (never
        scored). Gradients flow when enabled."""
        mine = torch.nonzero((r.group >= prompts[0]) & (r.group <= prompts[-1])).squeeze(-1)
        v = mine[valid[mine]].tolist()  # only valid rollouts are scored
        out = {}
        for which, key, student in (("cap", "teacher_caption", caps),
                                    ("cot", "teacher_cot", cots)):
            texts = [r.rows[p][key] for p in prompts] + [student[i] for i in v]
            pieces = [opened[p] for p in prompts] + [opened[r.group[i]] for i in v]
            scores, aux = discriminator.score(disc, disc_processor, pieces, texts, which,
                                              cfg.disc_micro_batch)
            s = scores.new_zeros(len(mine))  # (rollouts of these prompts,)
            s[valid[mine]] = scores[len(prompts):]
            out[which] = (scores[:len(prompts)], s, aux, dict(disc.stats))
        return mine, out

    def save_models(path):
        """Both models into one folder (the discriminator in its own subfolder)."""
        models.save_pretrained(model, processor, path)
        discriminator.save(disc, disc_processor, os.path.join(path, "discriminator"))

    # ----------------------------------------------------------------------------- loop
    metrics_path, samples_path = common.open_logs(cfg.out_dir, start_step, master)
    write_metrics = common.metrics_writer(cfg, metrics_path, master)  # + TensorBoard / W&B
    info = common.run_info(cfg)
    from tqdm import tqdm
    if start_step == 0:  # the starting point of the held-out curve (each rank evaluates its share)
        record = {"step": 0}
        evaluate.evaluate_into(record, 0, cfg, model, processor, val_rows, rank, world)
        if master and len(record) > 1:
            write_metrics(record)
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not master, desc="align", mininterval=1 if sys.stderr.isatty() else 30)
    record = {}
    model.train()
    disc.train()
    for step in bar:
        t0 = time.time()
        # ---- 1. rollout: this rank's slice of the shared prompt stream (same cursor everywhere)
        order = rollout.prompt_order(cfg.seed, cursor, cfg.prompts_per_step, len(rows))
        idx = rollout.my_prompts(order, rank, world, layout)
        cursor += cfg.prompts_per_step
        r = rollout.sample(model, processor, [rows[i] for i in idx], layout.rollouts,
                           cfg.max_new_tokens, cfg.temperature, token_budget=cfg.token_budget)
        t_rollout = time.time() - t0
        valid, caps, cots = segments(r)
        B = len(r.rows)
        # each prompt's image is read from disk once, not once per scored segment
        opened = [{**row, "images": [data.open_image(x) for x in row["images"]]}
                  for row in r.rows]
        # any valid rollout on any rank? (decides between the BT loss and the fallback)
        any_valid = common.any_rank(valid.any())

        # ---- 2. score with D as it is before its update (values only: no gradients)
        with torch.no_grad():
            _, sc = score(r, opened, valid, caps, cots, list(range(B)))
        t_cap, s_cap, _, stats_cap = (x.cpu() if torch.is_tensor(x) else x for x in sc["cap"])
        t_cot, s_cot, _, stats_cot = (x.cpu() if torch.is_tensor(x) else x for x in sc["cot"])

        # ---- 3. advantage: perception and reasoning scores, each normalised within the group
        # (BN,); a group split over ranks is normalised with all its rollouts (all_gather)
        advantages = rollout.global_advantages(
            lambda cap, cot, ok, g: rl_losses.prism_advantages(cap, cot, ok.bool(), g, cfg.alpha,
                                                               cfg.format_penalty),
            r.group, rank, world, layout, s_cap, s_cot, valid)
        # NaN/Inf raw scores (guard() set them to 0, so the advantages look fine) or advantages
        # on any rank: neither model is updated this step (every rank skips the same collectives)
        why = ", ".join(w for w in (
            "discriminator scores" if stats_cap["nonfinite"] + stats_cot["nonfinite"] else "",
            common.nonfinite(advantages=advantages)) if w)
        skip = common.any_rank(why)

        # ---- 4. update D on the same batch: Bradley-Terry, teacher above student, over valid
        # rollouts (rl_losses.disc_loss). The gradient is accumulated --disc_chunk prompts at a
        # time (0: all at once): each chunk's backward frees its graph, so only one chunk's
        # activations are alive; the chunks' losses add up to the batch's (n_valid / n_rows).
        d_stats = {}
        chunk = cfg.disc_chunk if cfg.disc_chunk and any_valid else B  # the fallback needs all
        for _ in range(0 if skip else cfg.disc_steps):
            d_loss = 0.0
            for c in range(0, B, chunk):  # every rank holds the same number B of prompts
                prompts = list(range(c, min(c + chunk, B)))
                mine, sc = score(r, opened, valid, caps, cots, prompts)  # with gradients
                (t_c, s_c, aux_c, _), (t_t, s_t, aux_t, _) = sc["cap"], sc["cot"]
                g = (r.group[mine] - c).to(t_c.device)  # each rollout's prompt within the chunk
                loss, _ = rl_losses.disc_loss(t_c[g], t_t[g], s_c, s_t, valid[mine].to(t_c.device),
                                              cfg.score_reg, cfg.fallback, any_valid,
                                              n_valid=int(valid.sum()), n_rows=len(r))
                # + the MoE load-balancing term, a mean over chunks
                (loss + cfg.aux_coef * (aux_c + aux_t) / 2 * len(prompts) / B).backward()
                d_loss += loss.item()
            # D is not DDP-wrapped: average its gradients over ranks (each scored other rollouts)
            common.all_reduce_grads(disc_params, average=True)
            d_norm = common.clip_grad_norm(disc_params, cfg.grad_clip)
            # a NaN/Inf loss (any rank) or gradient norm (global) skips the step on every rank
            d_ok = not common.any_rank(not math.isfinite(d_loss)) and torch.isfinite(d_norm)
            if d_ok:
                disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
            d_stats = {"disc_loss": d_loss, "disc_grad_norm": d_norm.item()}
            if not d_ok:  # a NaN/Inf D step also skips the policy's
                skip, why = True, "discriminator loss or gradients"
                break

        # ---- 5. policy update: --ppo_epochs passes x --mini_batches optimizer steps, each the sum
        # of its micro-batches' losses divided by the step's global token / sequence counts
        updates, skipped = [], 0
        every = torch.arange(len(r), device="cpu")
        for mb in [] if skip else rollout.update_batches(every, cfg.ppo_epochs, cfg.mini_batches):
            tokens, seqs, bad_input = rollout.step_counts(r, mb, advantages)
            if bad_input:  # NaN/Inf advantages or log-probs on some rank: all ranks skip
                skipped += 1
                continue
            stats = {"loss": 0.0}
            for micro, real in rollout.micro_batches(mb, r, cfg.token_budget):
                logp = rollout.completion_logprobs(model, r, micro, cfg.temperature)  # (b, T)
                on = logp.device
                loss, m = rl_losses.policy_loss(
                    logp, r.logp[micro].to(on), advantages[micro].to(on), r.mask[micro].to(on),
                    algo, budget=cfg.max_new_tokens, step_tokens=tokens, step_seqs=seqs)
                (loss * real).backward()  # a padding copy (FSDP keeps ranks in step) adds 0
                if real:  # metrics weighted by the micro-batch's share of the step's tokens
                    share = r.mask[micro].sum().item() / max(r.mask[mb].sum().item(), 1.0)
                    stats["loss"] += loss.item()
                    for k, v in m.items():
                        stats[k] = stats.get(k, 0.0) + v * share
            grad_norm = rollout.finish_step(params, optimizer, stats["loss"], cfg.grad_clip)
            if grad_norm is None:  # NaN/Inf loss or gradient: the step was not taken
                skipped += 1
            else:
                updates.append({**stats, "grad_norm": grad_norm})
        stats = ({k: sum(u[k] for u in updates) / len(updates) for k in updates[0]} if updates
                 else {})
        if skipped:
            skip, why = True, "policy loss or gradients"
        why = (why or "scores or advantages on another rank") if skip else ""
        common.count_bad_step(bad, why, step + 1, log)

        # ---- 6. log. Gaps and accuracies are from the pre-update scores (what the advantage used);
        # each rank scored its own rollouts, the logged numbers are global means
        g, v = r.group, valid
        acc = torch.tensor([data.reward(t, r.rows[k]["ground_truth"])["acc"]
                            for t, k in zip(r.texts, r.group.tolist())], device="cpu")  # (BN,)
        sums = common.sum_over_ranks({
            "loss": stats.get("loss", math.nan),  # each rank's share of the step's loss
            "gap_cap": ((t_cap[g] - s_cap) * v).sum(),
            "gap_cot": ((t_cot[g] - s_cot) * v).sum(),
            "disc_acc_cap": ((t_cap[g] > s_cap) & v).sum(),
            "disc_acc_cot": ((t_cot[g] > s_cot) & v).sum(),
            "valid": v.sum(),
            "rollouts": len(r),
            "length": r.lengths.sum(),
            "acc": acc.sum(),
            "t_cap": t_cap.mean(),
            "t_cot": t_cot.mean(),
            "s_cap": (s_cap * v).sum(),
            "s_cot": (s_cot * v).sum(),
        })
        nv, n = max(sums["valid"], 1.0), sums["rollouts"]
        dt = time.time() - t0
        record = {
            "step": step + 1,
            "loss": round(sums["loss"], 5),
            "gap_cap": round(sums["gap_cap"] / nv, 4),
            "gap_cot": round(sums["gap_cot"] / nv, 4),
            "disc_acc_cap": round(sums["disc_acc_cap"] / nv, 4),
            "disc_acc_cot": round(sums["disc_acc_cot"] / nv, 4),
            "format_rate": round(sums["valid"] / n, 4),
            "response_len": round(sums["length"] / n, 1),
            "acc_mean": round(sums["acc"] / n, 4),
            "t_cap": round(sums["t_cap"] / world, 3),
            "t_cot": round(sums["t_cot"] / world, 3),
            "s_cap": round(sums["s_cap"] / nv, 3),
            "s_cot": round(sums["s_cot"] / nv, 3),
            "adv_std": round(advantages.std().item(), 4),
            "disc_loss": round(d_stats.get("disc_loss", math.nan), 5),
            "disc_grad_norm": round(d_stats.get("disc_grad_norm", math.nan), 4),
            "disc_fallback": int(not any_valid),  # no valid rollout on any rank: the fallback loss
            "bad_steps": bad["bad_steps"],
            "clip_frac": round(stats.get("clip_frac", 0.0), 4),
            "grad_norm": round(stats.get("grad_norm", math.nan), 4),
            "router_load_cap": [round(x, 3) for x in stats_cap["load"]],
            "router_load_cot": [round(x, 3) for x in stats_cot["load"]],
            "tokens_per_s": round(sums["length"] / dt, 1),
            "rollout_s": round(t_rollout, 3),
            "step_s": round(dt, 3),
            "peak_mem_mb": round(common.peak_memory_mb(device), 1),
        }
        last_step = step + 1 == cfg.steps
        evaluate.evaluate_into(record, step + 1, cfg, model, processor, val_rows, rank, world)
        if master:
            write_metrics(record)
            if cfg.samples_every and (step + 1) % cfg.samples_every == 0:
                for i in range(0, len(r), layout.rollouts)[:2]:  # the first of two groups
                    k = r.group[i]
                    common.append_jsonl(samples_path, {
                        "step": step + 1,
                        "prompt": r.rows[k]["messages"][-1]["content"],
                        "response": r.texts[i],
                        "teacher": r.rows[k]["teacher_response"],
                        "valid": bool(valid[i]),
                        "s_cap": s_cap[i].item(),
                        "s_cot": s_cot[i].item(),
                        "t_cap": t_cap[k].item(),
                        "t_cot": t_cot[k].item(),
                        "advantage": advantages[i].item(),
                    })
            bar.set_postfix(gap_cap=f"{record['gap_cap']:.2f}", gap_cot=f"{record['gap_cot']:.2f}",
                            fmt=f"{record['format_rate']:.2f}", refresh=False)

        # ---- checkpoint: both models and both optimizers, atomically together (never on a
        # skipped step, nor after too many of them in a row)
        common.stop_if_diverged(bad, cfg.max_bad_steps, step + 1, cfg.out_dir)
        if ((cfg.save_every and (step + 1) % cfg.save_every == 0) or last_step) and not why:
            common.save_checkpoint(cfg.out_dir, step + 1, save_models, {
                "optimizer": models.optimizer_state(model, optimizer),
                "disc_optimizer": models.optimizer_state(disc, disc_optimizer),
                "step": step + 1,
                "cursor": cursor,
                "bad_steps": bad["bad_steps"],
            }, info, rank)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            log(f"stopping after step {step + 1} (--stop_after); continue with --resume")
            return

    # ---- save
    log(f"saved {common.save_final(cfg.out_dir, save_models, info)}")
    if master:
        log(evaluate.start_end_table(metrics_path, record,
                                     f"{cfg.val_data}, {len(val_rows)} prompts", "after alignment"))
    common.finish()


if __name__ == "__main__":
    main()
