"""The service runs in bfloat16 too: every endpoint answers, with scores close to the float32 service's."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SMALL_GRID

# bfloat16 keeps 8 bits of mantissa: through 2 layers, probabilities move by a few 1e-3 (see
# tests/model/test_parity.py for the model-level tolerance); 0.05 leaves room without hiding a broken path.
SCORE_TOLERANCE = 0.05

REQUESTS = [
    ("/classify", {"inputs": "John Smith works for Microsoft in Paris."}),
    ("/fill-mask", {"inputs": "The capital of France is [MASK]."}),
    (
        "/qa",
        {
            "inputs": {
                "question": "Where does John work?",
                "context": "John Smith works for Microsoft in Paris.",
            }
        },
    ),
    (
        "/ner",
        {
            "inputs": "John Smith works for Microsoft in Paris.",
            "parameters": {"aggregation_strategy": "none"},
        },
    ),
]


@pytest.fixture(scope="module")
def bf16_client(service_settings):
    settings = Settings(**{**service_settings.model_dump(), **SMALL_GRID, "dtype": "bfloat16"})
    runtime = Runtime(settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
        yield client
    runtime.stop()


def _scores(answer) -> list[float]:
    items = answer if isinstance(answer, list) else [answer]
    return [item["score"] for item in items]


@pytest.mark.parametrize(("path", "body"), REQUESTS, ids=[p for p, _ in REQUESTS])
def test_bfloat16_answers_are_close_to_float32(bf16_client, client, path, body):
    half = bf16_client.post(path, json=body)
    full = client.post(path, json=body)
    assert half.status_code == full.status_code == 200, half.text
    assert bf16_client.get("/info").json()["endpoints"]["qa"]["dtype"] == "bfloat16"
    half_scores, full_scores = _scores(half.json()), _scores(full.json())
    assert len(half_scores) == len(full_scores)
    assert all(math.isfinite(s) for s in half_scores)
    # Compare the best score (its identity may differ where float32 candidates are nearly tied).
    assert abs(max(half_scores) - max(full_scores)) <= SCORE_TOLERANCE
