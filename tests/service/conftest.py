"""A session-wide service over tiny checkpoints, and the transformers pipelines to compare it with.

The models are shallow (2 layers, one group): random weights in deeper tiny models squash every token
onto nearly the same state, which would make NER and QA answers degenerate and the comparison weak.
"""

from __future__ import annotations

import warnings

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import PIPELINE_TASKS, SERVICE_REPOS, SMALL_GRID


@pytest.fixture(scope="session")
def service_repos(make_repo) -> dict:
    """endpoint -> (directory, transformers PyTorch model)."""
    return {endpoint: make_repo(task, **kwargs) for endpoint, (task, kwargs) in SERVICE_REPOS.items()}


@pytest.fixture(scope="session")
def service_settings(service_repos) -> Settings:
    return Settings(
        classify_model=str(service_repos["classify"][0]),
        fill_mask_model=str(service_repos["fill-mask"][0]),
        qa_model=str(service_repos["qa"][0]),
        ner_model=str(service_repos["ner"][0]),
        **SMALL_GRID,
    )


@pytest.fixture(scope="session")
def runtime(service_settings):
    runtime = Runtime(service_settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    yield runtime
    runtime.stop()


@pytest.fixture
def client(runtime):
    with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def pipelines(service_repos) -> dict:
    """endpoint -> the transformers 4.57 pipeline on the same checkpoint."""
    from transformers import pipeline

    result = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for endpoint, (directory, _) in service_repos.items():
            result[endpoint] = pipeline(
                PIPELINE_TASKS[endpoint], model=str(directory), tokenizer=str(directory)
            )
    return result
