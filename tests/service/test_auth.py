"""Optional API keys: with keys configured, task endpoints need `Authorization: Bearer <key>`.

Health, readiness and the other operations endpoints stay open (probes and scrapers carry no keys). The
session runtime is served with keys by swapping its settings for the length of one test.
"""

from __future__ import annotations

import hmac

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

KEYS = ["key-one-4f9c2e", "key-two-b81e7a"]
REQUESTS = {
    "/classify": {"inputs": "Marie Curie worked in Paris."},
    "/fill-mask": {"inputs": "Paris is the [MASK] of France."},
    "/qa": {"inputs": {"question": "Where did she work?", "context": "Marie Curie worked in Paris."}},
    "/ner": {"inputs": "Marie Curie worked in Paris."},
}


def with_keys(runtime, monkeypatch) -> TestClient:
    """A client of the session runtime with KEYS configured (until the test ends)."""
    monkeypatch.setattr(runtime, "settings", runtime.settings.model_copy(update={"api_keys": KEYS}))
    return TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False))


@pytest.fixture
def keyed(runtime, monkeypatch):
    with with_keys(runtime, monkeypatch) as test_client:
        yield test_client


def assert_unauthorized(response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "unauthorized"
    assert not any(key in response.text for key in KEYS)


@pytest.mark.parametrize("path", list(REQUESTS))
def test_task_endpoints_need_a_key(keyed, path):
    assert_unauthorized(keyed.post(path, json=REQUESTS[path]))


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer wrong-key",
        b"Bearer key-one-4f9c2",  # a prefix of a key
        b"Bearer key-one-4f9c2eX",  # a key plus a character
        b"Bearer KEY-ONE-4F9C2E",  # keys are case-sensitive
        b"Bearer key-one-4f9c2e,key-two-b81e7a",
        b"Bearer",
        b"Bearer    ",
        b"key-one-4f9c2e",  # no scheme
        b"Token key-one-4f9c2e",
        b"Basic a2V5LW9uZS00ZjljMmU6",
        b"Bearer \xff\xfe\x00",  # not UTF-8: still a 401, never a 500
    ],
)
def test_wrong_or_malformed_credentials_are_401(keyed, header):
    assert_unauthorized(keyed.post("/ner", json=REQUESTS["/ner"], headers=[(b"Authorization", header)]))


def test_the_key_is_checked_before_the_request_is_validated(keyed):
    # An unauthenticated client learns nothing about the request schema.
    assert_unauthorized(keyed.post("/ner", json={"inputs": 3, "parameters": {"top_k": "x"}}))


@pytest.mark.parametrize("path", list(REQUESTS))
def test_each_configured_key_is_accepted_and_the_answer_is_unchanged(runtime, client, monkeypatch, path):
    expected = client.post(path, json=REQUESTS[path])  # before the keys are configured
    assert expected.status_code == 200
    with with_keys(runtime, monkeypatch) as keyed:
        for key, scheme in zip(KEYS, ["Bearer", "bearer"], strict=True):
            response = keyed.post(path, json=REQUESTS[path], headers={"Authorization": f"{scheme} {key}"})
            assert response.status_code == 200, response.text
            assert response.json() == expected.json()


@pytest.mark.parametrize("path", ["/health", "/ready", "/info", "/metrics", "/openapi.json", "/docs"])
def test_operations_endpoints_stay_open(keyed, path):
    assert keyed.get(path).status_code == 200


def test_every_key_is_compared_in_constant_time(keyed, monkeypatch):
    # hmac.compare_digest against every configured key, even after a match: neither the key nor which
    # key matched shows in the timing.
    compared = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    response = keyed.post("/ner", json=REQUESTS["/ner"], headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert response.status_code == 200
    assert sorted(compared) == sorted(key.encode() for key in KEYS)


def test_keys_come_from_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("ALBERT_API_KEYS", " alpha, beta,, gamma ")
    assert Settings().api_keys == ["alpha", "beta", "gamma"]
    monkeypatch.setenv("ALBERT_API_KEYS", "")
    assert Settings().api_keys == []  # empty: auth is off


def test_without_keys_no_header_is_needed(client):
    assert client.post("/ner", json=REQUESTS["/ner"]).status_code == 200
