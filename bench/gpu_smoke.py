"""GPU smoke test: one step of every stage in every setting a GPU user runs, in a few minutes.

NOT YET RUN ON A GPU. The project's machines have none; what has run is the CPU dry run below
(in the test suite) and the simulations of tests/test_gpu_sim.py. On the first machine with a
CUDA GPU, run this before anything else and report its table:

    make setup && .venv/bin/python bench/gpu_smoke.py        # needs no network
    .venv/bin/python bench/gpu_smoke.py --cpu                # the CPU dry run (tests run it)

What a GPU run covers, each a separate process on a fresh synthetic task (images of several sizes
in one batch), on the embedded `tiny` model and the real-vocabulary Qwen3-VL stand-in `proxy`
(proxy.py):
  single GPU, sdpa           sft, discriminator warm-up, align, rlvr, evaluate (full fine-tuning
                             keeps fp32 weights: model.stage_dtype)
  --lora in bf16, --qlora    sft, align, rlvr (bitsandbytes' CUDA kernels for --qlora)
  torchrun, 1 and N GPUs     --dist fsdp and --dist ddp for sft, align, rlvr (N = all GPUs)
  flash-attn                 sft, align, rlvr with --attn flash_attention_2 where the package
                             imports (otherwise one "skipped" line)
It prints one table (stage, setting, ok / FAIL, s/step, peak memory) and exits 1 on any failure;
a failure's last lines of output follow the table. --cpu runs the single-process stages on the
proxy in fp32 plus one 2-process FSDP alignment (gloo), which is what the test suite checks.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_task(out):
    """A small task whose images come in three sizes (each gets its own grid of patches)."""
    sys.path.insert(0, ROOT)
    import task
    from PIL import Image
    task.write_dataset(out, seed=0, n_sft_public=8, n_sft_teacher=8, n_align=8, n_rl=8, n_val=4,
                       n_test=4)
    # warm-up pairs in the official JSONL format: a random policy never writes a valid answer, so
    # the student side is the teacher's answer with one object miscounted
    import data
    with open(os.path.join(out, "warmup_pairs.jsonl"), "w") as f:
        for row in data.load_prompts(os.path.join(out, "align_prompts.parquet")):
            caption = row["teacher_caption"].replace("- objects: 1 ", "- objects: 2 ", 1)
            f.write(json.dumps({"prompt": row["extra_info"]["question"], "image": row["images"][0],
                                "teacher_caption": row["teacher_caption"],
                                "teacher_cot": row["teacher_cot"], "student_caption": caption,
                                "student_cot": row["teacher_cot"].replace("<answer>", "<answer>9")})
                    + "\n")
    images = sorted(os.listdir(os.path.join(out, "images")))
    for i, name in enumerate(images):
        size = [None, (160, 96), (128, 224)][i % 3]
        if size:
            path = os.path.join(out, "images", name)
            Image.open(path).convert("RGB").resize(size).save(path)


def commands(model, data, work, setting, world):
    """{stage: argv} of one setting; every stage runs one optimizer step (evaluate: 4 prompts)."""
    out = f"{work}/{model}-{setting}"
    common = ["--model", model, "--steps", "1", "--threads", "2"]
    rl = ["--prompts_per_step", str(2 * world), "--group_size", "2", "--max_new_tokens", "16",
          "--eval_rows", "0"]
    return {
        "sft": ["sft.py", *common, "--data", f"{data}/sft_teacher.json", "--val_data",
                f"{data}/val.parquet", "--batch_size", str(2 * world), "--eval_rows", "0",
                "--out_dir", f"{out}/sft"],
        "warmup": ["warmup.py", "--backbone", model,
                   "--pairs", f"{data}/warmup_pairs.jsonl", "--steps", "1", "--batch_size", "2",
                   "--threads", "2", "--out_dir", f"{out}/warmup"],
        "align": ["align.py", *common, "--disc", model, "--data", f"{data}/align_prompts.parquet",
                  *rl, "--out_dir", f"{out}/align"],
        "rlvr": ["rlvr.py", *common, "--data", f"{data}/rl_prompts.parquet", *rl,
                 "--out_dir", f"{out}/rlvr"],
        "evaluate": ["evaluate.py", "--models", f"{model}={model}", "--data",
                     f"{data}/test.parquet", "--k", "2", "--max_new_tokens", "16", "--threads", "2",
                     "--out_dir", f"{out}/eval"],
    }


def plan(cpu, gpus):
    """[(model, setting, stage, extra flags, processes)] to run."""
    # full fine-tuning keeps fp32 weights (model.stage_dtype): --dtype auto; bf16 compute runs
    # with LoRA (a bf16 frozen base) and under FSDP (fp32 shards, bf16 compute)
    runs = []
    dtype = ["--dtype", "fp32"] if cpu else ["--dtype", "auto"]
    for model in ["proxy"] if cpu else ["tiny-random", "proxy"]:
        for stage in ("sft", "warmup", "align", "rlvr", "evaluate"):
            flags = dtype + ["--attn", "sdpa"] if stage != "evaluate" else []
            runs.append((model, "one device", stage, flags, 1))
    if cpu:  # the distributed path once, on gloo
        return runs + [("proxy", "torchrun 2 fsdp", "align", ["--dist", "fsdp"], 2)]
    for stage in ("sft", "align", "rlvr"):
        runs.append(("proxy", "lora bf16", stage, ["--lora", "--dtype", "bf16"], 1))
        runs.append(("proxy", "qlora", stage, ["--qlora"], 1))
        for n in sorted({1, gpus}):
            for dist in ("fsdp", "ddp"):
                runs.append(("proxy", f"torchrun {n} {dist}", stage, ["--dist", dist], n))
        if importlib.util.find_spec("flash_attn"):
            flags = ["--lora", "--attn", "flash_attention_2"]
            runs.append(("proxy", "flash-attn", stage, flags, 1))
    if not importlib.util.find_spec("flash_attn"):
        print("flash-attn: skipped (the package does not import here)")
    return runs


def run(argv, processes, env, timeout):
    """Run one stage -> (ok, seconds, output tail)."""
    if processes > 1 or argv[0] != "evaluate.py" and "--dist" in argv:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={processes}"]
    else:
        launcher = [sys.executable]
    t0 = time.time()
    p = subprocess.run(["timeout", str(timeout), *launcher, *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    return p.returncode == 0, time.time() - t0, (p.stdout + p.stderr)[-2000:]


def step_numbers(out_dir):
    """(s/step, peak MB) of the last step a stage logged, or (None, None)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None, None
    steps = [r for r in map(json.loads, open(path)) if "step_s" in r]
    return (steps[-1]["step_s"], steps[-1].get("peak_mem_mb")) if steps else (None, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the CPU dry run (fp32, proxy, gloo)")
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds allowed per stage run")
    args = ap.parse_args(argv)
    import torch
    gpus = torch.cuda.device_count()
    if not args.cpu and not gpus:
        raise SystemExit("error: no CUDA GPU here; use --cpu for the CPU dry run")
    work = args.work or tempfile.mkdtemp(prefix="gpu_smoke_")
    make_task(f"{work}/data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1" if args.cpu else "4"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not touch a GPU even where one exists
    rows, failures = [], []
    for model, setting, stage, flags, processes in plan(args.cpu, gpus):
        argv = commands(model, f"{work}/data", work, setting.replace(" ", "_"), processes)[stage]
        ok, seconds, tail = run(argv + flags, processes, env, args.timeout)
        out_dir = argv[argv.index("--out_dir") + 1]
        s_step, peak = step_numbers(out_dir)
        rows.append((stage, f"{model}, {setting}", "ok" if ok else "FAIL",
                     f"{s_step:.2f}" if s_step is not None else f"({seconds:.0f} s run)",
                     f"{peak:.0f}" if peak is not None else "-"))
        if not ok:
            failures.append((stage, setting, tail))
        print(f"{stage:9s} {model}, {setting}: {'ok' if ok else 'FAIL'} ({seconds:.0f} s)",
              flush=True)
    print("\n| stage | setting | result | s/step | peak MB (GPU; CPU: RSS) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for stage, setting, tail in failures:
        print(f"\n---- {stage}, {setting} failed; last output:\n{tail}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
