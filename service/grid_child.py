"""The background grid compiler: a child process that compiles the rest of the grid into the persistent
compilation cache while the server serves, and says which program has landed, one line each.

Why a process and not threads: at the lowest CPU priority (nice 19, and SCHED_IDLE on Linux: only cores the
server leaves idle) the operating system gives the server the cores whenever requests need them, and the
compiler's memory (XLA and LLVM leave tens of MB per compile) is the child's, returned when it exits. The
server loads each program from the cache as it lands: a cache read, not a compile.

The child is `python -m service compile --report-programs` (service/precompile.py) with the server's
settings as ALBERT_* variables. It dies with the server (PR_SET_PDEATHSIG, set in the child) and is ended
explicitly on shutdown (`stop`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .engine import Bucket
from .precompile import PROGRAM_LINE
from .settings import Settings

log = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where `service` is imported from


def settings_environment(settings: Settings) -> dict[str, str]:
    """os.environ with every setting as its ALBERT_* variable, so that the child reads these settings."""
    env = dict(os.environ)
    for name in Settings.model_fields:
        value = getattr(settings, name)
        variable = Settings.env_name(name)
        if value is None:
            env.pop(variable, None)
        elif isinstance(value, bool):
            env[variable] = "true" if value else "false"
        elif isinstance(value, list):
            env[variable] = ",".join(map(str, value))
        else:
            env[variable] = str(value)
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


def parse_key(text: str):
    """A program key as the child writes it: "ROWSxLENGTH" (a bucket) or a number of masks."""
    if "x" in text:
        rows, length = text.split("x")
        return Bucket(int(rows), int(length))
    return int(text)


class GridChild:
    def __init__(self, settings: Settings):
        # Where the child leaves each serialized executable for the server to load (removed in `stop`).
        self.directory = Path(tempfile.mkdtemp(prefix="albert-serve-grid-"))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "compile",
                "--report-programs",
                "--parent-pid",
                str(os.getpid()),
                "--programs-dir",
                str(self.directory),
            ],
            env=settings_environment(settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C in a terminal is the server's to handle, not the child's
        )
        self.pid = self.process.pid
        # The lowest priority from its first instruction on (the child sets it too, where this fails).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, self.pid, 19)
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(self.pid, os.SCHED_IDLE, os.sched_param(0))

    def programs(self) -> Iterator[tuple[str, object, Path | None]]:
        """(program set label, key, its serialized executable or None) for each program in the cache, as the
        child reports it; ends when the child exits."""
        for line in self.process.stdout:
            parts = line.split()
            if len(parts) in (3, 4) and parts[0] == PROGRAM_LINE:
                with contextlib.suppress(ValueError):
                    yield parts[1], parse_key(parts[2]), Path(parts[3]) if len(parts) == 4 else None

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 2.0) -> None:
        """End the child now: SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)
