"""Tiny models of every task, a models file naming them, and a server-side reference (the endpoints through
TestClient on the same models) that the batch jobs' answers are compared with."""

from __future__ import annotations

import pytest
from embed_builders import SHALLOW, build_backbone, build_sentence_transformer
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.support import SMALL_GRID, models_file_runtime

NLI_LABELS = ["contradiction", "neutral", "entailment"]


@pytest.fixture(scope="session")
def batch_repos(tmp_path_factory, spiece_model, make_repo) -> dict:
    tmp = tmp_path_factory.mktemp("batch-repos")
    backbone = build_backbone(tmp / "backbone", spiece_model, seed=4)
    return {
        "embed": build_sentence_transformer(tmp / "st", backbone, pooling_mode="mean", normalize=True),
        "classify": make_repo("sequence-classification", seed=3, labels=["neg", "pos", "neutral"], **SHALLOW)[
            0
        ],
        "fill-mask": make_repo("masked-lm", seed=0, **SHALLOW)[0],
        "qa": make_repo("question-answering", seed=1, **SHALLOW)[0],
        "ner": make_repo("token-classification", seed=2, **SHALLOW)[0],
        "zero-shot": make_repo("sequence-classification", seed=7, labels=NLI_LABELS, **SHALLOW)[0],
        "rerank": make_repo("sequence-classification", seed=8, labels=["score"], **SHALLOW)[0],
    }


@pytest.fixture(scope="session")
def batch_models_file(batch_repos, tmp_path_factory):
    path = tmp_path_factory.mktemp("batch-config") / "models.toml"
    path.write_text(
        "".join(
            f'[models.{task}]\nsource = "{repo}"\ntask = "{task}"\n\n' for task, repo in batch_repos.items()
        )
    )
    return path


@pytest.fixture(scope="session")
def batch_cache(tmp_path_factory):
    """One compilation cache for every job of the session: only the first start of each shape compiles."""
    return tmp_path_factory.mktemp("batch-cache")


@pytest.fixture(scope="session")
def batch_flags(batch_models_file, batch_cache) -> list[str]:
    """The configuration flags every job of the tests runs with (a small grid, the shared cache)."""
    flags = ["--models-file", str(batch_models_file), "--compilation-cache-dir", str(batch_cache)]
    for name, value in SMALL_GRID.items():
        if name != "compilation_cache_dir":
            flag = "--" + name.replace("_", "-")
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


@pytest.fixture(scope="session")
def endpoints(batch_models_file):
    """The service's own answers on the same models (TestClient against the app)."""
    runtime = models_file_runtime(batch_models_file)
    assert not runtime.failed, runtime.failed
    with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
        yield client
    runtime.stop()
