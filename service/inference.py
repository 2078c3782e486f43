"""One request's way through the service: pre-process, queue for the device, post-process.

Knows nothing of HTTP beyond a coroutine that completes when the client has gone away. Pre- and
post-processing run on the thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from .errors import DeadlineExceeded, PayloadTooLarge, ServiceError
from .runtime import Runtime, ServedModel


class ClientDisconnected(ServiceError):
    """The client closed the connection before its answer was ready (logged as 499, never sent)."""

    error_type = "client_closed_request"
    status = 499


@dataclass
class Timings:
    tokenize: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0

    def headers(self) -> dict[str, str]:
        return {
            "X-Tokenization-Time-Ms": f"{self.tokenize * 1000:.2f}",
            "X-Queue-Time-Ms": f"{self.queue * 1000:.2f}",
            "X-Inference-Time-Ms": f"{self.inference * 1000:.2f}",
            "X-Postprocess-Time-Ms": f"{self.postprocess * 1000:.2f}",
        }


async def infer(
    runtime: Runtime,
    served: ServedModel,
    items: list[Any],
    params: Any,
    *,
    deadline: float,
    disconnected: Callable[[], Awaitable[None]],
    timings: Timings,
) -> tuple[list[Any], dict]:
    """`served`'s answers for `items` (one per item) and the task's extras, or a ServiceError."""
    name = served.name
    task = runtime.tasks[name]
    batcher = runtime.batcher
    start = time.monotonic()
    with batcher.preparing(name):
        prepared = await run_in_threadpool(task.prepare, items, params)
        timings.tokenize = time.monotonic() - start
        if time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed during tokenization")
        # A request with more sequences than the whole queue holds (a context of a megabyte cut into
        # windows) would get a 429 forever: its size, not the load, is the problem.
        needed = len(prepared.model_inputs)
        if needed > batcher.max_queue_sequences:
            raise PayloadTooLarge(
                f"the request needs {needed} model sequences (windows); the limit is "
                f"{batcher.max_queue_sequences} (max_queue_sequences)"
            )
        item = await batcher.submit(name, prepared.model_inputs, deadline)

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {item.future, watcher},
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if item.future not in done:
        batcher.cancel(item)
        if watcher in done:
            raise ClientDisconnected("the client disconnected before the answer was ready")
        raise DeadlineExceeded(
            f"the request's deadline passed before it was served ({runtime.settings.request_timeout_s:g}s "
            "default; see X-Request-Timeout)"
        )
    outputs = item.future.result()  # raises the batcher's ServiceError, if any
    if item.started_at is not None:
        timings.queue = item.started_at - item.enqueued_at
    timings.inference = item.inference_seconds

    post_start = time.monotonic()
    answers = await run_in_threadpool(task.finish, prepared, outputs)
    timings.postprocess = time.monotonic() - post_start
    metrics = runtime.metrics
    metrics.queue_time.labels(name).observe(timings.queue)
    metrics.inference_time.labels(name).observe(timings.inference)
    return answers, prepared.extras
