"""Model control benchmark: `python -m bench.model_control` (run it under `flock /tmp/albert-bench.lock`).

Starts `python -m service` in explicit model-control mode on albert-base-shaped random checkpoints (see
bench/checkpoint.py) with an empty compilation cache, one classifier configured, and waits until its grid is
complete. Then, through POST /v2/repository/models/<name>/load, times from the load call to its answer (the
model is ready when the call returns) for: a second classifier (3 labels: the same backbone shape, programs
shared), an NER model (same backbone, a program kind not compiled yet) and a fill-mask model (the NER
model's backbone programs, and a vocabulary projection not compiled yet), a reload, then an unload; after
each load, the time until the rest of its bucket grid has compiled in the background. While each runs, one client calls /classify on
the configured model without pause: its request count, failures and latency (p50, max) say whether the load
held up serving.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from . import checkpoint
from .startup import CACHE, grid_state

TEXT = "the service answered every request on time and the team was happy with the new release"


def _copy(source: Path, target: Path) -> None:
    # Hard links: the repository must hold real directories (a symlink out of it is refused).
    shutil.copytree(source, target, copy_function=os.link)


class Caller(threading.Thread):
    """Calls /classify on the configured model until stopped; records latencies and failures."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.latencies, self.failures = url, threading.Event(), [], 0

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                response = client.post(self.url + "/classify", json={"inputs": TEXT})
                self.latencies.append(time.perf_counter() - start)
                self.failures += response.status_code != 200

    def summary(self) -> dict:
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "requests": len(ms),
            "failed": self.failures,
            "p50_ms": round(statistics.median(ms), 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None,
        }


def timed(url: str, operation: str, name: str) -> dict:
    caller = Caller(url)
    caller.start()
    time.sleep(1.0)  # the caller's steady pace before the operation
    start = time.perf_counter()
    response = httpx.post(f"{url}/v2/repository/models/{name}/{operation}", timeout=1800)
    seconds = time.perf_counter() - start
    caller.stop.set()
    caller.join()
    if response.status_code != 200:
        raise RuntimeError(f"{operation} {name}: {response.status_code} {response.text}")
    result = {"operation": operation, "model": name, "seconds": round(seconds, 2)}
    result["classify_meanwhile"] = caller.summary()
    if operation == "load":  # the rest of its grid compiles in the background; wait for it before the next
        while not httpx.get(f"{url}/models/{name}", timeout=30).json()["grid"]["complete"]:
            time.sleep(0.2)
        result["grid_complete_s"] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    root = CACHE / "models"
    print("building the albert-base-shaped checkpoints (cached in bench/.cache) ...", flush=True)
    repos = checkpoint.build(root)
    extra = checkpoint.build_extra(root, "classify-3", "classify", ["A", "B", "C"], 5)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "repository"
        repository.mkdir()
        _copy(extra, repository / "classify-3")
        _copy(repos["ner"], repository / "ner")
        _copy(repos["fill-mask"], repository / "fill-mask")
        port = 18000 + os.getpid() % 1000
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            "ALBERT_PORT": str(port),
            "ALBERT_HOST": "127.0.0.1",
            "ALBERT_CLASSIFY_MODEL": str(repos["classify"]),
            "ALBERT_FILL_MASK_MODEL": "",
            "ALBERT_QA_MODEL": "",
            "ALBERT_NER_MODEL": "",
            "ALBERT_MODEL_REPOSITORY": str(repository),
            "ALBERT_MODEL_CONTROL_MODE": "explicit",
            "ALBERT_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache"),
        }
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=out, stderr=out)
            try:
                start = time.monotonic()
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(log.read_text()[-3000:])
                    try:
                        if httpx.get(url + "/ready", timeout=5).status_code == 200 and grid_state(url)[0]:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.5)
                print(f"ready, grid complete in {time.monotonic() - start:.1f}s", flush=True)
                results = [
                    timed(url, "load", "classify-3"),
                    timed(url, "load", "ner"),
                    timed(url, "load", "fill-mask"),
                    timed(url, "load", "classify-3"),  # a reload: built beside the old one, then swapped
                    timed(url, "unload", "ner"),
                ]
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": os.getloadavg(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
