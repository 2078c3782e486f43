"""End to end: `albert-serve` started as a real process, called over HTTP with httpx."""

from __future__ import annotations

import json
import warnings

import httpx
import pytest
from compare import assert_matches_pipeline

from tests.service.support import SMALL_GRID, ServiceProcess


def _env(repos: dict, cache_dir, **extra) -> dict[str, str]:
    env = {
        "ALBERT_CLASSIFY_MODEL": str(repos["classify"][0]),
        "ALBERT_FILL_MASK_MODEL": str(repos["fill-mask"][0]),
        "ALBERT_QA_MODEL": str(repos["qa"][0]),
        "ALBERT_NER_MODEL": str(repos["ner"][0]),
        "ALBERT_COMPILATION_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in {**SMALL_GRID, **extra}.items():
        if key == "compilation_cache_dir":
            continue
        env["ALBERT_" + key.upper()] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return env


@pytest.fixture(scope="module")
def served(service_repos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    server = ServiceProcess(_env(service_repos, tmp / "jax-cache"), tmp / "server.log")
    pending = []
    try:
        server.wait_ready(on_pending=lambda r: pending.append(r.json()))
        yield server, pending
    finally:
        server.kill()


def test_ready_reports_what_is_pending_then_serves(served):
    server, pending = served
    assert httpx.get(server.url + "/health").status_code == 200
    if pending:  # it was polled while starting: 503 bodies said what was left
        assert all(body["ready"] is False and body["pending"] for body in pending)
    ready = httpx.get(server.url + "/ready").json()
    assert ready["ready"] is True
    assert set(ready["models"]) == {"classify", "fill-mask", "qa", "ner"}
    assert set(ready["models"].values()) == {"ready"}


def test_all_four_endpoints_over_http(served, pipelines):
    server, _ = served
    cases = [
        (
            "/classify",
            {"inputs": "Marie Curie worked in Paris."},
            lambda p: p("Marie Curie worked in Paris.", top_k=None),
        ),
        (
            "/fill-mask",
            {"inputs": "Paris is the [MASK] of France."},
            lambda p: p("Paris is the [MASK] of France."),
        ),
        (
            "/qa",
            {"inputs": {"question": "Where did she work?", "context": "Marie Curie worked in Paris."}},
            lambda p: p(question="Where did she work?", context="Marie Curie worked in Paris."),
        ),
        (
            "/ner",
            {"inputs": "Marie Curie worked in Paris."},
            lambda p: p("Marie Curie worked in Paris.", aggregation_strategy="simple"),
        ),
    ]
    endpoints = {"/classify": "classify", "/fill-mask": "fill-mask", "/qa": "qa", "/ner": "ner"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body, expected in cases:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"]
            assert float(response.headers["x-inference-time-ms"]) > 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert_matches_pipeline(response.json(), expected(pipelines[endpoints[path]]))


def test_info_docs_and_metrics(served):
    server, _ = served
    with httpx.Client(base_url=server.url, timeout=30) as client:
        info = client.get("/info").json()["endpoints"]
        assert set(info) == {"classify", "fill-mask", "qa", "ner"}
        assert info["ner"]["labels"][0] == "O" and info["classify"]["dtype"] == "float32"
        assert "1x160" in info["qa"]["buckets"]
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/classify", "/fill-mask", "/qa", "/ner"} <= set(schema["paths"])
        metrics = client.get("/metrics").text
        assert "albert_requests_total" in metrics and "albert_compilations " in metrics


def test_logs_are_structured_one_line_per_request(served):
    server, _ = served
    response = httpx.post(
        server.url + "/ner", json={"inputs": "Anna lives in Rome."}, headers={"X-Request-ID": "e2e-42"}
    )
    assert response.headers["x-request-id"] == "e2e-42"
    # The server writes its line once the response is sent: on a busy machine that can trail the answer.
    server.wait_for_log(r'"request_id": "e2e-42"')
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("request_id") == "e2e-42"]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["path"] == "/ner"
    assert "queue_ms" in mine[0] and "inference_ms" in mine[0]
