"""The longer reproduction (`make reproduce`): every cell of PRISM's comparison at toy scale, 3 seeds.

Per seed, on the embedded task (data/tiny, fixed), with the larger embedded preset `small` (6.3M):
  sft                      sft.py --model small
  disc_{moe,dense,text-only}   three discriminator warm-ups (PRISM's MoE, then the paper's ablations)
  align_{moe,dense,text-only}  three alignments from the same SFT policy
  {grpo,dapo,gspo} x {sft, align_moe, align_dense, align_text-only}   twelve RLVR runs, same budget
                           (--ablation_algos grpo: the ablations' policies get GRPO only, 8 runs;
                            --ablation_algos none: no RL from them, 6 runs)
  evaluate.py              every model above on the test split
Then runs/reproduce/summary.md: per model, the mean and spread (sample std over seeds) of greedy
accuracy, mean accuracy of 4 samples, perception accuracy and drift (MMD^2); and PRISM's claim as
paired differences, aligned arm minus SFT arm after the same RL algorithm, seed by seed.

Settings are the stage scripts' defaults (fixed before any test-split number was seen), with one
change for the bigger policy: SFT lr 1e-3 (docs/measured.md: the 4.5M model learned best there).
`make reproduce-tiny` runs the same grid on the demo's tiny preset with the demo's settings.
A stage whose output folder already holds `final` (or results.json) is skipped, so a killed
reproduction continues where it stopped when run again; seeds are independent, so several
`--seeds N` processes can share a machine and a last run over all seeds writes the summary.

    python reproduce.py                       # 3 seeds (hours on a 2-core CPU; see docs/results.md)
    python reproduce.py --seeds 0 --algos grpo --kinds moe   # one seed, one cell of each kind
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

PY = sys.executable


def plan(a, seed):
    """The stages of one seed in order, as (script arguments, output folder); the last evaluates every model."""
    root, common = os.path.join(a.out, f"seed{seed}"), ["--seed", str(seed)]
    kinds, algos = a.kinds.split(","), a.algos.split(",")
    ablation_algos = a.ablation_algos.split(",") if a.ablation_algos else algos
    ablation_arms = [f"align_{k}" for k in kinds[1:]]
    sft = os.path.join(root, "sft")
    stages = [(["sft.py", "--model", a.model, *shlex.split(a.sft_flags), "--out_dir", sft, *common], sft)]
    starts = {"sft": os.path.join(sft, "final")}
    for kind in kinds:
        disc, aligned = os.path.join(root, f"disc_{kind}"), os.path.join(root, f"align_{kind}")
        stages.append((["warmup.py", "--policy", starts["sft"], "--kind", kind, "--epochs", "3",
                        "--out_dir", disc, *shlex.split(a.warmup_flags), *common], disc))
        stages.append((["align.py", "--model", starts["sft"], "--disc", os.path.join(disc, "final"),
                        "--out_dir", aligned, "--eval_every", "0", *shlex.split(a.align_flags), *common], aligned))
        starts[f"align_{kind}"] = os.path.join(aligned, "final")
    models = dict(starts)
    for algo in algos:
        for arm, start in starts.items():
            if arm in ablation_arms and algo not in ablation_algos:
                continue  # an ablation's policy, and this algorithm is not run on ablations
            out = os.path.join(root, f"{arm}-{algo}")
            stages.append((["rlvr.py", "--model", start, "--algo", algo, "--out_dir", out, "--eval_every", "0",
                            *shlex.split(a.rl_flags), *common], out))
            models[f"{arm}-{algo}"] = os.path.join(out, "final")
    ev = os.path.join(root, "eval")
    stages.append((["evaluate.py", "--data", os.path.join(a.data, "test.parquet"), "--out_dir", ev,
                    "--seed", str(seed), "--models", ",".join(f"{k}={v}" for k, v in models.items())], ev))
    return stages


# What the summary reports of each model, read from evaluate.py's results.json.
CELLS = [("greedy acc", lambda m: m["greedy"]["acc"]),
         ("mean@k acc", lambda m: (m.get("sampled") or {}).get("acc")),
         ("perception", lambda m: m["greedy"]["perception"]["acc"]),
         ("MMD^2", lambda m: ((m.get("drift") or {}).get("greedy") or {}).get("mmd2"))]


def mean_std(xs):
    """'mean ± sample std' of the values that exist (std 0 for one value), or 'n/a'."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"


def summary(per_seed, main_kind="moe"):
    """Markdown from each seed's results["models"]: one row per model, then the paired differences
    (align_<main_kind>-<algo> minus sft-<algo>, computed within each seed, then mean ± std over seeds)."""
    head = "| model | " + " | ".join(c for c, _ in CELLS) + " |\n" + "|---" * (len(CELLS) + 1) + "|"
    rows = [f"| {name} | " + " | ".join(mean_std([get(r[name]) for r in per_seed if name in r]) for _, get in CELLS)
            + " |" for name in per_seed[0]]
    diffs = []
    for name in [n for n in per_seed[0] if n.startswith("sft-")]:
        algo = name[len("sft-"):]
        other = f"align_{main_kind}-{algo}"
        pairs = [(r[other], r[name]) for r in per_seed if other in r and name in r]
        if pairs:
            cells = []
            for _, get in CELLS[:2]:
                d = [get(x) - get(y) for x, y in pairs if get(x) is not None and get(y) is not None]
                cells.append(mean_std(d) + f" ({sum(v > 0 for v in d)}/{len(d)} seeds > 0)")
            diffs.append(f"| {other} minus sft-{algo} | " + " | ".join(cells) + " |")
    out = head + "\n" + "\n".join(rows) + "\n"
    if diffs:
        out += ("\nPRISM's claim, paired by seed (aligned arm minus SFT arm after the same RL):\n\n"
                "| difference | greedy acc | mean@k acc |\n|---|---|---|\n" + "\n".join(diffs) + "\n")
    return out


ALGOS, KINDS = ["grpo", "dapo", "gspo"], ["moe", "dense", "text-only"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--model", default="small", help="policy preset or folder")
    ap.add_argument("--algos", default="grpo,dapo,gspo", help="RL algorithms")
    ap.add_argument("--kinds", default="moe,dense,text-only", help="discriminator kinds (the first is PRISM's, the rest ablations)")
    ap.add_argument("--ablation_algos", default="", help="RL algorithms run from the ablations' aligned policies (default: all of --algos; "
                    "'none': the ablations are aligned and evaluated, no RL)")
    ap.add_argument("--out", default="runs/reproduce", help="output root")
    ap.add_argument("--data", default="data/tiny", help="task folder (written by task.py if missing)")
    ap.add_argument("--sft_flags", default="--lr 1e-3", help="extra sft.py flags (the default suits `small`)")
    ap.add_argument("--warmup_flags", default="",
                    help="extra `discriminator.py warmup` flags, e.g. '--hard_negatives 1'")
    ap.add_argument("--align_flags", default="", help="extra align.py flags, e.g. '--steps 150'")
    ap.add_argument("--rl_flags", default="", help="extra rlvr.py flags, e.g. '--steps 300'")
    a = ap.parse_args(argv)
    # Bad names fail here, not in the first RL stage after half an hour of SFT.
    for flag, names, allowed in [("--algos", a.algos, ALGOS), ("--kinds", a.kinds, KINDS),
                                 ("--ablation_algos", a.ablation_algos or "none", a.algos.split(",") + ["none"])]:
        bad = [n for n in names.split(",") if n not in allowed]
        if bad:
            ap.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    os.makedirs(a.out, exist_ok=True)
    journal = open(os.path.join(a.out, "journal.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        journal.write(msg + "\n")
        journal.flush()

    if not os.path.exists(os.path.join(a.data, "meta.json")):
        subprocess.run([PY, "task.py", "--out", a.data, "--seed", "0"], check=True)
    seeds = a.seeds.split(",")
    t_start = time.time()
    for seed in seeds:
        for args, out_dir in plan(a, seed):
            # A stage is done once its final folder (or evaluate.py's results.json) exists.
            if os.path.exists(os.path.join(out_dir, "final")) or os.path.exists(os.path.join(out_dir, "results.json")):
                log(f"skip (done): {out_dir}")
                continue
            log("$ " + " ".join(args))
            t0 = time.time()
            if subprocess.run([PY, *args]).returncode != 0:
                sys.exit(f"reproduce.py: {args[0]} failed for {out_dir} (its error is above); run again to resume")
            log(f"  {time.time() - t0:.0f} s")
    log(f"total wall time {(time.time() - t_start) / 60:.1f} min")

    per_seed = [json.load(open(os.path.join(a.out, f"seed{s}", "eval", "results.json")))["models"] for s in seeds]
    text = summary(per_seed, a.kinds.split(",")[0])
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"seeds {a.seeds}, model {a.model}, mean ± sample std over seeds\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
