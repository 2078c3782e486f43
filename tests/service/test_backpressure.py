"""Backpressure, deadlines and disconnects, against a real uvicorn server whose device we can hold.

A runtime of its own (one NER model, a queue of 4 sequences) is served by uvicorn on a real socket, in a
thread of the test process, so that its runner can be wrapped: the `Gate` records every sequence the
device is given and holds the device until the test opens it. With the device held, requests pile up in
the queue, and the tests check what the contract promises: 429 with Retry-After when the queue is full,
504 when a deadline passes (and the expired work never reaches the device), and a client that hangs up
has its queued work dropped. The gate's record is checked to hold the requests that did run, so that
"never reached the device" means something.

Nothing here is timed against a threshold: that an answer came early (a 429 at once, a 504 at the deadline,
a 499 on disconnect) is shown by its arriving while the device is still held.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.ner import NERParams
from tests.service.support import free_port

QUEUE_LIMIT = 4
# Far longer than any hold below, so that only the requests meant to expire do (a request that waited for it
# instead of being answered early would fail its test by its status, not by a clock).
DEFAULT_TIMEOUT_S = 120.0


class Gate:
    """Wraps a runner's `run`: records each sequence the device is given, and holds it while closed."""

    def __init__(self, run):
        self._run = run
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()
        self.seen: list[tuple[int, ...]] = []

    def close(self) -> None:
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def __call__(self, sequences, plan=None):
        with self._lock:
            self.seen.extend(tuple(int(t) for t in s.input_ids) for s in sequences)
        self.entered.set()
        if not self._open.wait(300):
            raise TimeoutError("the test never opened the gate")
        return self._run(sequences, plan)

    def ran(self, ids: list[tuple[int, ...]]) -> bool:
        with self._lock:
            return any(sequence in self.seen for sequence in ids)


@pytest.fixture(scope="module")
def held(service_repos):
    settings = Settings(
        classify_model="",
        fill_mask_model="",
        qa_model="",
        ner_model=str(service_repos["ner"][0]),
        seq_buckets=[32],
        batch_seq_buckets=[32],
        batch_buckets=[1, 4],
        max_batch_tokens=128,
        compilation_cache_dir="",
        max_queue_sequences=QUEUE_LIMIT,
        request_timeout_s=DEFAULT_TIMEOUT_S,
    )
    runtime = Runtime(settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    gate = Gate(runtime.runners["ner"].run)
    runtime.runners["ner"].run = gate  # this runtime's runner only: the session runtime is untouched

    app = create_app(settings, runtime=runtime, start_runtime=False)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn did not start")
    try:
        yield SimpleNamespace(runtime=runtime, gate=gate, url=f"http://127.0.0.1:{port}", port=port)
    finally:
        gate.open()
        server.should_exit = True
        thread.join(10)
        runtime.stop()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as executor:
        yield executor


@pytest.fixture
def device(held, pool):
    """The gate, open again (and the queue empty) after each test, whatever happened in it. (It depends on
    `pool` so that it is torn down first: the pool's threads may be waiting for the gate.)"""
    yield held.gate
    held.gate.open()
    wait_until(lambda: held.runtime.batcher.queued_sequences == 0, 30, "the queue did not drain")


def wait_until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


def post(url: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/ner", json=body, headers=headers or {}, timeout=60)


def token_ids(held, *texts: str) -> list[tuple[int, ...]]:
    """The sequences the device would be given for these texts (as the service prepares them)."""
    params = NERParams(aggregation_strategy="simple", ignore_labels=("O",), stride=None)
    prepared = held.runtime.tasks["ner"].prepare(list(texts), params)
    return [tuple(int(t) for t in s.input_ids) for s in prepared.model_inputs]


def hold_the_device(held, device, pool, text: str = "Anna holds the device.", headers: dict | None = None):
    """Close the gate and send one request that the worker takes and holds; returns its future."""
    device.close()
    blocker = pool.submit(post, held.url, {"inputs": text}, headers)
    assert device.entered.wait(30), "the worker never took the blocking request"
    return blocker


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"], f"{fragment!r} not in {body['error']!r}"
    return body


def count(held, path: str, status: int) -> float:
    value = held.runtime.metrics.registry.get_sample_value(
        "albert_requests_total", {"endpoint": path, "status": str(status)}
    )
    return value or 0.0


# --- a full queue ------------------------------------------------------------------------------------------


def test_full_queue_is_429_with_retry_after_and_the_queued_work_is_served(held, device, pool):
    blocker = hold_the_device(held, device, pool)
    texts = ["Anna lives in Rome.", "George works in Paris.", "Maria visited Tokyo.", "Peter met Linda."]
    queued = pool.submit(post, held.url, {"inputs": texts})
    wait_until(lambda: held.runtime.batcher.queued_sequences == QUEUE_LIMIT, 30, "the list was not queued")

    refused = post(held.url, {"inputs": "One more request."})
    # Refused at once: it was answered while the device was still held (waiting for room would have meant
    # waiting for the gate, which only this test opens, below).
    assert not device._open.is_set()
    assert_error(refused, 429, "overloaded", f"limit {QUEUE_LIMIT}", f"{QUEUE_LIMIT} sequences waiting")
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-request-id"]

    device.open()
    assert blocker.result().status_code == 200
    answers = queued.result()
    assert answers.status_code == 200 and len(answers.json()) == len(texts)
    assert device.ran(token_ids(held, *texts)), "the gate did not record the queued list that ran"
    assert not device.ran(token_ids(held, "One more request.")), "a refused request reached the device"
    # The refusal was about load: once the queue has room, the same request is served, and recorded.
    assert post(held.url, {"inputs": "One more request."}).status_code == 200
    assert device.ran(token_ids(held, "One more request."))


# --- deadlines ---------------------------------------------------------------------------------------------


def test_deadline_passing_in_the_queue_is_504_and_the_work_never_runs(held, device, pool):
    blocker = hold_the_device(held, device, pool)
    text = "Linda waits in the queue of Madrid."
    start = time.monotonic()
    expired = post(held.url, {"inputs": text}, {"X-Request-Timeout": "0.4"})
    assert time.monotonic() - start >= 0.4, "answered before its deadline"
    assert_error(expired, 504, "deadline_exceeded", "deadline")
    assert not device._open.is_set()  # answered at its deadline, not when the device let go

    device.open()
    assert blocker.result().status_code == 200
    assert post(held.url, {"inputs": "A later request."}).status_code == 200  # queued after it, served
    assert device.ran(token_ids(held, "A later request.")), "the gate did not record a request that ran"
    assert not device.ran(token_ids(held, text)), "an expired request reached the device"


def test_deadline_passing_on_the_device_is_504_on_time(held, device, pool):
    # The forward pass holding the request outlasts its deadline: the client is answered at the deadline,
    # not when the device lets go.
    blocker = hold_the_device(held, device, pool, headers={"X-Request-Timeout": "0.4"})
    response = blocker.result(timeout=DEFAULT_TIMEOUT_S / 2)  # bounds a hang only
    assert_error(response, 504, "deadline_exceeded")
    assert not device._open.is_set(), "the device was released before the 504"
    device.open()
    assert post(held.url, {"inputs": "Anna is served again."}).status_code == 200


def test_default_deadline_applies_and_caps_longer_requested_ones(held, device, pool, monkeypatch):
    default = 0.5
    blocker = hold_the_device(held, device, pool)  # first: the blocker itself keeps the long default
    monkeypatch.setattr(
        held.runtime, "settings", held.runtime.settings.model_copy(update={"request_timeout_s": default})
    )
    for headers in [None, {"X-Request-Timeout": "60"}]:  # no deadline asked for; one above the default
        start = time.monotonic()
        response = post(held.url, {"inputs": "Peter waits behind the blocker."}, headers)
        assert time.monotonic() - start >= default, headers
        assert_error(response, 504, "deadline_exceeded", f"{default:g}s default")
        # At the default, not at the 60 s asked for (nor when the device lets go): the device is still held.
        assert not device._open.is_set()
    device.open()
    assert blocker.result().status_code == 200


def test_deadline_shorter_than_tokenization_is_504(held):
    response = post(held.url, {"inputs": "Anna lives in Rome."}, {"X-Request-Timeout": "1e-9"})
    assert_error(response, 504, "deadline_exceeded", "tokenization")


# --- disconnects -------------------------------------------------------------------------------------------


def test_a_client_that_disconnects_has_its_queued_work_dropped(held, device, pool):
    blocker = hold_the_device(held, device, pool)
    text = "Thomas hangs up before his answer."
    body = json.dumps({"inputs": text}).encode()
    before = count(held, "/ner", 499)
    before_504 = count(held, "/ner", 504)

    with socket.create_connection(("127.0.0.1", held.port), timeout=10) as sock:
        sock.sendall(
            b"POST /ner HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: held.runtime.batcher.queued_sequences == 1, 30, "the request was not queued")
    # The server notices through uvicorn's http.disconnect: 499, not the 504 its deadline would give, and
    # while the device is still held.
    wait_until(lambda: count(held, "/ner", 499) == before + 1, 60, "the disconnect was not noticed")
    assert count(held, "/ner", 504) == before_504
    assert not device._open.is_set()

    device.open()
    assert blocker.result().status_code == 200
    assert post(held.url, {"inputs": "A later request."}).status_code == 200
    assert not device.ran(token_ids(held, text)), "a disconnected client's work reached the device"


# --- the gate itself ---------------------------------------------------------------------------------------


def test_the_gate_records_exactly_the_sequences_that_ran(held, device):
    # The control for every "never reached the device" above: a request that did run is in the record, as
    # the token ids `token_ids` computes, and one that never ran is not.
    served = ["Georgia runs the control in Lisbon.", "Two sentences here. And a second one in Oslo."]
    assert post(held.url, {"inputs": served}).status_code == 200
    assert all(device.ran([ids]) for ids in token_ids(held, *served))
    assert not device.ran(token_ids(held, "Nobody ever sent this sentence to Quito."))
