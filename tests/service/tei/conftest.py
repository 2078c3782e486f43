"""Tiny models for the TEI drop-in tests and an in-process service over them."""

from __future__ import annotations

import warnings

import pytest
from embed_builders import SHALLOW, build_backbone, build_sentence_transformer
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.support import models_file_runtime
from tests.service.tei.tei_schema import LABELS, models_toml


@pytest.fixture(scope="session")
def tei_repos(tmp_path_factory, spiece_model, make_repo):
    tmp = tmp_path_factory.mktemp("tei")
    backbone = build_backbone(tmp / "backbone", spiece_model, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = build_sentence_transformer(
            tmp / "st", backbone, pooling_mode="mean", prompts={"query": "query: "}
        )
    return {
        "st": st,
        "nli": make_repo("sequence-classification", seed=12, labels=LABELS, **SHALLOW)[0],
        "one": make_repo("sequence-classification", seed=13, labels=["score"], **SHALLOW)[0],
    }


@pytest.fixture(scope="session")
def tei_runtime(tei_repos, tmp_path_factory):
    path = tmp_path_factory.mktemp("tei-config") / "models.toml"
    path.write_text(models_toml(tei_repos))
    runtime = models_file_runtime(path)
    yield runtime
    runtime.stop()


@pytest.fixture(scope="session")
def tei_client(tei_runtime):
    with TestClient(create_app(tei_runtime.settings, runtime=tei_runtime, start_runtime=False)) as client:
        yield client


@pytest.fixture
def with_settings(tei_runtime):
    """with_settings(**changes): the service's settings changed for one test (restored after)."""
    original = tei_runtime.settings

    def change(**changes):
        tei_runtime.settings = original.model_copy(update=changes)

    yield change
    tei_runtime.settings = original
