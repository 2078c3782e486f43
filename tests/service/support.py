"""What the service tests share: the tiny repositories, a small bucket grid, and a real `albert-serve` process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# The checkout under test: a child process must serve this tree, not whatever the venv's editable install
# points at.
REPO_ROOT = Path(__file__).resolve().parents[2]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus `env`, with this checkout first on PYTHONPATH."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [full.get("PYTHONPATH")])])
    return full


SHALLOW = dict(num_hidden_layers=2, num_hidden_groups=1, inner_group_num=1)
SERVICE_REPOS = {
    "classify": ("sequence-classification", dict(seed=3, **SHALLOW)),
    "fill-mask": ("masked-lm", dict(seed=0, **SHALLOW)),
    "qa": ("question-answering", dict(seed=1, **SHALLOW)),
    "ner": ("token-classification", dict(seed=2, **SHALLOW)),
}
PIPELINE_TASKS = {
    "classify": "text-classification",
    "fill-mask": "fill-mask",
    "qa": "question-answering",
    "ner": "token-classification",
}
# A small grid keeps start-up quick; it still has single- and multi-row buckets and the model maximum (160).
SMALL_GRID = dict(
    seq_buckets=[16, 32, 64],
    batch_seq_buckets=[64, 160],
    batch_buckets=[1, 4],
    max_batch_tokens=640,
    compilation_cache_dir="",
)


def settings_env(settings: dict) -> dict[str, str]:
    """The ALBERT_* variables that set these settings (lists comma-separated), for a started server."""
    return {
        "ALBERT_" + key.upper(): ",".join(map(str, value)) if isinstance(value, list) else str(value)
        for key, value in settings.items()
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """A real `albert-serve` process (of this checkout), its output in `log_path`.

    `args` are command-line flags; `command` replaces the `albert-serve` executable (e.g. a wrapper that
    gates the device, see gated_serve.py); the port always comes from ALBERT_PORT.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        args: list[str] | None = None,
        command: list[str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if command is None:
            executable = shutil.which("albert-serve", path=str(Path(sys.executable).parent)) or "albert-serve"
            command = [executable]
        full_env = child_env({**env, "ALBERT_HOST": "127.0.0.1", "ALBERT_PORT": str(self.port)})
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, *(args or [])], env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 120.0, count: int = 1) -> re.Match:
        """Wait until the log holds `count` matches of the regular expression `pattern`; returns the last.

        The bound is far above what any machine needs: it only turns a hang into a failure."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log(), re.MULTILINE))
            if len(matches) >= count:
                return matches[count - 1]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not logged after {timeout}s:\n{self.log()[-3000:]}")
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"albert-serve exited with {self.process.returncode} before logging {pattern!r}:\n"
                    f"{self.log()[-3000:]}"
                )
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 300.0, on_pending=None) -> float:
        """Poll /ready until 200; returns the seconds it took. `on_pending(response)` sees each 503."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"albert-serve exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                response = httpx.get(self.url + "/ready", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if response.status_code == 200:
                return time.monotonic() - start
            if on_pending is not None:
                on_pending(response)
            time.sleep(0.2)
        raise TimeoutError(f"not ready after {timeout}s:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def models_file_runtime(path, **settings):
    """A Runtime serving only the models of the models file at `path`, on SMALL_GRID, every program compiled
    (started in the foreground); the caller stops it."""
    from service.runtime import Runtime
    from service.settings import Settings

    values = dict(SMALL_GRID, classify_model=None, fill_mask_model=None, qa_model=None, ner_model=None)
    runtime = Runtime(Settings(**{**values, **settings, "models_file": str(path)}))
    runtime.start(background=False)
    return runtime
