"""Session fixtures: one SentencePiece model and tiny hub-style repositories built on demand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests never reach a hub, and run on the CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The PyTorch references run tiny models: one thread is much faster than two fighting over 2 loaded cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))

import builders
import pytest


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory) -> Path:
    return builders.train_sentencepiece(tmp_path_factory.mktemp("spiece"))


@pytest.fixture(scope="session")
def make_repo(tmp_path_factory, spiece_model):
    """make_repo(task, fmt="safetensors", fast_tokenizer=True, seed=0, **config) -> (path, torch model).

    Repositories are cached for the session by their arguments, so tests can ask freely.
    """
    cache: dict = {}

    def make(task: str, fmt: str = "safetensors", *, fast_tokenizer: bool = True, seed: int = 0, **overrides):
        key = (task, fmt, fast_tokenizer, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{task}-{fmt}")
            model = builders.build_repo(
                directory, task, spiece_model, fmt=fmt, fast_tokenizer=fast_tokenizer, seed=seed, **overrides
            )
            cache[key] = (directory, model)
        return cache[key]

    return make
