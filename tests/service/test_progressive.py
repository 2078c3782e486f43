"""Progressive readiness: a model is ready once a few covering buckets are compiled; the rest of its grid
compiles in the background and the batcher uses each bucket as it lands; no request ever compiles."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.engine import Bucket, covering_buckets
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SMALL_GRID

# A backbone of its own (three layers) and a grid of many single-row lengths: compiling all of it takes a
# while, so the model is ready long before its grid is complete.
THREE_LAYERS = dict(num_hidden_layers=3, num_hidden_groups=1, inner_group_num=1)
WIDE_GRID = {**SMALL_GRID, "seq_buckets": list(range(6, 161, 2))}


class CompileWatch:
    """Records the thread of every compilation (tracing, lowering, XLA compile, persistent-cache reads)."""

    def __init__(self):
        self.threads: list[str] = []
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, seconds: float, **kwargs) -> None:
        if "compil" in event or "trace" in event or "lower" in event:
            with self._lock:
                self.threads.append(threading.current_thread().name)

    def outside_compilers(self, since: int) -> list[str]:
        with self._lock:
            return [t for t in self.threads[since:] if not t.startswith(("compile", "grid", "start-up"))]


WATCH = CompileWatch()


@pytest.fixture(scope="module")
def progressive(make_repo):
    repos = {
        "classify": make_repo("sequence-classification", seed=11, **THREE_LAYERS)[0],
        "ner": make_repo("token-classification", seed=12, **THREE_LAYERS)[0],
    }
    settings = Settings(
        **WIDE_GRID,
        classify_model=str(repos["classify"]),
        ner_model=str(repos["ner"]),
        fill_mask_model="",
        qa_model="",
    )
    runtime = Runtime(settings)
    start = time.monotonic()
    runtime.start(background=True)
    assert runtime.wait_ready(300)
    ready_after = time.monotonic() - start
    assert not runtime.failed, runtime.failed
    with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
        yield runtime, client, ready_after
    runtime.stop()


def test_ready_before_the_grid_is_complete(progressive):
    runtime, client, _ = progressive
    # Checked first thing after ready: the background has only just begun.
    assert runtime.ready
    served = runtime.models["classify"]
    assert served.state == "ready"
    assert served.compiled < served.total
    assert not served.grid.grid_complete
    assert client.get("/ready").status_code == 200
    info = client.get("/info").json()["models"]["classify"]
    assert info["grid"]["programs"] == served.total and not info["grid"]["complete"]
    assert len(info["compiled_buckets"]) < len(info["buckets"])
    # The covering buckets are there: one row of the maximum length among them.
    cover = covering_buckets(served.grid.buckets)
    assert Bucket(1, 160) in cover and len(cover) <= 7
    assert set(cover) <= set(served.grid.packer.buckets)


def test_requests_while_the_grid_compiles_never_compile(progressive):
    runtime, client, _ = progressive
    rng = random.Random(1)
    words = ["the", "city", "river", "anna", "works", "in", "paris", "and", "of", "london"]
    bodies = []
    for n in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]:
        text = " ".join(rng.choice(words) for _ in range(n))
        bodies += [("/classify", {"inputs": text}), ("/ner", {"inputs": text})]
    bodies.append(
        ("/classify", {"inputs": [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(30)]})
    )
    since = len(WATCH.threads)
    seen_partial = False

    def send(request):
        path, body = request
        return client.post(path, json=body).status_code

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            seen_partial |= not runtime.models["classify"].grid.grid_complete
            statuses = list(pool.map(send, bodies))
            assert all(s == 200 for s in statuses), statuses
    assert seen_partial, "the grid was complete before any request: nothing tested"
    # Compiles did happen meanwhile, on the background's threads only.
    assert WATCH.outside_compilers(since) == []


def test_the_grid_completes_and_the_packer_uses_every_bucket(progressive):
    runtime, client, _ = progressive
    deadline = time.monotonic() + 900  # a hang guard only: the two cores may be shared with other work
    while not runtime.grid_complete:
        assert time.monotonic() < deadline, runtime.models["classify"].grid_progress()
        time.sleep(0.2)
    for name in ("classify", "ner"):
        served = runtime.models[name]
        assert served.compiled == served.total
        assert served.grid.packer.buckets == sorted(served.grid.buckets)
        # Every bucket's cost is measured, and the packer plans with the measured costs.
        assert all(b in served.grid.main.seconds for b in served.grid.buckets)
    info = client.get("/info").json()["models"]["classify"]
    assert info["grid"]["complete"] and info["compiled_buckets"] == info["buckets"]
    metrics = client.get("/metrics").text
    compiled = [line for line in metrics.splitlines() if line.startswith("albert_model_programs")]
    values = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in compiled}
    classify = {k: v for k, v in values.items() if 'model="classify"' in k}
    assert len(set(classify.values())) == 1, classify  # compiled == total
    assert client.post("/classify", json={"inputs": "the city"}).status_code == 200


def test_stop_ends_background_compiles_promptly(make_repo):
    repo = make_repo(
        "token-classification", seed=13, num_hidden_layers=5, num_hidden_groups=1, inner_group_num=1
    )
    settings = Settings(
        **WIDE_GRID, ner_model=str(repo[0]), classify_model="", fill_mask_model="", qa_model=""
    )
    runtime = Runtime(settings)
    runtime.start(background=True)
    assert runtime.wait_ready(300)
    assert runtime.starting  # the grid is still compiling
    start = time.monotonic()
    runtime.stop()
    assert time.monotonic() - start < 10
    assert not runtime._grid_thread.is_alive()
    served = runtime.models["ner"]
    assert served.compiled < served.total
