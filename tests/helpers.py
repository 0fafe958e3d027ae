"""What several test files share: a small synthetic task, torchrun under `timeout`, the metrics
without their timings, and deterministic stand-ins for a trained policy's outputs.

The stand-ins exist because the tiny policy is random: it never writes the answer format and never
answers right, so every reward, every discriminator score and hence every advantage would be equal,
and an update would not depend on what was sampled. Both are hashes of the response text, so every
process, strategy and rerun agrees on them. sample_per_prompt makes the rollouts themselves
independent of how the prompts are spread over ranks and sampling chunks, so that runs differing
only in those can be compared number for number."""
import os
import subprocess
import sys
import zlib

import torch

import data
import rollout

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


def sample_per_prompt(sample):
    """rollout.sample with each prompt's rollouts drawn under a seed of their own (a hash of the
    prompt): the same rollouts whatever the number of ranks, the sampling chunks (--token_budget)
    or the other prompts of the step. The real sampler draws one random number per row of a batch,
    so any of those changes which tokens a prompt gets; equivalence tests need them fixed."""
    def per_prompt(model, processor, rows, n, *args, **kwargs):
        parts = []
        for row in rows:
            with torch.random.fork_rng():
                # the image's file name, not its path: the data folder is a fresh temporary one
                key = repr((row["messages"], [os.path.basename(str(x)) for x in row["images"]]))
                torch.manual_seed(zlib.crc32(key.encode()))
                parts.append(sample(model, processor, [row], n, *args, **kwargs))
        return rollout.concat(parts)
    return per_prompt


# The vision special tokens by name, as the Qwen3-VL tokenizer spells them: an oracle for the ids
# the sampler must block that does not come from the function that computes them.
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def letter_count(processor, letter):
    """(V,) how many times each token writes `letter` (special tokens write nothing)."""
    tok = processor.tokenizer
    pieces = [tok.decode([v], skip_special_tokens=True) for v in range(len(tok))]
    return torch.tensor([float(piece.count(letter)) for piece in pieces])


def first_token_mean(model, processor, rows, value):
    """The policy's expected value[token] (value: (V,)) for the first token of its answer, averaged
    over the prompts in rows. Exact (no sampling), so a few training steps' effect on the policy
    shows without noise; vision tokens are left out as the sampler leaves them out."""
    enc = data.encode_prompts(rows, processor)
    with torch.no_grad():
        logits = model(**enc).logits[:, -1].float()  # (B, V)
    blocked = processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    logits[:, blocked] = float("-inf")
    value = torch.nn.functional.pad(value, (0, logits.shape[-1] - len(value)))  # padded vocab: 0
    return (logits.softmax(-1) @ value).mean().item()
