"""What several test files share: a small synthetic task, torchrun under `timeout`, the metrics
without their timings, and deterministic stand-ins for a trained policy's outputs.

The stand-ins exist because the tiny policy is random: it never writes the answer format and never
answers right, so every reward, every discriminator score and hence every advantage would be equal,
and an update would not depend on what was sampled. Both are hashes of the response text, so every
process, strategy and rerun agrees on them."""
import os
import subprocess
import sys
import zlib

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"step_s", "tokens_per_s", "rollout_s", "peak_mem_mb"}  # the only logged numbers allowed to differ


def write_task(out, image_size=64, **sizes):
    """The synthetic task in folder out, seed 0, 4 rows per split unless sizes says otherwise
    (n_sft_public=48, ...); image_size None keeps task.py's default."""
    import task
    counts = {"n_sft_public": 4, "n_sft_teacher": 4, "n_align": 4, "n_rl": 4, "n_val": 4, "n_test": 4, **sizes}
    argv = ["--out", str(out), "--seed", "0"] + [x for k, v in counts.items() for x in (f"--{k}", str(v))]
    task.main(argv + (["--image_size", str(image_size)] if image_size else []))
    return out


def torchrun(*argv, timeout=240, env=None):
    """`torchrun --standalone --nproc_per_node=2 argv` from the repo root, one thread per process,
    under `timeout` (MEASURED.md saw rare hangs at the final barrier); it must succeed."""
    p = subprocess.run(["timeout", str(timeout), sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", *argv], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def untimed(records):
    """metrics.jsonl records without their wall-clock numbers."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def fake_reward(response, ground_truth):
    """A reward that varies between rollouts: right for half of the texts."""
    acc = float(zlib.crc32(response.encode()) % 2)
    return dict(score=0.8 * acc + 0.2, acc=acc, format=1.0)


_real_split = data.split_segments


def fake_split_segments(text):
    """Half of the texts count as well formed, with a fixed caption and reasoning (the
    discriminator's Bradley-Terry path runs, not only the all-invalid fallback)."""
    if zlib.crc32(text.encode()) % 2 == 0:
        return "<caption>- a red circle</caption>", "<think>one</think><answer>1</answer>"
    return _real_split(text)
