"""Shared test setup: no network, few threads, the repo root importable."""
import os
import sys

# Nothing may reach a model hub: a missing local file must fail at once, not after a timeout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
