"""Run a stage (`python tests/patched_stage.py rlvr --steps 2 ...`, or under torchrun) with outputs
that carry a learning signal although the tiny model is random.

A random policy never writes the answer format, so every reward and every discriminator score of
its rollouts is the same and every advantage is 0: a distributed run would "match" a single-process
one trivially. Here half of the responses (chosen by a hash of the text, so every process and
every strategy agrees) count as well formed, and the reward is a hash of the text in {0, 1, 2}.
The tests in test_fsdp.py compare strategies on exactly the same rollouts."""
import importlib
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

real_split, real_reward = data.split_segments, data.reward


def split_segments(text):
    if zlib.crc32(text.encode()) % 2 == 0:
        return "<caption>- a red circle</caption>", "<think>one</think><answer>1</answer>"
    return real_split(text)


def reward(text, truth):
    return {**real_reward(text, truth), "score": float(zlib.crc32(text.encode()) % 3)}


data.split_segments, data.reward = split_segments, reward

if __name__ == "__main__":
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
