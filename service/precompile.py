"""`albert-serve compile`: fill the persistent compilation cache and the measured bucket costs, then exit.

It reads the server's configuration (the same flags and ALBERT_* variables), builds the configured models and
compiles every program of their whole grid into the compilation cache, then times each bucket once and writes
the costs beside the cache. A server started afterwards on the same cache directory (an image layer, a shared
volume, a Kubernetes init container) finds every program there: it is ready in seconds and never compiles.

Exit status: 0 when every model's grid is in the cache; 2 (one line on stderr) for a configuration the server
could not start with either, or no compilation cache directory; 1 when a model failed to load or compile.

The server also runs it as its background grid compiler (`--report-programs`, see service/grid_child.py):
then it only compiles (no timing: the server times each bucket itself, at its own priority), at the lowest
CPU priority, and writes one line per program to stdout as it lands in the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time

log = logging.getLogger("albert_serve.compile")

# The line the background child writes for each program in the cache: "program <set label> <key>".
PROGRAM_LINE = "program"
_PR_SET_PDEATHSIG = 1
# Tests only: while the file this variable names exists, the background child waits before each program.
TEST_GATE = "ALBERT_SERVE_TEST_GRID_GATE"


def _as_background_child(parent: int) -> None:
    """Lowest CPU priority (SCHED_IDLE where the OS has it: only idle cores) and die with the server."""
    with contextlib.suppress(AttributeError, OSError):
        os.nice(19)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:  # the server died before the line above took effect
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(prog="albert-serve compile", add_help=False)
    extra.add_argument("--report-programs", action="store_true", help=argparse.SUPPRESS)
    extra.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    extra.add_argument("--programs-dir", default="", help=argparse.SUPPRESS)
    own, rest = extra.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if own.report_programs:
        _as_background_child(own.parent_pid)

    from .app import configure_logging
    from .models import ConfigError
    from .settings import load_settings

    settings = load_settings(rest)
    # The background child logs into the server's output: only what is worth the server's log.
    configure_logging("warning" if own.report_programs else settings.log_level)
    if not settings.compilation_cache_dir:
        print(
            "albert-serve compile: configuration error: no compilation cache directory to fill "
            "(set ALBERT_COMPILATION_CACHE_DIR or --compilation-cache-dir)",
            file=sys.stderr,
        )
        return 2
    from .runtime import Runtime

    try:
        runtime = Runtime(settings)
    except ConfigError as exc:
        print(f"albert-serve compile: configuration error: {exc}", file=sys.stderr)
        return 2
    if own.report_programs:
        return _report_programs(runtime, own.programs_dir)
    begin = time.perf_counter()
    runtime.start(background=False)  # every model's whole grid, compiled and timed, the costs saved
    runtime.batcher.stop()
    if runtime.failed:
        for name, reason in runtime.failed.items():
            print(f"albert-serve compile: model {name} failed: {reason}", file=sys.stderr)
        return 1
    programs = sum(m.total for m in runtime.models.values())
    log.info(
        "compiled %d model(s), %d program(s), into %s in %.1fs",
        len(runtime.models),
        programs,
        settings.compilation_cache_dir,
        time.perf_counter() - begin,
    )
    return 0


# Executables are not handed over serialized for now: some deserialized in the server failed at run time
# (XLA:CPU "Function select_add_fusion not found" on the SPLADE bench; 500s in a full test run's playground
# classify), where the same program read from the persistent compilation cache runs. The server reads each from
# the cache instead (~0.3 s of tracing and lowering each, in the background).
HAND_OVER_SERIALIZED = False


def _report_programs(runtime, programs_dir: str) -> int:
    """The server's background child: compile (or find in the cache) every program of every model, cheapest
    first as the server would, one line on stdout for each as it is in the cache: "program <set label>
    <key> [<file>]", the file (in `programs_dir`) holding the serialized executable, which the server loads
    without tracing or lowering anything."""
    import pickle
    from pathlib import Path

    from jax.experimental.serialize_executable import serialize

    from .engine.compiling import compile_many, grid_work
    from .runtime import configure_compilation_cache

    configure_compilation_cache(runtime.settings.compilation_cache_dir)
    runners = []
    for served in runtime.models.values():
        try:
            runtime._load(served, compile_covering=False)
        except Exception as exc:  # the server reports its own failures; compile the others
            log.warning("background compile: model %s skipped: %s", served.name, exc)
            continue
        runners.append(served.grid)
    gate = os.environ.get(TEST_GATE, "")
    for program_set, key in grid_work(runners):
        while gate and os.path.exists(gate):  # tests hold the child here (tests/service/test_grid_child.py)
            time.sleep(0.05)
        # One at a time: the cores are the server's; this process only uses what it leaves idle.
        for _set, _key, _seconds in compile_many([(program_set, key)], 1, None):
            pass
        label = f"{key.rows}x{key.length}" if hasattr(key, "rows") else str(key)
        line = f"{PROGRAM_LINE} {program_set.label} {label}"
        if programs_dir and HAND_OVER_SERIALIZED:
            try:
                path = Path(programs_dir) / f"{program_set.label.replace(':', '-')}-{label}.pkl"
                partial = path.with_suffix(".tmp")
                partial.write_bytes(pickle.dumps(serialize(program_set.compiled[key])))
                partial.replace(path)
                line += f" {path}"
            except Exception as exc:  # the server reads it from the compilation cache instead
                log.warning("could not serialize %s %s: %s", program_set.label, label, exc)
        print(line, flush=True)
    return 0
