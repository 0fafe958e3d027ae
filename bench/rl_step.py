"""Benchmark: seconds per RL step of rlvr.py on the embedded tiny model, the workload of the peer
comparison in docs/speed.md (TRL GRPOTrainer: about 0.6 s per step on this 2-core CPU).

Workload: the random-weight `tiny-random` Qwen3-VL (0.79M parameters), 64x64 images, fp32,
4 prompts x 8
rollouts x up to 64 new tokens at temperature 1, GRPO, one optimizer step per batch of rollouts.
A random policy rarely emits <|im_end|>, so nearly every rollout runs the full 64 tokens: the worst
case of "up to 64".

It runs the real thing: `rlvr.main` for --steps steps, then reads rlvr's own per-step timings from
metrics.jsonl, skipping the first --warmup steps (allocator and thread-pool warm-up) and the last
(it includes the final evaluation). Run on an otherwise idle machine:
    python bench/rl_step.py                    # ~40 steps, about a minute
    python bench/rl_step.py --steps 80 --threads 2
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="RL steps to run (timed: all but the warm-up and the last)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--algo", default="grpo", help="grpo | dapo | gspo")
    ap.add_argument("--model", default="tiny-random",
                    help="model to benchmark (tiny-random = the peer's workload)")
    args = ap.parse_args()
    import torch

    import rlvr
    import task
    with tempfile.TemporaryDirectory() as tmp:
        task.write_dataset(f"{tmp}/data", seed=0, n_sft_public=1, n_sft_teacher=1, n_align=1, n_rl=256, n_val=4,
                           n_test=1, image_size=64)
        settings = ["--model", args.model, "--algo", args.algo, "--data", f"{tmp}/data/rl_prompts.parquet",
                    "--val_data", f"{tmp}/data/val.parquet", "--out_dir", f"{tmp}/run", "--steps", str(args.steps),
                    "--prompts_per_step", "4", "--group_size", "8", "--max_new_tokens", "64", "--temperature", "1.0",
                    "--eval_rows", "4", "--eval_every", "0", "--save_every", "0", "--samples_every", "0",
                    "--threads", str(args.threads), "--dynamic_sampling", "off", "--overlong_buffer", "0"]
        rlvr.main(settings)
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    timed = [r for r in rows if r["step"] > args.warmup and r["step"] < args.steps and "step_s" in r]
    step_s = [r["step_s"] for r in timed]
    rollout_s = [r["rollout_s"] for r in timed]
    tokens = sum(r["response_len"] * 32 for r in timed)
    print(f"\nbench/rl_step.py  torch {torch.__version__}, {args.threads} threads, model {args.model}, {args.algo}, "
          f"4 prompts x 8 rollouts x <=64 tokens, 64x64 images, fp32, steps {args.warmup + 1}..{args.steps - 1}")
    print(f"| seconds per step (mean / median) | {statistics.mean(step_s):.3f} / {statistics.median(step_s):.3f} |")
    print(f"| of which rollout (mean) | {statistics.mean(rollout_s):.3f} |")
    print(f"| update, reward and logging (mean) | {statistics.mean(step_s) - statistics.mean(rollout_s):.3f} |")
    print(f"| rollout tokens per second (whole step) | {tokens / sum(step_s):.0f} |")
    print(f"| mean response length (tokens) | {statistics.mean(r['response_len'] for r in timed):.1f} |")
    print(f"| peak memory (MB, max RSS) | {max(r['peak_mem_mb'] for r in timed):.0f} |")


if __name__ == "__main__":
    main()
