"""Dynamic batching: one device worker thread, fed by per-model queues of sequences.

Requests are tokenized on the event loop's thread pool, then their sequences are queued here. The worker
takes the model whose oldest sequence has waited longest (fairness across models) and asks that
model's packer for the batch that serves the most tokens per second of measured device time among the
sequences at the head of its queue (see engine.Packer); the oldest sequence is always in it. While the
device is busy, new sequences accumulate, so batches grow with load on their own; the worker only waits
(at most `max_wait`) for requests it knows are on their way (see `_wait_for_more`). An idle service, or a
lone client, never waits.

Each request's sequences may be spread over several batches (long QA contexts); its future completes when
the last one is done. Cancelled (client gone) and expired requests are dropped before they reach the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .engine import ModelRunner, PackedBatch, Plan
from .errors import DeadlineExceeded, NotReady, QueueFull, ServiceError
from .tasks.base import ModelInput

log = logging.getLogger(__name__)


@dataclass
class WorkItem:
    """One request's sequences on their way through the device."""

    model: str
    sequences: list[ModelInput]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    enqueued_at: float = field(default_factory=time.monotonic)
    outputs: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    started_at: float | None = None  # first batch that holds one of its sequences
    passed_over: set = field(default_factory=set)  # indices of sequences a batch left behind once
    inference_seconds: float = 0.0

    def __post_init__(self):
        self.outputs = [None] * len(self.sequences)
        self.remaining = len(self.sequences)

    @property
    def done(self) -> bool:
        return self.cancelled or self.future.done()

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(settle)


@dataclass
class BatchStats:
    model: str
    sequences: int
    tokens: int
    padding_ratio: float
    bucket: str
    seconds: float


class Batcher:
    def __init__(
        self,
        runners: dict[str, ModelRunner],
        *,
        max_batch_sequences: int,
        max_queue_sequences: int,
        max_wait_s: float,
        on_batch=None,
    ):
        self.runners = dict(runners)
        self.max_batch_sequences = max_batch_sequences
        self.max_queue_sequences = max_queue_sequences
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch  # callback(BatchStats), for metrics
        # One queue per model: a hot model's backlog never hides a cold model's oldest request (see _loop).
        self._queues: dict[str, deque[tuple[WorkItem, int]]] = {e: deque() for e in runners}
        self._queued = 0
        self._queued_tokens = dict.fromkeys(runners, 0)
        self._preparing = dict.fromkeys(runners, 0)  # requests being tokenized, about to be queued
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add(self, model: str, runner: ModelRunner) -> None:
        """Serve `model` from now on (models join one by one as they become ready). A model served already
        gets the new runner, and its queue stays (a reload loses no request)."""
        with self._cond:
            self.runners[model] = runner
            if model not in self._queues:
                self._queues[model] = deque()
                self._queued_tokens[model] = 0
                self._preparing[model] = 0

    def remove(self, model: str) -> bool:
        """Stop serving `model` if nothing of it is queued or being prepared; whether it was removed (a batch
        of it already taken runs to the end on its runner)."""
        with self._cond:
            if self._queues.get(model) or self._preparing.get(model):
                return False
            for table in (self.runners, self._queues, self._queued_tokens, self._preparing):
                table.pop(model, None)
            return True

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="device-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; anything still queued is answered with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for model, queue in self._queues.items():
                for item, _ in queue:
                    item.resolve(error=NotReady("the service is shutting down"))
                queue.clear()
                self._queued_tokens[model] = 0
            self._queued = 0

    @property
    def queued_sequences(self) -> int:
        return self._queued

    # -- admission ----------------------------------------------------------------------------------------

    def preparing(self, model: str) -> _Preparing:
        """Context manager around a request's tokenization and submission (see `_wait_for_more`)."""
        return _Preparing(self, model)

    async def submit(self, model: str, sequences: list[ModelInput], deadline: float) -> WorkItem:
        """Queue `sequences`; returns the WorkItem, whose `future` completes with one output per sequence."""
        loop = asyncio.get_running_loop()
        item = WorkItem(model, sequences, loop.create_future(), loop, deadline)
        if not sequences:
            item.future.set_result([])
            return item
        with self._cond:
            if self._stopping:
                raise NotReady("the service is shutting down")
            if self._queued + len(sequences) > self.max_queue_sequences:
                raise QueueFull(
                    f"the queue is full ({self._queued} sequences waiting, limit {self.max_queue_sequences}); "
                    "retry later",
                    headers={"Retry-After": "1"},
                )
            queue = self._queues[model]
            for index in range(len(sequences)):
                queue.append((item, index))
            self._queued += len(sequences)
            self._queued_tokens[model] += sum(len(s) for s in sequences)
            self._cond.notify()
        return item

    def cancel(self, item: WorkItem) -> None:
        """Drop a request's queued sequences (its client has gone or its deadline passed)."""
        item.cancelled = True

    # -- the device worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._queued == 0:
                    self._cond.wait()
                if self._stopping:
                    return
                model = self._oldest_model()
                if model is None:
                    continue
                waited = self._wait_for_more(model)
                taken, plan = self._take(model)
                if taken and log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "batch %s %s: %d sequences, %d tokens, waited %.1f ms, %d sequences left queued",
                        model,
                        plan.bucket,
                        len(taken),
                        sum(len(i.sequences[k]) for i, k in taken),
                        waited * 1000,
                        self._queued,
                    )
            if taken:
                self._run(model, taken, plan)

    def _wait_for_more(self, model: str) -> float:
        """Wait (at most `max_wait`) while requests of `model` are being tokenized: they would otherwise miss
        this batch by a millisecond and wait a whole forward pass. An idle service, or a lone client, has
        nothing being tokenized and never waits; nor does a queue that already fills the largest bucket."""
        limit = self.runners[model].packer.max_tokens
        start = time.monotonic()
        while not self._stopping and self._preparing[model] > 0 and self._queued_tokens[model] < limit:
            remaining = start + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return time.monotonic() - start

    def _oldest_model(self) -> str | None:
        oldest, chosen = None, None
        for model, queue in self._queues.items():
            self._drop_dead(queue)
            if queue and (oldest is None or queue[0][0].enqueued_at < oldest):
                oldest, chosen = queue[0][0].enqueued_at, model
        return chosen

    def _dequeued(self, item: WorkItem, index: int) -> None:
        """Bookkeeping for one sequence leaving the queue (taken, or dropped)."""
        self._queued -= 1
        self._queued_tokens[item.model] -= len(item.sequences[index])

    def _drop_dead(self, queue: deque) -> None:
        now = time.monotonic()
        while queue:
            item, index = queue[0]
            if item.done:
                queue.popleft()
                self._dequeued(item, index)
            elif now > item.deadline:
                queue.popleft()
                self._dequeued(item, index)
                item.cancelled = True
                item.resolve(
                    error=DeadlineExceeded("the request's deadline passed while it waited in the queue")
                )
            else:
                return

    def _take(self, model: str) -> tuple[list[tuple[WorkItem, int]], Plan | None]:
        """The next batch of `model`: the packer's best plan over the sequences at the head of its queue.

        Only the head's worth of one largest bucket is offered; what the plan leaves out goes back to the
        front of the queue, in order, so the oldest sequence is always in the batch and nothing starves.
        """
        queue = self._queues[model]
        packer = self.runners[model].packer
        offered: list[tuple[WorkItem, int]] = []
        tokens = 0
        while queue and len(offered) < self.max_batch_sequences:
            item, index = queue[0]
            if item.done:
                queue.popleft()
                self._dequeued(item, index)
                continue
            n = len(item.sequences[index])
            if offered and tokens + n > packer.max_tokens:
                break
            offered.append(queue.popleft())
            tokens += n
        if not offered:
            return [], None
        lengths = [len(item.sequences[index]) for item, index in offered]
        # Sequences passed over once sit at the front (they are the oldest) and must go now.
        required = 1
        while required < len(offered) and offered[required][1] in offered[required][0].passed_over:
            required += 1
        plan = None
        while plan is None and required >= 1:
            plan = packer.plan(lengths, required)
            required -= 1
        if plan is None:  # cannot happen for sequences the tasks made (they fit the model); never loop on it
            item, index = offered[0]
            self._dequeued(item, index)
            item.resolve(error=ServiceError("a sequence fits no compiled bucket"))
            for entry in reversed(offered[1:]):
                queue.appendleft(entry)
            return [], None
        chosen = plan.chosen
        kept = set(chosen)
        for position in reversed(range(len(offered))):
            if position not in kept:
                item, index = offered[position]
                item.passed_over.add(index)
                queue.appendleft(offered[position])
        for position in chosen:
            self._dequeued(*offered[position])
        renumber = {old: new for new, old in enumerate(chosen)}
        return [offered[i] for i in chosen], Plan(
            plan.bucket, [[renumber[i] for i in row] for row in plan.rows]
        )

    def _run(self, model: str, taken: list[tuple[WorkItem, int]], plan: Plan) -> None:
        runner = self.runners[model]
        sequences = [item.sequences[index] for item, index in taken]
        start = time.monotonic()
        for item, _ in taken:
            if item.started_at is None:
                item.started_at = start
        try:
            outputs, batch = runner.run(sequences, plan)
        except Exception:
            log.exception("forward pass failed on %s for %d sequences", model, len(sequences))
            for item in {id(i): i for i, _ in taken}.values():
                item.resolve(error=ServiceError("the model failed on this batch"))
            return
        seconds = time.monotonic() - start
        self._report(model, batch, seconds)
        for item in {id(i): i for i, _ in taken}.values():
            item.inference_seconds += seconds
        for (item, index), output in zip(taken, outputs, strict=True):
            if item.done:
                continue
            item.outputs[index] = output
            item.remaining -= 1
            if item.remaining == 0:
                item.resolve(result=item.outputs)

    def _report(self, model: str, batch: PackedBatch, seconds: float) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(
                BatchStats(
                    model=model,
                    sequences=len(batch.placements),
                    tokens=batch.real_tokens,
                    padding_ratio=float(np.clip(batch.padding_ratio, 0.0, 1.0)),
                    bucket=str(batch.bucket),
                    seconds=seconds,
                )
            )
        except Exception:  # metrics must never take the worker down
            log.exception("batch metrics callback failed")


class _Preparing:
    def __init__(self, batcher: Batcher, model: str):
        self.batcher, self.model = batcher, model

    def __enter__(self):
        with self.batcher._cond:
            self.batcher._preparing[self.model] += 1

    def __exit__(self, *exc):
        with self.batcher._cond:
            self.batcher._preparing[self.model] -= 1
            self.batcher._cond.notify()
