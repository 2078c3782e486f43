"""What a new user sees first: --help, the messages for a missing hub and a body that is not JSON."""

from __future__ import annotations

import logging

import pytest

from service.settings import Settings, build_parser


def test_help_lists_every_flag_with_its_default_and_choices():
    text = build_parser().format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text and Settings.env_name(name) in text
    flat = " ".join(text.split())
    assert "--dtype {float32,bfloat16,float16,auto}" in flat
    assert "Choices: float32, bfloat16, float16, auto. Default: float32." in flat
    assert "--log-level {debug,info,warning,error}" in flat
    assert "Default: 8000." in flat and "Default: 1,2,4,6,8,12,16." in flat
    assert "Default: true." in flat  # strict readiness
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dtype", "int8"])


def test_an_unreachable_hub_is_one_clear_line(monkeypatch, caplog, tmp_path):
    """The hub client's nested MaxRetryError(...) never reaches the log or the model's reason."""
    import huggingface_hub.constants as hub_constants
    import requests
    from huggingface_hub import configure_http_backend
    from huggingface_hub.utils._http import _default_backend_factory

    from model.errors import SourceNotFoundError
    from model.hub import resolve_source

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        hub_constants, "ENDPOINT", "http://127.0.0.1:9"
    )  # nothing listens on the discard port
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    configure_http_backend(requests.Session)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SourceNotFoundError) as caught:
            resolve_source("someone/missing-model")
    finally:
        configure_http_backend(_default_backend_factory)
    message = str(caught.value)
    assert "someone/missing-model" in message and "cannot connect" in message
    assert "MaxRetryError" not in message and "HTTPConnectionPool" not in message
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("MaxRetryError" in r.getMessage() for r in loud), [r.getMessage() for r in loud]


def test_a_body_that_is_not_json_is_explained_in_plain_words(client):
    response = client.post(
        "/classify", content=b"inputs=hello", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert "Content-Type: application/json" in error and "application/x-www-form-urlencoded" in error
    assert "b'" not in error and "12 bytes" in error
