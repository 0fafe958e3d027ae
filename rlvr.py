"""Stage 3 of PRISM: reinforcement learning with verifiable rewards (RLVR): GRPO, DAPO, GSPO,
Dr. GRPO or CISPO (a row of rl_losses.ALGOS each; adding one is one function and one row).

What it does: samples N answers per prompt from the policy, scores each with the rule-based reward
(docs/algorithms.md#response-format-and-reward: format-invalid 0, else 0.8 * correct + 0.2),
turns rewards into advantages within each prompt's group, and takes policy-gradient steps
(rl_losses.py holds every formula, with its paper).

One step, in order:
  1. rollout     B prompts x N samples (rollout.sample: prefill once per prompt, our own decoding)
  2. reward      data.reward per rollout; DAPO adds the overlong penalty
  3. filter      DAPO dynamic sampling: drop groups whose accuracies are all equal (they carry no
                 signal) and draw more prompts, at most --max_extra_rounds times
  4. advantage   A_i = (r_i - mean_group) / (std_group + 1e-6)   (Dr. GRPO: no std)
  5. update      --ppo_epochs x --mini_batches optimizer steps of the loss of --algo, written out
                 in the loop below: log-probs -> loss -> backward -> optimizer step
  6. log, evaluate, checkpoint
Where we differ from the paper (PRISM's verl runs; docs/algorithms.md#reference-hyperparameters):
  - the old log-probs are the ones recorded while sampling (rollout.py explains why that is exact);
    verl recomputes them with a second forward pass.
  - the tiny embedded model gets its own defaults: lr 3e-5 (paper: 1e-6), 8 prompts x 8 samples per
    step (paper: 32 x 16), 128 new tokens (paper: 8192). The lr is constant, as in the paper. At
    lr 1e-4 the greedy held-out accuracy fell from 0.625 to 0.51 within 400 steps; 3e-5 held it.
  - the difficulty filter (--difficulty_filter) estimates pass rates with the starting policy and
    keeps prompts with 0 < p < 1, as the paper did with its aligned policy; off by default because
    the tiny task is small enough that most prompts qualify.
  - "Why is my loss 0?": with --ppo_epochs 1 --mini_batches 1 (the default and PRISM's setting)
    every ratio is exactly 1, so the loss value is about -mean(A) ~ 0 while the gradient is not.
    Watch grad_norm, reward and val_acc instead (see rl_losses.py).

Run it:
  CPU, embedded tiny model, from the SFT checkpoint (400 steps: 10.5 min measured with 3 jobs
  sharing 2 cores):
      python rlvr.py --model runs/sft/final --algo grpo
  one GPU, QLoRA on a real model:
      python rlvr.py --model Qwen3-VL-4B --qlora --grad_ckpt --data rl.parquet \\
          --val_data val.parquet --lr 1e-6 --prompts_per_step 32 --group_size 16 \\
          --max_new_tokens 8192 --token_budget 32768
  one node, 8 processes, FSDP2 (each rank samples prompts_per_step / 8 prompts):
      torchrun --nproc_per_node=8 rlvr.py --model runs/align/final --dist fsdp --algo dapo \\
          --data rl.parquet ...
The result is out_dir/final, a Hugging Face folder.
"""
import dataclasses
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
import evaluate
import model as models
import rl_losses
import rollout
import task


# ----------------------------------------------------------------------------- config
AGG = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclass
class Config:
    # ---- the algorithm: a row of rl_losses.ALGOS; the knobs below override that row (None = keep)
    algo: str = "grpo"  # grpo | dapo | gspo | drgrpo | cispo, or a row you add to rl_losses.ALGOS
    eps_low: float | None = None  # lower clip range (ALGOS: 0.2; gspo 3e-4; cispo 1 = none)
    eps_high: float | None = None  # upper clip range (ALGOS: 0.2; dapo, cispo 0.28; gspo 4e-4)
    agg: AGG | None = None  # loss aggregation (ALGOS: seq-mean-token-mean; dapo, cispo token-mean)
    dynamic_sampling: bool | None = None  # drop all-equal groups, sample more (ALGOS: dapo only)
    overlong_buffer: float | None = None  # DAPO length penalty: last budget fraction (0 = off)
    kl_coef: float = 0.0  # KL penalty to the starting policy (PRISM: 0); k3 estimator
    # ---- the RL loop
    model: str = "runs/sft/final"  # start policy: checkpoint, tiny | small, Qwen3-VL-4B, hub id
    data: str = "data/tiny/rl_prompts.parquet"  # RL prompts (verl parquet / JSONL), ground truths
    val_data: str = "data/tiny/val.parquet"  # held-out prompts for greedy evaluation
    out_dir: str = "runs/rlvr"  # checkpoints, metrics.jsonl, samples.jsonl, final model
    seed: int = 0  # seed for prompt order and sampling (each rank adds its rank)
    steps: int = 400  # RL steps (one batch of rollouts each)
    prompts_per_step: int = 8  # prompts per step, summed over ranks (paper: 32)
    group_size: int = 8  # rollouts per prompt, N (paper: 16)
    max_new_tokens: int = 128  # response budget (paper: 8192)
    max_prompt_len: int = 2048  # longer prompts, image tokens included, are skipped (paper: 2048)
    temperature: float = 1.0  # sampling temperature; the loss uses the same one
    top_p: float = 1.0  # nucleus sampling (1 = off)
    lr: float = 3e-5  # constant learning rate (paper, real models: 1e-6)
    weight_decay: float = 0.01  # AdamW weight decay (paper: 0.01)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    ppo_epochs: int = 1  # passes over each batch of rollouts (>1: off-policy, clipping matters)
    mini_batches: int = 1  # optimizer steps per pass (>1: off-policy after the first)
    max_extra_rounds: int = 3  # dynamic sampling: extra generation rounds per step to refill
    difficulty_filter: bool = False  # keep prompts whose pass rate at the start is in (0, 1)
    filter_samples: int = 8  # samples per prompt when estimating pass rates
    # ---- evaluation, logging, checkpoints
    eval_every: int = 100  # held-out evaluation every this many steps and at the end (0 = end only)
    eval_rows: int = 200  # held-out prompts per evaluation (0 = no held-out evaluation at all)
    eval_batch_size: int = 64  # prompts per generate call in evaluation
    eval_k: int = 4  # also sample this many answers per held-out prompt at T=1 (val_acc_k; 0 = off)
    samples_every: int = 10  # write a few rollouts to samples.jsonl every this many steps
    save_every: int = 50  # checkpoint every this many steps
    resume: bool = False  # continue from out_dir's latest checkpoint
    stop_after: int = 0  # stop after this step without the final save, as if interrupted (0 = off)
    skip_bad_rows: bool = False  # skip (and count) malformed data rows instead of stopping
    max_bad_steps: int = 5  # stop after this many skipped NaN/Inf steps in a row (0 = never)
    # ---- model and system
    lora: bool = False  # train LoRA adapters instead of all weights (KL reference: the base)
    qlora: bool = False  # 4-bit base weights + LoRA (needs bitsandbytes)
    lora_r: int = 16  # LoRA rank
    # auto: frozen for a pretrained tower, trained for a random-init one. The official code
    # freezes the tower only in SFT and trains it in stages 2-3: --vision trained (the demo's)
    vision: Literal["auto", "frozen", "trained"] = "auto"  # vision tower + projector
    attn: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # attention kernel
    # auto: trained weights and AdamW states in fp32 (fsdp: bf16 compute), a LoRA base in bf16
    # where the GPU has it (model.stage_dtype); bf16 for full fine-tuning is refused
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # weights' dtype (auto: see above)
    grad_ckpt: bool = False  # gradient checkpointing
    token_budget: int = 32768  # padded tokens per forward (micro-batch size) and rollout chunk
    # image size bounds in pixels: the official runs set none, so verl's image loading applied
    # qwen-vl-utils' defaults, 4 to 16,384 image tokens of 32 x 32 pixels (patch 16, merge 2)
    min_pixels: int = 4096  # smaller images are scaled up to this many pixels
    max_pixels: int = 16777216  # larger images are scaled down to this many pixels
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
    models.check_memory("rlvr", cfg, world, device, log)  # on a GPU: fits, or which flags to add
    log(f"algorithm: {json.dumps({k: getattr(v, '__name__', v) for k, v in algo.items()})}")
    buffer = int(algo["overlong_buffer"] * cfg.max_new_tokens)  # DAPO's length penalty, in tokens

    # ---- data
    try:
        if master:
            task.ensure_default([cfg.data, cfg.val_data], log=log)
        common.barrier()  # the other ranks read the files rank 0 may have just written
        rows = data.load_prompts(cfg.data, skip_bad_rows=cfg.skip_bad_rows, log=log)
        val_rows = data.load_prompts(cfg.val_data, skip_bad_rows=cfg.skip_bad_rows, log=log)
        val_rows = val_rows[:cfg.eval_rows]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")

    # ---- model
    model, processor, resume_from = models.load_policy(cfg, device, log)
    # prompts over --max_prompt_len tokens (image tokens included) are dropped and counted, as
    # verl's filter_overlong_prompts: truncating one would cut its question or its image
    rows, dropped = data.drop_long_prompts(rows, processor, cfg.max_prompt_len)
    if dropped:
        log(f"data: {dropped} prompts over --max_prompt_len {cfg.max_prompt_len} tokens skipped")
    if not rows:
        raise SystemExit(f"error: no prompt of {cfg.data} fits in --max_prompt_len "
                         f"{cfg.max_prompt_len} tokens")
    reference = None
    if cfg.kl_coef > 0 and not (cfg.lora or cfg.qlora):
        # a frozen copy of the starting policy; with LoRA, the base under the adapter is it
        reference, _, _ = models.load_model(cfg.model, device, dtype=cfg.dtype, attn=cfg.attn,
                                            seed=cfg.seed)
        reference.requires_grad_(False).eval()

    # The difficulty filter (docs/algorithms.md#difficulty-filter): pass rates under the starting
    # policy, written once to a file the run (and any resume of it) then reads.
    filter_file = os.path.join(cfg.out_dir, "difficulty_filter.json")
    if cfg.difficulty_filter:
        if not os.path.exists(filter_file):
            mine = list(range(rank, len(rows), world))
            rates = rollout.pass_rates(model, processor, [rows[i] for i in mine],
                                       cfg.filter_samples, cfg.max_new_tokens, cfg.temperature,
                                       cfg.token_budget)
            every = [0.0] * len(rows)
            for i, p in zip(mine, rates):
                every[i] = p
            # all_reduce of a dense vector: each rank estimated a different slice of the prompts
            dense = common.all_reduce_sum(torch.tensor(every, device="cpu"))
            if master:
                common.write_json_atomic(filter_file, {"data": cfg.data,
                                                       "samples": cfg.filter_samples,
                                                       "pass_rates": dense.tolist()})
            common.barrier()  # everyone reads the file rank 0 wrote
        rates = json.load(open(filter_file))["pass_rates"]
        kept = [r for r, p in zip(rows, rates) if 0 < p < 1]
        log(f"difficulty filter: kept {len(kept)} of {len(rows)} prompts with 0 < pass rate < 1 "
            f"({filter_file})")
        if not kept:
            raise SystemExit("error: the difficulty filter kept no prompt "
                             "(all pass rates are 0 or 1)")
        rows = kept
    log(f"data: {len(rows)} RL prompts, {len(val_rows)} held-out prompts")
    # No DDP wrapper: the update calls the model in two pieces (prompt, then completions), which
    # DDP's bookkeeping does not allow; the update below sums the gradients over ranks itself.
    if cfg.dist == "fsdp":  # FSDP2 sums the gradients over ranks in backward instead
        model = models.wrap_distributed(model, device, "fsdp", grads="sum",
                                        cpu_offload=cfg.cpu_offload)

    # ---- optimizer: AdamW at a constant lr (paper), no weight decay on norms and biases
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)
    start_step, cursor = 0, 0
    bad = {"bad_steps": 0, "bad_streak": 0}  # steps skipped for NaN/Inf
    if resume_from:
        state = common.load_trainer_state(resume_from, rank)
        models.load_optimizer_state(model, optimizer, state["optimizer"])
        start_step, cursor = state["step"], state["cursor"]
        bad["bad_steps"] = state.get("bad_steps", 0)

    # ----------------------------------------------------------------------------- helpers

    def ref_logprobs(r, idx):
        """Reference policy log-probs for the KL term: the disabled adapter, or the frozen copy."""
        with torch.no_grad():
            if reference is not None:
                return rollout.completion_logprobs(reference, r, idx, cfg.temperature)
            with models.unwrap(model).disable_adapter():
                return rollout.completion_logprobs(model, r, idx, cfg.temperature)

    def rewards_of(r):
        """(BN,) reward, accuracy and format of each rollout; DAPO adds the overlong penalty."""
        scored = [data.reward(t, r.rows[g]["ground_truth"])
                  for t, g in zip(r.texts, r.group.tolist())]
        reward = torch.tensor([s["score"] for s in scored], device="cpu")  # (BN,)
        if buffer:
            reward = reward + rl_losses.overlong_penalty(r.lengths, cfg.max_new_tokens, buffer)
        return (reward, torch.tensor([s["acc"] for s in scored], device="cpu"),
                torch.tensor([s["format"] for s in scored], device="cpu"))

    def collect(cursor):
        """This step's rollouts on this rank -> (rollouts, kept groups, rewards, accs, formats,
        cursor, rounds). Every round takes prompts_per_step prompts from the shared stream (this
        rank takes its share), so the cursor stays identical on every rank."""
        got, rounds = [], 0
        while True:
            order = rollout.prompt_order(cfg.seed, cursor, cfg.prompts_per_step, len(rows))
            idx = rollout.my_prompts(order, rank, world, layout)
            cursor += cfg.prompts_per_step
            r = rollout.sample(model, processor, [rows[i] for i in idx], layout.rollouts,
                               cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.token_budget)
            reward, acc, fmt = rewards_of(r)
            if algo["dynamic_sampling"]:
                keep = rl_losses.dynamic_sampling_keep(acc, r.group)  # (BN,)
            else:
                keep = torch.ones(len(r), dtype=torch.bool, device="cpu")
            got.append((r, keep, reward, acc, fmt))
            rounds += 1
            kept_groups = sum(int(k.sum()) // layout.rollouts for _, k, *_ in got)
            # all ranks do the same number of rounds (all_reduce): a round is collective-free, but
            # the update that follows is not, and the shared cursor must advance the same everywhere
            short = common.any_rank(kept_groups < layout.prompts)
            if not algo["dynamic_sampling"] or not short or rounds > cfg.max_extra_rounds:
                return got, cursor, rounds

    def save_model(path):
        models.save_pretrained(model, processor, path)

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
               disable=not master, desc=f"rlvr-{cfg.algo}",
               mininterval=1 if sys.stderr.isatty() else 30)
    record = {}
    model.train()
    for step in bar:
        t0 = time.time()
        # ---- 1-3. rollout, reward, dynamic sampling
        got, cursor, rounds = collect(cursor)
        t_rollout = time.time() - t0
        # one batch from all rounds; the kept groups come first in sampling order, and at most
        # layout.prompts of them are trained on (DAPO drops the extras)
        r = rollout.concat([g[0] for g in got])
        keep, reward, acc, fmt = (torch.cat([g[i] for g in got]) for i in range(1, 5))  # (BN,)
        idx = torch.nonzero(keep).squeeze(-1)[:layout.prompts * layout.rollouts]  # (kept,)

        # ---- 4. advantage: each rollout's reward against its group's (GRPO; Dr. GRPO: no std)
        # (BN,); a group split over ranks is normalised with all its rollouts (all_gather)
        advantages = rollout.global_advantages(
            lambda rw, g: rl_losses.group_advantages(rw, g, algo["norm_std"]),
            r.group, rank, world, layout, reward)
        empty = len(idx) < cfg.mini_batches
        train = r  # the rollouts the update sees
        if empty:
            # nothing informative this step: keep the collectives in step (every rank must run the
            # same backward calls) on the whole batch with zero advantages and no token counted,
            # so this rank adds nothing to the gradient nor to the step's token count (which would
            # shrink the other ranks' gradients)
            idx = torch.arange(len(r), device="cpu")
            advantages.zero_()
            train = dataclasses.replace(r, mask=torch.zeros_like(r.mask))

        # ---- 5. policy update: --ppo_epochs passes x --mini_batches optimizer steps. Each step's
        # loss is the sum of its micro-batches' losses, each divided by the whole step's token /
        # sequence counts over all ranks, so the gradient is exactly one big batch's.
        updates, skipped = [], 0
        for mb in rollout.update_batches(idx, cfg.ppo_epochs, cfg.mini_batches):
            tokens, seqs, bad_input = rollout.step_counts(train, mb, advantages)
            if bad_input:  # NaN/Inf advantages or log-probs on some rank: all ranks skip
                skipped += 1
                continue
            stats = {"loss": 0.0}
            for micro, real in rollout.micro_batches(mb, train, cfg.token_budget):
                logp = rollout.completion_logprobs(model, train, micro, cfg.temperature)  # (b, T)
                on = logp.device
                ref = ref_logprobs(train, micro).to(on) if cfg.kl_coef else None
                loss, m = rl_losses.policy_loss(
                    logp, train.logp[micro].to(on), advantages[micro].to(on),
                    train.mask[micro].to(on),
                    algo, budget=cfg.max_new_tokens, step_tokens=tokens, step_seqs=seqs,
                    kl_coef=cfg.kl_coef, ref_logp=ref)
                (loss * real).backward()  # a padding copy (FSDP keeps ranks in step) adds 0
                if real:  # metrics weighted by the micro-batch's share of the step's tokens
                    share = train.mask[micro].sum().item() / max(train.mask[mb].sum().item(), 1.0)
                    stats["loss"] += loss.item()
                    for k, v in m.items():
                        stats[k] = stats.get(k, 0.0) + v * share
            grad_norm = rollout.finish_step(params, optimizer, stats["loss"], cfg.grad_clip)
            if grad_norm is None:  # NaN/Inf loss or gradient: the step was not taken
                skipped += 1
            else:
                updates.append({**stats, "grad_norm": grad_norm})
        stats = ({k: sum(u[k] for u in updates) / len(updates) for k in updates[0]} if updates
                 else {"loss": math.nan, "grad_norm": math.nan})
        # NaN/Inf rewards or advantages (a broken reward function), or a NaN/Inf loss or gradient
        # (a diverging model): those updates were skipped on every rank; count and warn
        why = ""
        if skipped:
            why = (common.nonfinite(rewards=reward[idx], advantages=advantages[idx])
                   or "loss or gradients")
        common.count_bad_step(bad, why, step + 1, log)

        # ---- 6. log: rollout statistics summed over ranks (each rank sampled its own).
        # zero_adv: trained rollouts of all-equal groups (advantage 0: no signal)
        sums = common.sum_over_ranks({
            "loss": stats["loss"],  # each rank's share of the step's loss (global counts)
            "reward": reward.sum(),
            "acc": acc.sum(),
            "format": fmt.sum(),
            "length": r.lengths.sum(),
            "truncated": r.truncated.sum(),
            "rollouts": len(r),
            "trained": 0.0 if empty else len(idx),
            "zero_adv": 0.0 if empty else (advantages[idx] == 0).sum(),
        })
        n = sums["rollouts"]
        dt = time.time() - t0
        record = {
            "step": step + 1,
            "loss": round(sums["loss"], 5),
            "reward_mean": round(sums["reward"] / n, 4),
            "acc_mean": round(sums["acc"] / n, 4),
            "format_rate": round(sums["format"] / n, 4),
            "clip_frac": round(stats.get("clip_frac", 0.0), 4),
            "ratio_mean": round(stats.get("ratio_mean", 1.0), 4),
            "grad_norm": round(stats["grad_norm"], 4),
            "response_len": round(sums["length"] / n, 1),
            "truncated_frac": round(sums["truncated"] / n, 3),
            "kept_frac": round(sums["trained"] / n, 3),
            "zero_adv_frac": round(sums["zero_adv"] / max(sums["trained"], 1), 3),
            "bad_steps": bad["bad_steps"],
            "gen_rounds": rounds,
            "tokens_per_s": round(sums["length"] / dt, 1),
            "rollout_s": round(t_rollout, 3),
            "step_s": round(dt, 3),
            "peak_mem_mb": round(common.peak_memory_mb(device), 1),
            "lr": cfg.lr,
        }
        if cfg.kl_coef:
            record["kl"] = round(stats.get("kl", 0.0), 5)
        last_step = step + 1 == cfg.steps
        evaluate.evaluate_into(record, step + 1, cfg, model, processor, val_rows, rank, world)
        if master:
            write_metrics(record)
            if cfg.samples_every and (step + 1) % cfg.samples_every == 0:
                for i in range(0, len(r), layout.rollouts)[:2]:  # the first of two groups
                    row = r.rows[r.group[i]]
                    common.append_jsonl(samples_path, {
                        "step": step + 1,
                        "prompt": row["messages"][-1]["content"],
                        "response": r.texts[i],
                        "ground_truth": row["ground_truth"],
                        "reward": reward[i].item(),
                        "advantage": advantages[i].item(),
                    })
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['acc_mean']:.3f}",
                            len=f"{record['response_len']:.0f}", refresh=False)

        # ---- checkpoint (never on a skipped step, nor after too many of them in a row)
        common.stop_if_diverged(bad, cfg.max_bad_steps, step + 1, cfg.out_dir)
        if ((cfg.save_every and (step + 1) % cfg.save_every == 0) or last_step) and not why:
            common.save_checkpoint(cfg.out_dir, step + 1, save_model, {
                "optimizer": models.optimizer_state(model, optimizer),
                "step": step + 1,
                "cursor": cursor,
                "bad_steps": bad["bad_steps"],
            }, info, rank)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            log(f"stopping after step {step + 1} (--stop_after); continue with --resume")
            return

    # ---- save
    log(f"saved {common.save_final(cfg.out_dir, save_model, info)}")
    if master:
        where = f"{cfg.val_data}, {len(val_rows)} prompts"
        log(evaluate.start_end_table(metrics_path, record, where, f"after {cfg.algo}"))
    common.finish()


if __name__ == "__main__":
    main()
