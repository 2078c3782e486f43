"""Careless and hostile requests: each gets a 4xx JSON error naming the limit and the value received.

Nothing a client sends may crash the service or leak its internals: every answer below is the contract's
`{"error", "error_type"}` object with the contract's status, carries the request id, and holds no stack
trace. Long inputs that fit the body limit are served (truncated as the pipeline truncates), not timed out.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
from compare import assert_matches_pipeline
from fastapi.testclient import TestClient

from service.app import JsonLogFormatter, create_app
from service.runtime import Runtime
from service.settings import Settings

JSON = {"Content-Type": "application/json"}
QA = {"question": "Where did she work?", "context": "Marie Curie worked in Paris."}
# What must never reach a client: the interpreter's traces and the server's files.
LEAKS = ("Traceback", 'File "', "site-packages", "/service/", "Exception(")


def raw(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def assert_error(response, status: int, error_type: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"], f"{fragment!r} not in {body['error']!r}"
    assert not any(leak in response.text for leak in LEAKS), response.text
    return body


# id -> (path, body (JSON-able or raw bytes), extra headers, status, error_type, fragments of the message).
# The fragments name what is wrong, the limit, and the value received.
BAD_REQUESTS = {
    "invalid-json": ("/classify", b'{"inputs": ', {}, 422, "validation_error", ["not valid JSON"]),
    "empty-body": ("/classify", b"", {}, 422, "validation_error", ["body is empty"]),
    "body-not-an-object": ("/ner", [1, 2], {}, 422, "validation_error", ["(got [1, 2])"]),
    "null-body": ("/ner", None, {}, 422, "validation_error", ["(got None)"]),
    "null-inputs": ("/classify", {"inputs": None}, {}, 422, "validation_error", ["inputs", "(got None)"]),
    "inputs-wrong-type": ("/ner", {"inputs": 3}, {}, 422, "validation_error", ["inputs", "(got 3)"]),
    "nested-list": ("/ner", {"inputs": [["a"]]}, {}, 422, "validation_error", ["inputs", "(got ['a'])"]),
    "qa-inputs-a-string": (
        "/qa",
        {"inputs": "who?"},
        {},
        422,
        "validation_error",
        ["inputs", "(got 'who?')"],
    ),
    "top_k-a-string": (
        "/classify",
        {"inputs": "a film", "parameters": {"top_k": "3"}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "(got '3')"],
    ),
    "top_k-a-float": (
        "/fill-mask",
        {"inputs": "a [MASK]", "parameters": {"top_k": 1.5}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "(got 1.5)"],
    ),
    "top_k-null-for-qa": (
        "/qa",
        {"inputs": QA, "parameters": {"top_k": None}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "(got None)"],
    ),
    "parameters-null": (
        "/ner",
        {"inputs": "a", "parameters": None},
        {},
        422,
        "validation_error",
        ["(got None)"],
    ),
    "unknown-field": ("/ner", {"inputs": "a", "foo": 1}, {}, 422, "validation_error", ["foo", "(got 1)"]),
    "misspelt-parameter": (
        "/ner",
        {"inputs": "a", "parameters": {"aggregation": "simple"}},
        {},
        422,
        "validation_error",
        ["parameters.aggregation", "(got 'simple')"],
    ),
    "empty-text": ("/ner", {"inputs": ""}, {}, 422, "invalid_input", ["inputs", "(got 0 characters)"]),
    "whitespace-only-text": (
        "/classify",
        {"inputs": " \n\t "},
        {},
        422,
        "invalid_input",
        ["whitespace-only", "(got 4 characters)"],
    ),
    "unicode-whitespace-text": (
        "/fill-mask",
        {"inputs": "\u3000\u00a0\u2003"},
        {},
        422,
        "invalid_input",
        ["whitespace-only", "(got 3 characters)"],
    ),
    "empty-item-in-a-list": ("/ner", {"inputs": ["fine", "  "]}, {}, 422, "invalid_input", ["inputs[1]"]),
    "empty-list": ("/classify", {"inputs": []}, {}, 422, "invalid_input", ["empty list"]),
    "empty-text-pair": (
        "/classify",
        {"inputs": {"text": "a", "text_pair": ""}},
        {},
        422,
        "invalid_input",
        ["inputs.text_pair", "(got 0 characters)"],
    ),
    "no-mask-token": ("/fill-mask", {"inputs": "no mask here"}, {}, 422, "invalid_input", ["[MASK]"]),
    "top_k-zero": (
        "/fill-mask",
        {"inputs": "a [MASK]", "parameters": {"top_k": 0}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "greater than or equal to 1", "(got 0)"],
    ),
    "top_k-negative": (
        "/classify",
        {"inputs": "a", "parameters": {"top_k": -3}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "(got -3)"],
    ),
    "top_k-huge": (
        "/qa",
        {"inputs": QA, "parameters": {"top_k": 100_000}},
        {},
        422,
        "validation_error",
        ["parameters.top_k", "at most 1000", "got 100000"],
    ),
    "top_k-beyond-int64": (
        "/fill-mask",
        {"inputs": "a [MASK]", "parameters": {"top_k": 10**30}},
        {},
        422,
        "validation_error",
        ["at most 1000", f"got {10**30}"],
    ),
    "unknown-aggregation-strategy": (
        "/ner",
        {"inputs": "Anna lives in Rome.", "parameters": {"aggregation_strategy": "median"}},
        {},
        422,
        "validation_error",
        ["parameters.aggregation_strategy", "'simple'", "(got 'median')"],
    ),
    "unknown-function_to_apply": (
        "/classify",
        {"inputs": "a", "parameters": {"function_to_apply": "relu"}},
        {},
        422,
        "validation_error",
        ["function_to_apply", "(got 'relu')"],
    ),
    "too-many-targets": (
        "/fill-mask",
        {"inputs": "a [MASK]", "parameters": {"targets": ["paris"] * 101}},
        {},
        422,
        "validation_error",
        ["101 items", "limit is 100"],
    ),
    "empty-target": (
        "/fill-mask",
        {"inputs": "a [MASK]", "parameters": {"targets": ["paris", " "]}},
        {},
        422,
        "invalid_input",
        ["parameters.targets[1]"],
    ),
    "empty-question": (
        "/qa",
        {"inputs": {"question": "", "context": "Paris."}},
        {},
        422,
        "invalid_input",
        ["inputs.question", "(got 0 characters)"],
    ),
    "whitespace-context": (
        "/qa",
        {"inputs": [QA, {"question": "who?", "context": "   "}]},
        {},
        422,
        "invalid_input",
        ["inputs[1].context", "(got 3 characters)"],
    ),
    "qa-max_seq_len-over-the-model": (
        "/qa",
        {"inputs": QA, "parameters": {"max_seq_len": 100_000}},
        {},
        422,
        "invalid_input",
        ["max_seq_len", "got 100000"],
    ),
    "qa-doc_stride-over-max_seq_len": (
        "/qa",
        {"inputs": QA, "parameters": {"doc_stride": 1000}},
        {},
        422,
        "invalid_input",
        ["doc_stride", "got 1000"],
    ),
    "ner-stride-over-the-window": (
        "/ner",
        {"inputs": "Anna lives in Rome.", "parameters": {"stride": 100_000}},
        {},
        422,
        "invalid_input",
        ["stride", "100000"],
    ),
    "invalid-utf-8": ("/classify", b'{"inputs": "\xff\xfe"}', {}, 422, "validation_error", ["UTF-8", "0xff"]),
    "raw-control-character": (
        "/ner",
        b'{"inputs": "a\x01b"}',
        {},
        422,
        "validation_error",
        ["not valid JSON", "control character"],
    ),
    "escaped-control-character": (
        "/ner",
        {"inputs": "a\x01b"},
        {},
        422,
        "invalid_input",
        ["U+0001", "position 1"],
    ),
    "escaped-nul-in-a-question": (
        "/qa",
        {"inputs": {"question": "who\x00?", "context": "Paris."}},
        {},
        422,
        "invalid_input",
        ["inputs.question", "U+0000", "position 3"],
    ),
    "lone-surrogate": ("/classify", b'{"inputs": "a\\ud800b"}', {}, 422, "invalid_input", ["U+D800"]),
    "deeply-nested-json": (
        "/classify",
        b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        {},
        422,
        "validation_error",
        ["nests", "too deeply"],
    ),
    "integer-of-5000-digits": (
        "/classify",
        b'{"inputs": "a", "parameters": {"top_k": ' + b"9" * 5000 + b"}}",
        {},
        422,
        "validation_error",
        ["too many digits"],
    ),
    "form-encoded-body": (
        "/classify",
        b"inputs=hello",
        {"Content-Type": "application/x-www-form-urlencoded"},
        422,
        "validation_error",
        ["Content-Type: application/json", "inputs=hello"],
    ),
    "request-timeout-not-a-number": (
        "/ner",
        {"inputs": "a"},
        {"X-Request-Timeout": "soon"},
        422,
        "validation_error",
        ["X-Request-Timeout", "(got 'soon')"],
    ),
    "request-timeout-negative": (
        "/ner",
        {"inputs": "a"},
        {"X-Request-Timeout": "-1"},
        422,
        "validation_error",
        ["X-Request-Timeout", "greater than 0", "(got '-1')"],
    ),
    "request-timeout-nan": (
        "/ner",
        {"inputs": "a"},
        {"X-Request-Timeout": "nan"},
        422,
        "validation_error",
        ["X-Request-Timeout", "(got 'nan')"],
    ),
    "list-over-the-limit": (
        "/ner",
        {"inputs": ["Anna"] * 65},
        {},
        413,
        "payload_too_large",
        ["65 items", "limit is 64"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_named_4xx_error(client, case):
    path, body, headers, status, error_type, fragments = BAD_REQUESTS[case]
    response = client.post(path, content=raw(body), headers={**JSON, **headers})
    assert_error(response, status, error_type, *fragments)


def test_the_service_still_answers_after_every_bad_request(client, pipelines):
    # A bad request leaves nothing behind: the same connection pool gets a correct answer next.
    for path, body, headers, *_ in BAD_REQUESTS.values():
        client.post(path, content=raw(body), headers={**JSON, **headers})
    response = client.post("/classify", json={"inputs": "Marie Curie worked in Paris."})
    assert response.status_code == 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pipelines["classify"]("Marie Curie worked in Paris.", top_k=None)
    assert_matches_pipeline(response.json(), expected)


def test_tab_and_newline_are_text_not_control_characters(client):
    response = client.post("/ner", json={"inputs": "Anna\tlives in\nRome.\r\n"})
    assert response.status_code == 200, response.text


# --- sizes ------------------------------------------------------------------------------------------------


def test_body_over_the_limit_is_refused_by_its_content_length(client, runtime):
    limit = runtime.settings.max_body_bytes
    body = raw({"inputs": "a " * (3 * limit // 2)})  # about 3 MB of text
    chunk = 65536
    sent: list[int] = []

    def stream():  # the body, handed over only as the server reads it
        for start in range(0, len(body), chunk):
            sent.append(start)
            yield body[start : start + chunk]

    response = client.post("/classify", content=stream(), headers={**JSON, "Content-Length": str(len(body))})
    assert_error(response, 413, "payload_too_large", f"limit of {limit} bytes", f"Content-Length {len(body)}")
    assert sent == [], "the server read the body of a request it refused by its Content-Length"
    # The control: the same body within the limit is read.
    small = raw({"inputs": "Marie Curie worked in Paris."})
    body, sent = small, []
    response = client.post("/classify", content=stream(), headers={**JSON, "Content-Length": str(len(small))})
    assert response.status_code == 200 and sent == [0], response.text


def test_chunked_body_over_the_limit_is_refused_while_reading(client, runtime):
    limit = runtime.settings.max_body_bytes
    chunk = b" " * 65536

    def stream():  # no Content-Length: the body arrives in chunks and is counted as it comes
        yield b'{"inputs": "'
        for _ in range(4 * limit // len(chunk)):
            yield chunk
        yield b'"}'

    response = client.post("/classify", content=stream(), headers=JSON)
    assert_error(response, 413, "payload_too_large", f"limit of {limit} bytes", "at least")


def test_text_just_under_the_body_limit_is_served_truncated(client, pipelines, runtime):
    # About a million characters: tokenized and truncated to the model's length, as the pipeline does.
    sentence = "Marie Curie worked in Paris and taught at the university"
    words = sentence.split()
    budget = runtime.settings.max_body_bytes - 100
    text = " ".join(words[i % len(words)] for i in range(budget // 6))
    assert 900_000 < len(raw({"inputs": text})) < runtime.settings.max_body_bytes
    response = client.post("/classify", json={"inputs": text})  # (its speed is the benchmark's business)
    assert response.status_code == 200, response.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pipelines["classify"](text, top_k=None, truncation=True)
    assert_matches_pipeline(response.json(), expected)
    # The other truncating endpoints serve it too.
    assert client.post("/ner", json={"inputs": text}).status_code == 200
    assert client.post("/fill-mask", json={"inputs": "[MASK] " + text}).status_code == 200


def test_context_needing_more_windows_than_the_queue_holds_is_413_not_429(client, runtime):
    # /qa slides windows over any context; a megabyte of context is more windows than the whole queue
    # holds, so retrying (what 429 asks for) could never succeed.
    limit = runtime.settings.max_queue_sequences
    context = "word " * (runtime.settings.max_body_bytes // 20)  # 260 KB; windows of ~10 new tokens each
    response = client.post(
        "/qa",
        json={
            "inputs": {"question": "which word?", "context": context},
            "parameters": {"max_seq_len": 32, "doc_stride": 16},
        },
    )
    body = assert_error(response, 413, "payload_too_large", f"the limit is {limit}", "max_queue_sequences")
    assert "Retry-After" not in response.headers, body


# --- routing and lifecycle errors ---------------------------------------------------------------------------


def test_unknown_path_and_wrong_method_are_json_errors(client):
    assert_error(client.get("/nope"), 404, "not_found", "GET /nope")
    assert_error(client.get("/classify"), 405, "method_not_allowed", "GET /classify")
    assert_error(client.put("/health"), 405, "method_not_allowed", "PUT /health")


def test_endpoint_without_a_model_is_404_naming_the_variable():
    settings = Settings(
        classify_model="", fill_mask_model="", qa_model="", ner_model="", compilation_cache_dir=""
    )
    with TestClient(create_app(settings, start_runtime=False)) as test_client:
        response = test_client.post("/ner", json={"inputs": "Anna lives in Rome."})
    assert_error(response, 404, "not_found", "/ner", "ALBERT_NER_MODEL")


def test_not_ready_is_503_with_retry_after(service_repos):
    # A runtime that was never started: its models are still waiting to load.
    settings = Settings(
        classify_model=str(service_repos["classify"][0]),
        fill_mask_model="",
        qa_model="",
        ner_model="",
        compilation_cache_dir="",
    )
    with TestClient(create_app(settings, runtime=Runtime(settings), start_runtime=False)) as test_client:
        response = test_client.post("/classify", json={"inputs": "a"})
        assert test_client.get("/ready").status_code == 503
    assert_error(response, 503, "unavailable", "model 'classify' is not ready yet: loading")
    assert int(response.headers["retry-after"]) > 0


# --- internal failures: answered, logged, never leaked ------------------------------------------------------


class _BrokenTask:
    """Delegates pre-processing to the real task, then fails in post-processing with internals in the message."""

    def __init__(self, task):
        self.task = task

    def prepare(self, items, params):
        return self.task.prepare(items, params)

    def finish(self, prepared, outputs):
        raise RuntimeError("secret detail from /srv/service/tasks/classify.py line 42")


@pytest.fixture
def lenient_client(runtime):
    # raise_server_exceptions=False: the client sees what a real client would, not the re-raised exception.
    app = create_app(runtime.settings, runtime=runtime, start_runtime=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_a_failing_task_is_a_json_500_without_internals(lenient_client, runtime, monkeypatch, caplog):
    monkeypatch.setitem(runtime.tasks, "classify", _BrokenTask(runtime.tasks["classify"]))
    with caplog.at_level(logging.ERROR):
        response = lenient_client.post("/classify", json={"inputs": "a"}, headers={"X-Request-ID": "boom-1"})
    body = assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "RuntimeError" not in response.text, body
    assert response.headers["x-request-id"] == "boom-1"
    # The details go to the log, under the request id.
    logged = [r for r in caplog.records if r.exc_info and "boom-1" in r.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


def test_a_failing_forward_pass_is_a_json_500_without_internals(lenient_client, runtime, monkeypatch):
    def explode(sequences, plan=None):
        raise MemoryError("device out of memory at 0x7f3a secret")

    monkeypatch.setattr(runtime.runners["ner"], "run", explode)
    response = lenient_client.post("/ner", json={"inputs": "Anna lives in Rome."})
    assert_error(response, 500, "internal_error")
    assert "secret" not in response.text and "0x7f3a" not in response.text
    monkeypatch.undo()
    # The worker survived its failed batch.
    assert lenient_client.post("/ner", json={"inputs": "Anna lives in Rome."}).status_code == 200


# --- request ids and structured logs ------------------------------------------------------------------------


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(client):
    assert client.get("/health", headers={"X-Request-ID": "client-7.a:b_c"}).headers["x-request-id"] == (
        "client-7.a:b_c"
    )
    for hostile in [b"a b", b"x" * 200, b"\xc3\xa9t\xc3\xa9", b"<script>", b"a\x7f"]:
        echoed = client.get("/health", headers=[(b"X-Request-ID", hostile)]).headers["x-request-id"]
        assert echoed.encode() != hostile
        assert echoed.isalnum() and len(echoed) == 32  # a fresh id
    first, second = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert first != second


def test_one_json_log_line_per_request_with_its_id(client, caplog):
    requests = [
        ("ok", lambda rid: client.post("/ner", json={"inputs": "Anna lives in Rome."}, headers=rid)),
        ("invalid", lambda rid: client.post("/ner", content=b"{", headers={**JSON, **rid})),
        ("too-large", lambda rid: client.post("/ner", json={"inputs": ["a"] * 65}, headers=rid)),
        ("health", lambda rid: client.get("/health", headers=rid)),
    ]
    formatter = JsonLogFormatter()
    with caplog.at_level(logging.INFO, logger="albert_serve.access"):
        for name, send in requests:
            response = send({"X-Request-ID": f"log-{name}"})
            assert response.headers["x-request-id"] == f"log-{name}"
    for name, _ in requests:
        mine = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == f"log-{name}"]
        assert len(mine) == 1, (name, mine)
        line = formatter.format(mine[0])
        assert "\n" not in line
        entry = json.loads(line)
        assert {"ts", "level", "request_id", "method", "path", "status", "latency_ms"} <= set(entry)
    statuses = {
        r.fields["request_id"]: r.fields["status"]
        for r in caplog.records
        if getattr(r, "fields", {}).get("request_id", "").startswith("log-")
    }
    assert statuses == {"log-ok": 200, "log-invalid": 422, "log-too-large": 413, "log-health": 200}
