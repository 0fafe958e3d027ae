"""Shared test setup: no network, few threads, the repo root importable."""
import os
import sys

# Nothing may reach a model hub: a missing local file must fail at once, not after a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# `tiny` / `small` mean the random-init builds here (model.preset_name): they build in a second,
# the pretrained bases (pretrain.py) in minutes. Subprocesses inherit it.
os.environ.setdefault("NANOPRISM_BASE", "random")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
