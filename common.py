"""Plumbing every stage shares: the CLI built from a dataclass, distributed init, seeding, logging
and atomic checkpoints. Nothing here knows about PRISM; read a stage script first and come here only
when it calls something.

Importing this module does no work.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import typing

import torch

# -----------------------------------------------------------------------------------------------
# CLI from a dataclass


def _field_comments(cls):
    """Map field name -> the `# comment` written after it in the class source.

    The config classes read like nanoGPT's globals (`lr: float = 1e-5  # peak learning rate`), so
    the comment a student sees in the file is exactly the help text `-h` prints."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s*(\w+)\s*:[^=]*=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _to_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(cls, argv=None):
    """Build an argparse CLI from the dataclass `cls` and return an instance.

    `--lr 1e-6` and `--lr=1e-6` both work (argparse), `-h` lists every field with its comment and
    default, unknown flags and badly typed values exit with a one-line error. A bare boolean flag
    (`--lora`) means true; `--lora false` is accepted too."""
    comments = _field_comments(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(description=doc[0] if doc else None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)  # string annotations too
        help_text = comments.get(f.name, " ").replace("%", "%%")  # argparse formats help with %
        # `x: float | None = None`: None means "not given, use the default from elsewhere"
        # (rl_losses.ALGOS); the flag takes a value of the inner type
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(kind):
            kind = args[0]
        if typing.get_origin(kind) is typing.Literal:  # a fixed set of values: argparse checks it
            choices = typing.get_args(kind)
            parser.add_argument(f"--{f.name}", type=type(choices[0]), choices=choices, default=f.default, help=help_text)
        elif kind is bool:
            parser.add_argument(f"--{f.name}", type=_to_bool, nargs="?", const=True, default=f.default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------------------------
# Distributed init: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are one process.


def init_distributed():
    """Return (rank, local_rank, world_size, device). One code path for `python x.py` and torchrun.

    CUDA gets one GPU per local rank; CPU runs use gloo (that is how the 2-process tests run on
    this machine). See BACKENDS for why a GPU run starts two backends."""
    if "RANK" not in os.environ:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group(backend=BACKENDS[device.type])
    return rank, local_rank, world, device


# The process-group backend per device type. On GPUs the gradients and FSDP's shards travel over
# NCCL, but the stages also all-reduce small CPU tensors (token counts, "did any rank see a NaN?",
# metric sums): NCCL accepts CUDA tensors only, so CPU tensors get a gloo backend in the same
# group. Keeping the bookkeeping on the CPU avoids a GPU sync per counter and keeps the code the
# same for CPU and GPU runs; tests/test_gpu_sim.py runs every such collective against this table.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def start(cfg):
    """The opening of every stage: distributed init, threads, seeds (seed + rank), the resolved
    config printed and out_dir created. -> (rank, world, device, log); log prints on rank 0 only."""
    rank, _, world, device = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed + rank)
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    return rank, world, device, log


def finish():
    """The end of every stage: no rank tears down the process group while rank 0 still writes."""
    barrier()
    if is_dist():
        torch.distributed.destroy_process_group()


def save_final(out_dir, save_models, info):
    """Write out_dir/final atomically: the models via save_models(folder), plus run.json. Every rank
    calls it (under FSDP saving gathers the shards, a collective); rank 0 writes."""
    final = os.path.join(out_dir, "final")
    tmp = final + ".tmp"
    if get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    save_models(tmp)
    if get_rank() == 0:
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump(info, f, indent=2)
        _replace_dir(tmp, final)
    barrier()
    return final


def is_dist():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank():
    return torch.distributed.get_rank() if is_dist() else 0


def barrier():
    if is_dist():
        torch.distributed.barrier()


def all_reduce_sum(t):
    """Sum a tensor over ranks in place (a no-op single-process) and return it."""
    if is_dist():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    """Maximum of a tensor over ranks, in place (a no-op single-process), returned."""
    if is_dist():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_gather_list(tensors):
    """Every rank's (C, n_rank) CPU tensor -> the list of all of them, in rank order. The ranks
    may hold different n_rank: each is padded to the largest for the all_gather and cut back.
    Single-process: the list as given."""
    if not is_dist():
        return list(tensors)
    mine = tensors[0]
    world = torch.distributed.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device="cpu") for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([mine.shape[1]], device="cpu"))
    most = max(int(n) for n in sizes)
    padded = torch.nn.functional.pad(mine, (0, most - mine.shape[1]))  # (C, most)
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return [x[:, :int(n)] for x, n in zip(out, sizes)]


def sum_over_ranks(values):
    """{name: number or 0-d tensor} -> {name: float}, each summed over ranks in one collective
    (a CPU tensor: the backends take it on GPU runs too, see BACKENDS)."""
    names = list(values)
    flat = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device="cpu")
    return dict(zip(names, all_reduce_sum(flat).tolist()))


def any_rank(flag):
    """True on every rank if flag is true on any rank: for a branch all ranks must take together."""
    return all_reduce_sum(torch.tensor(float(bool(flag)), device="cpu")).item() > 0


def all_reduce_grads(params, average=False):
    """Sum (or average) the gradients of params over ranks: what DDP does in its backward hooks,
    done by hand for models that are called in pieces (the RL stages' shared-prompt forward), where
    DDP's one-forward-one-backward bookkeeping does not fit. One flat buffer per dtype, one
    collective each. A parameter without a gradient on this rank contributes zeros, so every rank
    sends buffers of the same size. Parameters sharded by FSDP (DTensors) are skipped: FSDP already
    reduced their gradients in backward."""
    params = [p for p in params if not hasattr(p, "device_mesh")]
    if not is_dist() or not params:
        return
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        if average:
            flat /= torch.distributed.get_world_size()
        offset = 0
        for p in group:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()


def clip_grad_norm(params, max_norm):
    """Clip the global gradient norm of params to max_norm (0 = no clipping) and return the norm
    before clipping as a plain tensor (under FSDP it is computed over all shards)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def seed_everything(seed):
    """Seed python and torch. Callers pass seed + rank so ranks sample different rollouts."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device):
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -----------------------------------------------------------------------------------------------
# Logging


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def open_logs(out_dir, start_step, master):
    """(metrics.jsonl, samples.jsonl) paths of a run; rank 0 trims them to start_step, so a resumed
    run never logs a step twice and a fresh run starts empty."""
    paths = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "samples.jsonl")
    if master:
        for path in paths:
            trim_jsonl(path, start_step)
    return paths


def metrics_writer(cfg, path, master):
    """A function record -> None: the record appended to metrics.jsonl (path) and, with
    --report_to tensorboard | wandb, the same numbers sent there (rank 0 only; lists such as the
    router load become one series per entry). The trackers import lazily: only the one asked for
    must be installed."""
    kind = getattr(cfg, "report_to", "none")
    if not master:
        return lambda record: None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: --report_to tensorboard needs the tensorboard package: "
                             "pip install tensorboard")
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
    elif kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("error: --report_to wandb needs the wandb package: pip install wandb")
        # one W&B run per output folder: a resumed run continues the same curves
        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", os.path.abspath(cfg.out_dir))[-64:]
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanoprism"), id=run_id,
                         resume="allow", dir=cfg.out_dir, config=dataclasses.asdict(cfg))

    def write(record):
        append_jsonl(path, record)
        if kind == "none":
            return
        values = {}
        for k, v in record.items():
            items = [(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)]
            values.update((name, x) for name, x in items
                          if isinstance(x, (int, float)) and k != "step")
        if kind == "tensorboard":
            for name, x in values.items():
                writer.add_scalar(name, x, record["step"])
            writer.flush()
        else:
            run.log(values, step=record["step"])
    return write


def trim_jsonl(path, last_step):
    """Keep only the records of steps <= last_step: a fresh run (last_step 0) starts an empty log,
    and a resumed run drops what was logged after its checkpoint, so no step appears twice."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line.rstrip("\n") + "\n")
            except ValueError:  # blank, or the half line of a run killed while appending it
                pass
    _write_atomic(path, "".join(keep))


# -----------------------------------------------------------------------------------------------
# Bad numbers. A NaN or Inf anywhere in a step (logits, loss, gradients, rewards, scores,
# advantages) skips that step's optimizer updates and is counted; max_bad_steps such steps in a row
# stop the run before it writes another checkpoint. One bad batch is survivable, a diverged model is not.


def nonfinite(**values):
    """Comma-separated names of the given tensors / numbers holding a NaN or Inf ("" when none do)."""
    def finite(v):
        return bool(torch.isfinite(v).all()) if torch.is_tensor(v) else math.isfinite(v)
    return ", ".join(k for k, v in values.items() if not finite(v))


def count_bad_step(bad, why, step, log):
    """Book step `step`: bad = {"bad_steps": total (saved in checkpoints), "bad_streak": in a row};
    why = what was non-finite, "" for a good step (which ends the streak). One warning line."""
    if not why:
        bad["bad_streak"] = 0
        return
    bad["bad_steps"] += 1
    bad["bad_streak"] += 1
    log(f"warning: step {step}: non-finite {why}; update skipped ({bad['bad_streak']} in a row, "
        f"{bad['bad_steps']} in all)")


def stop_if_diverged(bad, max_bad_steps, step, out_dir):
    """One-line SystemExit after max_bad_steps bad steps in a row (0 = never). Stages call it before
    the step's checkpoint, and bad steps write none, so the newest checkpoint predates the streak."""
    if max_bad_steps and bad["bad_streak"] >= max_bad_steps:
        raise SystemExit(f"error: {bad['bad_streak']} steps in a row with NaN/Inf (the last: step {step}), "
                         f"stopped without saving; the newest checkpoint is {latest_checkpoint(out_dir)}. "
                         "Lower --lr or check the data, then --resume")


def run_info(cfg):
    """What a run needs to be reproduced: config, git commit, package versions, time."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import importlib.metadata as md
    versions = {}
    for pkg in ("torch", "transformers", "tokenizers", "peft", "pillow", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"config": dataclasses.asdict(cfg), "git_commit": commit or None, "versions": versions,
            "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# -----------------------------------------------------------------------------------------------
# Checkpoints, written so that a kill at any moment leaves the previous one usable.
#
# Layout:  out_dir/ckpt/step_000100/  (model + processor + trainer_state.pt + rng_rank*.pt + run.json)
#          out_dir/ckpt/latest        (a text file naming the newest complete checkpoint)
# A checkpoint is written into step_000100.tmp, renamed when complete, and only then does `latest`
# move (os.replace of a small file is atomic). A kill mid-save leaves a .tmp folder that the next
# save removes; `latest` still names the previous complete checkpoint.


def save_checkpoint(out_dir, step, save_model, trainer_state, info, rank=0, keep=2):
    """Write checkpoint `step` atomically. Every rank calls this (each saves its own RNG streams).

    save_model(path) writes the weights (and processor) in Hugging Face format, called on every
    rank (rank 0 writes); trainer_state is a dict of tensors / numbers (optimizer, scheduler, step),
    written by rank 0 and loaded later with weights_only=True."""
    ckpt_root = os.path.join(out_dir, "ckpt")
    final = os.path.join(ckpt_root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()  # the folder must exist before the other ranks write their RNG files into it
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    save_model(tmp)  # every rank: under FSDP the shards are gathered (a collective); rank 0 writes
    if rank == 0:
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump(info, f, indent=2)
    barrier()  # every rank's RNG file is on disk before the checkpoint is declared complete
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(os.path.join(ckpt_root, "latest"), os.path.basename(final))
        old = sorted(d for d in os.listdir(ckpt_root) if re.fullmatch(r"step_\d+", d))[:-keep]
        old += [d for d in os.listdir(ckpt_root) if d.endswith(".tmp")]  # left by a save that was killed
        for d in old:
            shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    barrier()  # nobody races ahead and reads `latest` before it moved
    return final


def write_dir_atomic(path, write):
    """Call write(tmp_folder), then rename the folder to path: readers never see half a folder."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    _replace_dir(tmp, path)


def _replace_dir(tmp, path):
    """Rename the complete folder tmp to path, replacing what was there."""
    # Move the old folder aside before the new one takes its name: a kill in between leaves both
    # complete copies on disk (path.old and path) rather than none.
    shutil.rmtree(path + ".old", ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def publish_build(tmp, path):
    """Rename a finished model build (folder tmp) to the cache folder path: atomic, so a
    half-built folder is never picked up. Separate processes (parallel test runs, several jobs,
    torchrun ranks) may build the same recipe on a cold cache at once: the first rename wins and
    the others' identical builds are dropped."""
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path, obj):
    """A small JSON file written atomically (tmp file, fsync, rename)."""
    _write_atomic(path, json.dumps(obj))


def _write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out_dir):
    """Path of the newest complete checkpoint under out_dir, or None.

    `latest` decides. Only if it is missing or names a folder that is gone (deleted by hand, a copy
    of out_dir without it) do we fall back to the newest step_N folder holding the files a finished
    save leaves: step_N.tmp folders are half-written by definition and never chosen."""
    root = os.path.join(out_dir, "ckpt")
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if _complete(path):
            return path
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)) if os.path.isdir(root) else []
    done = [d for d in steps if _complete(os.path.join(root, d))]
    return os.path.join(root, done[-1]) if done else None


def _complete(path):
    """A checkpoint folder with what save_checkpoint writes last on rank 0 (a half-deleted one fails)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("trainer_state.pt", "run.json", "rng_rank0.pt"))


def load_trainer_state(ckpt, rank=0):
    """Trainer state and this rank's RNG streams; weights_only=True so no pickle code can run."""
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    rng_file = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def rng_state():
    # python's state is a tuple of ints; stored as a list so weights_only loading accepts it
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
