"""Compiling: the programs a set of models wants, handed out to compile threads (at a low CPU priority in the
background), then each new bucket timed once; and handing back the memory compiling leaves behind."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from .buckets import Bucket
from .programs import ProgramSet

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .runner import ModelRunner


# Niceness of the background compile threads (Linux: per thread). Requests' threads (nice 0) get about nine
# tenths of a contested core; the lowest priority (19) would starve the grid on a machine others load too.
BACKGROUND_NICE = 10


def _lower_priority() -> None:
    """Background compiles run at a low CPU priority, so requests come first."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def release_memory() -> None:
    """Hand back what compiling left behind: JAX's tracing and lowering caches (about 3.5 MB per albert-base
    bucket; serving runs only the compiled executables, which hold their own) and the C heap's free pages
    (XLA and LLVM leave tens of MB per compile free but resident in malloc's arenas). Call it when no
    compile is in progress."""
    jax.clear_caches()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def background_loader() -> Iterator[Callable[[ProgramSet, Any, Path | None], None]]:
    """load(set, key, file): load `key`'s executable from the file the background compiler serialized it to
    (or, without one or if that fails, compile it: a persistent-cache read, as the compiler put it there), on
    a thread at the background priority, and wait for it."""

    def load(program_set: ProgramSet, key, path: Path | None) -> None:
        if path is not None:
            try:
                program_set.load_serialized(key, path)
                return
            except Exception as exc:  # e.g. an executable this process cannot load: the cache has it too
                log.warning(
                    "could not load %s %s from %s (%s); reading the cache", program_set.label, key, path, exc
                )
        program_set.compile(key)

    with ThreadPoolExecutor(1, thread_name_prefix="load", initializer=_lower_priority) as pool:
        yield lambda program_set, key, path: pool.submit(load, program_set, key, path).result()


def compile_many(
    work: list[tuple[ProgramSet, Any]], threads: int, stop: threading.Event | None, background: bool = False
) -> Iterator[tuple[ProgramSet, Any, float]]:
    """Compile each (set, key) of `work`, `threads` side by side (XLA compiles outside the GIL); yields (set,
    key, compile seconds) for those this call compiled. Compiles are handed out `threads` at a time, so once
    `stop` is set no new one starts (a shutdown waits for at most one compile per thread)."""
    waiting = iter(work)
    threads = max(1, threads)
    with ThreadPoolExecutor(
        threads, thread_name_prefix="compile", initializer=_lower_priority if background else None
    ) as pool:
        running: deque = deque()

        def hand_out():
            while len(running) < threads and not (stop is not None and stop.is_set()):
                item = next(waiting, None)
                if item is None:
                    return
                running.append((item, pool.submit(item[0].compile, item[1])))

        hand_out()
        while running:
            (program_set, key), future = running.popleft()
            seconds = future.result()
            if seconds is not None:
                yield program_set, key, seconds
            hand_out()


def program_label(key) -> str:
    return str(key) if isinstance(key, Bucket) else f"vocab x{key}"


def grid_work(runners: list[ModelRunner]) -> list[tuple[ProgramSet, Any]]:
    """Every (set, key) these models use, once each, cheapest first (the vocabulary projections, then short
    rows), interleaving the sets: the order the grid is completed in."""
    work, seen = [], set()
    for runner in runners:
        for program_set, key in runner.programs():
            if (id(program_set), key) not in seen:
                seen.add((id(program_set), key))
                work.append((program_set, key))
    work.sort(key=lambda item: (isinstance(item[1], Bucket), getattr(item[1], "tokens", item[1])))
    return work


def complete_grids(
    runners: list[ModelRunner],
    *,
    threads: int = 2,
    costs_file: Path | None = None,
    stop: threading.Event | None = None,
    background: bool = True,
) -> Iterator[tuple[ProgramSet, str, float]]:
    """Compile every program these models want that is not compiled yet, then time each bucket not measured
    yet (one run each, one at a time) and save the times; yields (set, label, compile seconds).

    Each model plans with every bucket as it lands (its cost estimated from those timed, until it is timed
    itself). In the background (`background`) the compile threads run at a low CPU priority (the timed runs
    at the caller's: they measure what requests will get)."""
    work = grid_work(runners)
    todo = [item for item in work if item[1] not in item[0].compiled]
    for runner in runners:
        runner.main.load_costs(costs_file)
        runner.warm_covering()
    for count, (program_set, key, seconds) in enumerate(compile_many(todo, threads, stop, background), 1):
        program_set.refresh()
        if count % 16 == 0:
            with contextlib.suppress(OSError, AttributeError):  # the heap only: caches may be in use
                ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        yield program_set, program_label(key), seconds
    release_memory()
    if stop is not None and stop.is_set():
        return
    touched = []
    for program_set, key in work:
        if not isinstance(key, Bucket) or key in program_set.seconds or key not in program_set.compiled:
            continue
        if stop is not None and stop.is_set():
            return
        seconds = program_set.time_run(key, warm=False)  # one run, as requests will see it
        if seconds is not None:
            program_set.seconds[key] = seconds
            program_set.refresh()
            if program_set not in touched:
                touched.append(program_set)
    for program_set in touched:
        program_set.save_costs(costs_file)
    release_memory()
