"""The longer reproduction (`make reproduce`): every cell of PRISM's comparison at toy scale, 3 seeds.

Per seed, on the embedded task (data/tiny, fixed), with the larger embedded preset `small` (6.3M):
  sft                      sft.py --model small
  disc_{moe,dense,text-only}   three discriminator warm-ups (the paper's ablations), tiny backbone
  align_{moe,dense,text-only}  three alignments from the same SFT policy
  {grpo,dapo,gspo} x {sft, align_moe, align_dense, align_text-only}   twelve RLVR runs, same budget
  evaluate.py              every model above on the test split
Then one table: mean and spread (sample std over seeds) of each model's greedy accuracy, mean
accuracy of 4 samples, perception accuracy and drift (MMD^2), into runs/reproduce/summary.md.

Settings are the stage scripts' defaults (fixed before any test-split number was seen), with two
changes for the bigger policy: SFT lr 1e-3 (MEASURED.md: the 4.5M model learned best there) and
the RL / alignment lr left at their defaults. A stage whose output folder already holds `final` is
skipped, so a killed reproduction continues where it stopped when run again.

    python reproduce.py                       # 3 seeds (hours on a 2-core CPU; see README)
    python reproduce.py --seeds 0 --algos grpo --kinds moe   # one seed, one cell of each kind
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PY = sys.executable


def run(args, out_dir, log):
    """Run one stage unless its final folder exists (resumable), logging the command and wall time."""
    if os.path.exists(os.path.join(out_dir, "final")) or os.path.exists(os.path.join(out_dir, "results.json")):
        log(f"skip (done): {out_dir}")
        return
    log("$ " + " ".join(args))
    t0 = time.time()
    subprocess.run([PY, *args], check=True)
    log(f"  {time.time() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--model", default="small", help="policy preset or folder")
    ap.add_argument("--algos", default="grpo,dapo,gspo", help="RL algorithms")
    ap.add_argument("--kinds", default="moe,dense,text-only", help="discriminator kinds (ablations)")
    ap.add_argument("--out", default="runs/reproduce", help="output root")
    ap.add_argument("--data", default="data/tiny", help="task folder (written by task.py if missing)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    journal = open(os.path.join(a.out, "journal.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        journal.write(msg + "\n")
        journal.flush()

    if not os.path.exists(os.path.join(a.data, "meta.json")):
        subprocess.run([PY, "task.py", "--out", a.data, "--seed", "0"], check=True)
    kinds, algos = a.kinds.split(","), a.algos.split(",")
    t_start = time.time()
    for seed in a.seeds.split(","):
        root = os.path.join(a.out, f"seed{seed}")
        common = ["--seed", seed]
        sft = os.path.join(root, "sft")
        run(["sft.py", "--model", a.model, "--lr", "1e-3", "--out_dir", sft, *common], sft, log)
        starts = {"sft": os.path.join(sft, "final")}
        for kind in kinds:
            disc, aligned = os.path.join(root, f"disc_{kind}"), os.path.join(root, f"align_{kind}")
            run(["discriminator.py", "warmup", "--policy", starts["sft"], "--kind", kind, "--epochs", "3",
                 "--out_dir", disc, *common], disc, log)
            run(["align.py", "--model", starts["sft"], "--disc", os.path.join(disc, "final"), "--out_dir", aligned,
                 "--eval_every", "0", *common], aligned, log)
            starts[f"align_{kind}"] = os.path.join(aligned, "final")
        models = {"sft": starts["sft"], **{f"align_{k}": starts[f"align_{k}"] for k in kinds}}
        for algo in algos:
            for arm, start in list(starts.items()):
                out = os.path.join(root, f"{arm}-{algo}")
                run(["rlvr.py", "--model", start, "--algo", algo, "--out_dir", out, "--eval_every", "0", *common], out, log)
                models[f"{arm}-{algo}"] = os.path.join(out, "final")
        ev = os.path.join(root, "eval")
        run(["evaluate.py", "--data", os.path.join(a.data, "test.parquet"), "--out_dir", ev, "--seed", seed,
             "--models", ",".join(f"{k}={v}" for k, v in models.items())], ev, log)
    log(f"total wall time {(time.time() - t_start) / 60:.1f} min")

    # ---- the summary: mean and spread over seeds, per model
    per_seed = [json.load(open(os.path.join(a.out, f"seed{s}", "eval", "results.json")))["models"]
                for s in a.seeds.split(",")]
    cells = [("greedy acc", lambda m: m["greedy"]["acc"]), ("mean@k acc", lambda m: m["sampled"]["acc"]),
             ("perception", lambda m: m["greedy"]["perception"]["acc"]),
             ("MMD^2", lambda m: ((m.get("drift") or {}).get("greedy") or {}).get("mmd2"))]
    lines = ["| model | " + " | ".join(c for c, _ in cells) + " |", "|---" * (len(cells) + 1) + "|"]
    for name in per_seed[0]:
        row = []
        for _, get in cells:
            xs = [get(r[name]) for r in per_seed if name in r]
            xs = [x for x in xs if x is not None]
            row.append("n/a" if not xs else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"seeds {a.seeds}, model {a.model}, mean ± sample std over seeds\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
