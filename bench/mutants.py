"""A small mutation check: do the tests notice the bugs we know how to make?

Each mutant is one known-bug edit: (name, file, exact old text, new text, pytest node ids that
should fail because of it). For each one, the tracked files of the repository (git ls-files) are
copied to a scratch folder, the edit is applied there, and only its tests are run. A mutant is
"killed" when those tests fail and "SURVIVED" when they all pass: then no test in the list can tell
the bug from the right code. The working tree is never touched.

The list holds the six bugs of issue 14 (each passed the whole suite before its tests existed) and
more of our own, at the places where a wrong sign or a wrong count would hide: the advantage's
sign, the step-wide counts across ranks, the SFT token mean and label shift, and the optimizer
state a resume must restore.

A tool for reviewers, not part of `make test` (a few minutes on 2 cores):
    python bench/mutants.py               # every mutant
    python bench/mutants.py kl_ref sft_   # the mutants whose names contain one of these words
    python bench/mutants.py --list
Before the mutants, their tests run once on the unchanged copy: they must pass there, or "killed"
would mean nothing. Exit status 1 when a mutant survives, its tests error out, or an edit no
longer applies (the code moved: fix the pattern here); 0 when every mutant is killed.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RLVR, ALIGN, ROLLOUT, SFT = (f"tests/test_{x}.py" for x in ["rlvr", "align", "rollout", "sft"])
INDENT = " " * 16  # of sft.py's micro-batch loop body
SFT_BACKWARD = ("loss_sum, _ = token_loss_sum(model, batch)\n"
                + INDENT + "# DDP and our FSDP setup average gradients over ranks; "
                "multiplying by world turns\n"
                + INDENT + "# that average back into the global sum / global token count.\n"
                + INDENT + "(loss_sum * (world if keep else 0) / n_tokens)")
# (name, file, old, new, tests). `old` must occur exactly once in `file`.
MUTANTS = [
    # ---- the six bugs of issue 14
    ("disc_loss_swapped", "align.py",
     "rl_losses.disc_loss(t_c[g], t_t[g], s_c, s_t,",
     "rl_losses.disc_loss(s_c, s_t, t_c[g], t_t[g],",
     [f"{ALIGN}::test_discriminator_learns_to_prefer_the_teacher"]),
    ("no_step_wide_counts", "rlvr.py",
     "step_tokens=tokens, step_seqs=seqs,",
     "step_tokens=None, step_seqs=None,",
     [f"{RLVR}::test_micro_batches_and_two_ranks_give_one_batch_gradient"]),
    ("alpha_and_penalty_dropped", "align.py",
     "rl_losses.prism_advantages(cap, cot, ok.bool(), g, cfg.alpha,\n"
     "                                                               cfg.format_penalty)",
     "rl_losses.prism_advantages(cap, cot, ok.bool(), g)",
     [f"{ALIGN}::test_alpha_and_format_penalty_shape_the_advantages"]),
    ("kl_ref_is_the_policy", "rlvr.py",
     "with models.unwrap(model).disable_adapter():",
     "with torch.no_grad():",
     [f"{RLVR}::test_kl_is_k3_against_the_model_without_its_adapter"]),
    ("pass_rates_inverted", "rollout.py",
     "rates += acc.view(-1, n).mean(-1).tolist()",
     "rates += (1 - acc.view(-1, n).mean(-1)).tolist()",
     [f"{ROLLOUT}::test_pass_rates_of_a_policy_with_known_rates"]),
    ("no_vision_tokens_blocked", "model.py",
     "return [vocab[n] for n in names if n in vocab]",
     "return []",
     [f"{ROLLOUT}::test_masks_stop_at_eos_and_never_sample_vision_tokens"]),
    # ---- our own: signs
    ("rlvr_advantage_sign", "rlvr.py",
     "advantages = rollout.global_advantages(",
     "advantages = -rollout.global_advantages(",
     [f"{RLVR}::test_letter_reward_moves_the_policy_its_way"]),
    ("align_advantage_sign", "align.py",
     "advantages = rollout.global_advantages(",
     "advantages = -rollout.global_advantages(",
     [f"{ALIGN}::test_frozen_discriminator_pulls_the_policy_its_way"]),
    # ---- our own: counts
    ("counts_not_summed_over_ranks", "rollout.py",
     "tokens, seqs, bad = all_reduce_sum(counts).tolist()",
     "tokens, seqs, bad = counts.tolist()",
     [f"{RLVR}::test_micro_batches_and_two_ranks_give_one_batch_gradient"]),
    ("policy_grads_averaged_over_ranks", "rollout.py",
     "    all_reduce_grads(params)\n",
     "    all_reduce_grads(params, average=True)\n",
     [f"{RLVR}::test_micro_batches_and_two_ranks_give_one_batch_gradient"]),
    ("sft_micro_batch_mean", "sft.py", SFT_BACKWARD,  # each micro-batch by its own token count
     "loss_sum, n_micro = token_loss_sum(model, batch)\n"
     + INDENT + "(loss_sum * (world if keep else 0) / n_micro)",
     [f"{SFT}::test_one_step_is_the_models_own_loss_and_gradient_and_lowers_the_loss"]),
    ("sft_labels_not_shifted", "sft.py",
     "targets = labels[:, 1:]  # (B, T-1)",
     "targets = labels[:, :-1]  # (B, T-1)",
     [f"{SFT}::test_one_step_is_the_models_own_loss_and_gradient_and_lowers_the_loss"]),
    ("split_groups_not_gathered", "rollout.py",
     "    if layout.split == 1:\n        return fn(*values, group)",
     "    if True:\n        return fn(*values, group)",
     ["tests/test_headline.py::test_split_groups_are_normalised_with_all_their_rollouts"]),
    ("drgrpo_without_sequence_count", "rl_losses.py",
     "rows = masked.sum(-1) / max_len  # (B,)",
     "rows = masked.sum(-1) / max_len * (row_tokens > 0).sum()  # (B,)",
     ["tests/test_rl_losses.py::test_on_policy_drgrpo_divides_by_sequences_and_budget"]),
    # ---- our own: what a resume must restore
    ("rlvr_resume_drops_optimizer_state", "rlvr.py",
     'models.load_optimizer_state(model, optimizer, state["optimizer"])',
     "pass",
     [f"{RLVR}::test_resume_replays_exactly"]),
    ("align_resume_drops_disc_optimizer_state", "align.py",
     'models.load_optimizer_state(disc, disc_optimizer, state["disc_optimizer"])',
     "pass",
     [f"{ALIGN}::test_resume_replays_exactly"]),
]


def copy_repo(dest):
    """The tracked files (plus untracked, not ignored ones: a reviewer's new tests) into dest."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in listed.stdout.splitlines():
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    # the embedded models' cache: without it every copy would build the tiny model again
    if os.path.isdir(os.path.join(ROOT, "cache")):
        os.symlink(os.path.join(ROOT, "cache"), os.path.join(dest, "cache"))


def apply(folder, name, path, old, new):
    """Edit folder/path in place; a pattern that is missing or ambiguous is a loud error."""
    target = os.path.join(folder, path)
    text = open(target).read()
    count = text.count(old)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        raise SystemExit(f"mutant {name}: pattern {where} in {path}: {old!r}")
    with open(target, "w") as f:
        f.write(text.replace(old, new))


def run(folder, tests, python, timeout):
    """Run pytest on tests in folder -> (status, output). "SURVIVED" means every test passed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang fails the suite as surely as an assertion
        return "killed (timeout)", ""
    if p.returncode == 0:
        return "SURVIVED", p.stdout
    if p.returncode == 1:  # pytest's code for "some test failed"
        return "killed", p.stdout
    return f"error (pytest exit {p.returncode})", p.stdout + p.stderr  # e.g. a test id not found


def why(output):
    """The lines of pytest's output that say what failed."""
    lines = [x for x in output.splitlines() if x.startswith(("E ", "FAILED", "ERROR"))]
    return "\n".join("    " + x[:160] for x in (lines[:8] or output.splitlines()[-20:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests only")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    ap.add_argument("--verbose", action="store_true", help="print why each mutant's tests failed")
    ap.add_argument("--no_baseline", action="store_true",
                    help="do not first run the tests on the unchanged copy (where they must "
                         "pass, or a 'killed' would mean nothing)")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m[0] for n in args.names)]
    if args.list:
        for name, path, _, _, tests in chosen:
            print(f"{name:42s} {path:12s} {' '.join(tests)}")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutants_") as scratch:
        # every pattern is checked before anything runs: a stale list fails at once, not at the end
        probe = os.path.join(scratch, "unchanged")
        copy_repo(probe)
        for name, path, old, _, _ in chosen:
            apply(probe, name, path, old, old)
        if not args.no_baseline:
            t0 = time.time()
            status, output = run(probe, sorted({t for m in chosen for t in m[4]}), args.python,
                                 args.timeout * 2)
            if status != "SURVIVED":  # here: the tests do not all pass on the unchanged code
                print(output[-3000:])
                raise SystemExit(f"baseline: the tests fail on the unchanged code ({status})")
            seconds = time.time() - t0
            print(f"{'(no mutant: the tests pass)':42s} {'ok':16s} {seconds:6.1f} s", flush=True)
        for name, path, old, new, tests in chosen:
            folder = os.path.join(scratch, name)
            copy_repo(folder)
            apply(folder, name, path, old, new)
            t0 = time.time()
            status, output = run(folder, tests, args.python, args.timeout)
            rows.append((name, status, time.time() - t0))
            print(f"{name:42s} {status:16s} {rows[-1][2]:6.1f} s", flush=True)
            if args.verbose or not status.startswith("killed"):
                print(why(output))
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| mutant | result | seconds |\n|---|---|---|")
    for name, status, seconds in rows:
        print(f"| {name} | {status} | {seconds:.0f} |")
    killed = sum(status.startswith("killed") for _, status, _ in rows)
    print(f"\n{killed} of {len(rows)} killed")
    sys.exit(0 if killed == len(rows) else 1)


if __name__ == "__main__":
    main()
