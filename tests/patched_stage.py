"""Run a stage (`python tests/patched_stage.py rlvr --steps 2 ...`, or under torchrun) with the
deterministic stand-ins of tests/helpers.py for a trained policy's outputs: half of the responses
count as well formed, and the reward is a hash of the text. The tests in test_fsdp.py compare
strategies on exactly the same rollouts, with a learning signal to get wrong. With
PATCHED_SAMPLE_PER_PROMPT=1 in the environment each prompt's rollouts are also drawn under a seed of
their own (helpers.sample_per_prompt): a 2-process run then samples what one process does."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import helpers  # noqa: E402  (this folder is on sys.path: the script runs from it)
import rollout  # noqa: E402

data.split_segments, data.reward = helpers.fake_split_segments, helpers.fake_reward
if os.environ.get("PATCHED_SAMPLE_PER_PROMPT") == "1":
    rollout.sample = helpers.sample_per_prompt(rollout.sample)

if __name__ == "__main__":
    importlib.import_module(sys.argv[1]).main(sys.argv[2:])
