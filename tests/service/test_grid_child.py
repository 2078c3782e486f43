"""The rest of the grid compiles in a child process (service/grid_child.py) and the server loads each program from
the persistent cache: nothing compiles in the server after ready, requests included, and the child never
outlives the server (SIGTERM at any moment: status 0, no child left; the server killed: the child dies too).

Real processes. Nothing is timed: the child is held before each program by a gate file the test controls
(precompile.TEST_GATE); clocks only bound hangs.
"""

from __future__ import annotations

import re
import signal
import time

import httpx
import psutil
import pytest

from service.precompile import TEST_GATE
from tests.service.support import ServiceProcess, settings_env

HANG_S = 120.0  # bounds a hang only
GRID = {
    "classify_model": "",
    "fill_mask_model": "",
    "qa_model": "",
    "seq_buckets": [16, 32, 48],
    "batch_seq_buckets": [64],
    "batch_buckets": [1, 2],
    "max_batch_tokens": 128,
}
CHILD_LINE = r"grid: compiling the rest in a background process \(pid (\d+)\)"


def _gone(pid: int) -> bool:
    """The process is gone (a zombie waiting for whoever adopted it to reap it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG_S
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


@pytest.fixture
def launch(service_repos, tmp_path):
    started: list[ServiceProcess] = []

    def start(gate=None) -> ServiceProcess:
        env = settings_env(
            {
                **GRID,
                "ner_model": str(service_repos["ner"][0]),
                "compilation_cache_dir": str(tmp_path / "jax-cache"),
            }
        )
        if gate is not None:
            env[TEST_GATE] = str(gate)
        server = ServiceProcess(env, tmp_path / f"server-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def test_the_grid_lands_from_the_child_and_nothing_compiles_in_the_server_after_ready(launch, tmp_path):
    gate = tmp_path / "gate"
    gate.touch()  # the child waits before its first program until the requests below are answered
    server = launch(gate)
    server.wait_ready(HANG_S)
    child = int(server.wait_for_log(CHILD_LINE, HANG_S).group(1))
    assert psutil.Process(child).nice() == 19
    # Requests of every length while the grid is incomplete: answered through the covering buckets.
    for words in (1, 5, 20, 60, 200):
        response = httpx.post(server.url + "/ner", json={"inputs": " ".join(["paris"] * words)}, timeout=60)
        assert response.status_code == 200, response.text
    gate.unlink()
    done = server.wait_for_log(
        r"grid complete in [\d.]+s: (\d+) program\(s\) loaded from the background compiler, (\d+) compiled "
        r"here, 1 model\(s\); (\d+) compile\(s\) in this process since ready",
        HANG_S,
    )
    loaded, compiled_here, compiles_since_ready = (int(n) for n in done.groups())
    models = httpx.get(server.url + "/models", timeout=10).json()
    grid = next(m for m in (models["models"] if isinstance(models, dict) else models))["grid"]
    assert grid["complete"] and grid["compiled"] == grid["programs"]
    assert loaded >= 2 and loaded + compiled_here < grid["programs"]  # the covering ones were there before
    assert compiled_here == 0
    assert compiles_since_ready == 0  # every program the child made was a cache read here
    assert _wait_gone(child)  # the child exits once the grid is in the cache
    # None came from the fallback paths.
    assert "could not" not in server.log()
    assert server.terminate(HANG_S) == 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_child_never_outlives_the_server(launch, tmp_path, how):
    gate = tmp_path / "gate"
    gate.touch()  # the child stays in the middle of its work until the server is gone
    server = launch(gate)
    server.wait_ready(HANG_S)
    child = int(server.wait_for_log(CHILD_LINE, HANG_S).group(1))
    assert not _gone(child)
    if how == "SIGTERM":
        assert server.terminate(HANG_S) == 0
    else:
        server.process.send_signal(signal.SIGKILL)  # no clean-up at all: PR_SET_PDEATHSIG ends the child
        server.process.wait(HANG_S)
    assert _wait_gone(child), psutil.Process(child).cmdline()
    assert not re.search(r"Traceback", server.log()), server.log()[-3000:]


def test_a_child_that_fails_leaves_the_grid_to_the_server(launch, tmp_path):
    # Also the control for the first test: compiles in the server after ready are counted when they happen.
    gate = tmp_path / "gate"
    gate.touch()
    server = launch(gate)
    server.wait_ready(HANG_S)
    child = int(server.wait_for_log(CHILD_LINE, HANG_S).group(1))
    psutil.Process(child).kill()
    server.wait_for_log(r"the background grid compiler exited with status -9 after 0 program\(s\)", HANG_S)
    done = server.wait_for_log(
        r"grid complete in [\d.]+s: 0 program\(s\) loaded from the background compiler, (\d+) compiled here, "
        r"1 model\(s\); (\d+) compile\(s\) in this process since ready",
        HANG_S,
    )
    compiled_here, compiles_since_ready = (int(n) for n in done.groups())
    assert compiled_here >= 2 and compiles_since_ready == compiled_here
    response = httpx.post(server.url + "/ner", json={"inputs": "anna lives in paris"}, timeout=60)
    assert response.status_code == 200
    assert server.terminate(HANG_S) == 0
