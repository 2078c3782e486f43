"""The batcher on its own: fake runners (a real Packer, no model) that record each batch and hold the device.

Queues are named freely ("hot", "cold", ...): they are endpoints today and model names tomorrow, and the
batcher treats them alike. Every sequence is tagged by its first token id, so a batch is a list of tags.
Synchronisation is by events the code causes (a batch reaching the runner, a future completing), never by
sleeping; where a test shows that something does *not* happen, it gives it a bounded chance to.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher
from service.engine import Bucket, Packer
from service.errors import NotReady
from service.tasks.base import ModelInput

HANG_S = 60.0  # bounds a hang only; nothing here takes more than milliseconds when it works


def sequence(tag: int, length: int) -> ModelInput:
    ids = np.full(length, 7, np.int32)
    ids[0] = tag
    return ModelInput(ids, np.zeros(length, np.int32))


class Device:
    """What the fake runners share: the record of batches, in order, and a gate that lets batches through
    one permit at a time (or all of them, once opened)."""

    def __init__(self):
        self.batches: list[tuple[str, list[int]]] = []
        self.entered: queue.Queue = queue.Queue()
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open.set()
        self._permits.release(1000)

    def next_batch(self) -> tuple[str, list[int]]:
        return self.entered.get(timeout=HANG_S)

    def wait(self) -> None:
        if not self._open.is_set() and not self._permits.acquire(timeout=HANG_S):
            raise TimeoutError("the test never let the batch through")


class FakeRunner:
    def __init__(self, name: str, device: Device, packer: Packer):
        self.name, self.device, self.packer = name, device, packer

    def run(self, sequences, plan=None):
        batch = self.packer.pack(sequences, plan)
        tags = [int(s.input_ids[0]) for s in sequences]
        self.device.batches.append((self.name, tags))
        self.device.entered.put((self.name, tags))
        self.device.wait()
        return [{"tag": tag} for tag in tags], batch


def packer(buckets: list[Bucket], costs: dict[Bucket, float] | None = None) -> Packer:
    p = Packer(buckets, attention_cost_per_token=0.0)
    p.set_measured_costs(costs or {b: float(b.tokens) for b in buckets})
    return p


def batcher(names, buckets, *, costs=None, max_batch_sequences=256, max_wait_s=0.0, max_queue=1000):
    device = Device()
    runners = {name: FakeRunner(name, device, packer(buckets, costs)) for name in names}
    b = Batcher(
        runners,
        max_batch_sequences=max_batch_sequences,
        max_queue_sequences=max_queue,
        max_wait_s=max_wait_s,
    )
    return b, device


async def submit(b: Batcher, name: str, *seqs: ModelInput):
    return await b.submit(name, list(seqs), time.monotonic() + 10 * HANG_S)


async def result(item):
    return await asyncio.wait_for(item.future, HANG_S)


async def in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


ROWS_OF_32 = [Bucket(1, 32), Bucket(4, 32)]


# --- max_batch_sequences ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "expected"), [(5, [5, 5, 2]), (256, [12])])
def test_max_batch_sequences_bounds_a_batch(limit, expected):
    async def scenario():
        # A fixed cost per forward pass: the packer would take everything offered.
        costs = {Bucket(1, 32): 1.0, Bucket(4, 32): 1.1}
        b, device = batcher(["hot"], ROWS_OF_32, costs=costs, max_batch_sequences=limit)
        b.start()
        try:
            blocker = await submit(b, "hot", sequence(1, 3))
            assert await in_thread(device.next_batch) == ("hot", [1])
            # Twelve sequences of 8 tokens: one 4x32 bucket holds them all (four to a row).
            items = [await submit(b, "hot", sequence(10 + i, 8)) for i in range(12)]
            device.open()
            await result(blocker)
            for i, item in enumerate(items):
                assert await result(item) == [{"tag": 10 + i}]
            return [len(tags) for _, tags in device.batches[1:]]
        finally:
            device.open()
            b.stop()

    assert asyncio.run(scenario()) == expected


# --- the passed-over rule -----------------------------------------------------------------------------------


def test_a_sequence_passed_over_once_goes_in_the_next_batch():
    # One row of 16 tokens is much cheaper per token than two rows, so the packer fills one row and leaves
    # the rest; among what it leaves, anything already passed over must go next time, even where the packer
    # would again prefer a single row without it.
    one, two = Bucket(1, 16), Bucket(2, 16)

    async def scenario():
        b, device = batcher(["hot"], [one, two], costs={one: 1.0, two: 10.0})
        b.start()
        try:
            blocker = await submit(b, "hot", sequence(1, 3))
            assert await in_thread(device.next_batch) == ("hot", [1])
            a, b_, c, d = [
                await submit(b, "hot", sequence(tag, n)) for tag, n in [(2, 4), (3, 6), (4, 6), (5, 12)]
            ]
            device.release()
            # The oldest (2), then the longest that fits its row (5): 3 and 4 are passed over.
            assert await in_thread(device.next_batch) == ("hot", [2, 5])
            e = await submit(b, "hot", sequence(6, 10))
            device.release()
            # Left to itself, the packer's best is one full row [3, 6] (6 + 10 tokens), leaving 4 behind a
            # second time; the rule makes both passed-over sequences go (6 waits its turn).
            _, tags = await in_thread(device.next_batch)
            assert sorted(tags) == [3, 4], tags
            device.open()
            for item in (blocker, a, b_, c, d, e):
                await result(item)
        finally:
            device.open()
            b.stop()

    asyncio.run(scenario())


# --- fairness across queues --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names", [("hot", "cold"), ("sentiment-v2", "ner.large", "qa_2")], ids=["two", "three"]
)
def test_the_queue_whose_oldest_sequence_waited_longest_goes_first(names):
    # One sequence per batch, so the order of batches is the order the worker picked queues in: by the age of
    # each queue's oldest sequence, whatever the queue, and however long the busiest queue is.
    busy, *others = names

    async def scenario():
        b, device = batcher(names, ROWS_OF_32, max_batch_sequences=1)
        b.start()
        try:
            blocker = await submit(b, busy, sequence(1, 3))
            assert await in_thread(device.next_batch) == (busy, [1])
            arrivals = [busy, busy, *others, busy, busy, busy, *others, busy]
            items = [await submit(b, name, sequence(10 + i, 5)) for i, name in enumerate(arrivals)]
            device.open()
            for item in (blocker, *items):
                await result(item)
            return arrivals, device.batches[1:]
        finally:
            device.open()
            b.stop()

    arrivals, batches = asyncio.run(scenario())
    assert batches == [(name, [10 + i]) for i, name in enumerate(arrivals)]


# --- max_wait ------------------------------------------------------------------------------------------------


def test_a_batch_waits_for_a_request_of_its_queue_being_tokenized():
    # Two requests being tokenized at once: the first queued does not go alone while the second is still
    # being prepared (max_wait far longer than this test), and both share one batch.
    async def scenario():
        b, device = batcher(["hot", "cold"], ROWS_OF_32, max_wait_s=HANG_S)
        device.open()
        b.start()
        try:
            with b.preparing("hot"):
                with b.preparing("hot"):
                    first = await submit(b, "hot", sequence(1, 5))
                # The second is still being prepared: the worker holds the first back (given half a
                # second to go wrongly).
                with pytest.raises(queue.Empty):
                    await in_thread(device.entered.get, True, 0.5)
                second = await submit(b, "hot", sequence(2, 5))
            for item in (first, second):
                await result(item)
            return device.batches
        finally:
            device.open()
            b.stop()

    assert asyncio.run(scenario()) == [("hot", [1, 2])]


def test_a_request_of_another_queue_being_tokenized_is_no_reason_to_wait():
    async def scenario():
        b, device = batcher(["hot", "cold"], ROWS_OF_32, max_wait_s=10 * HANG_S)
        device.open()
        b.start()
        try:
            with b.preparing("cold"):  # for ever, as far as this test goes
                item = await submit(b, "hot", sequence(1, 5))
                return await result(item)  # would time out (HANG_S) if it waited for max_wait
        finally:
            b.stop()

    assert asyncio.run(scenario()) == [{"tag": 1}]


def test_max_wait_bounds_the_wait_for_a_request_that_never_comes():
    max_wait = 0.3

    async def scenario():
        b, device = batcher(["hot"], ROWS_OF_32, max_wait_s=max_wait)
        device.open()
        b.start()
        try:
            with b.preparing("hot"):  # a request being tokenized for ever
                start = time.monotonic()
                item = await submit(b, "hot", sequence(1, 5))
                assert await result(item) == [{"tag": 1}]
                return time.monotonic() - start
        finally:
            b.stop()

    waited = asyncio.run(scenario())
    assert waited >= max_wait  # it waited (a lower bound: a clock cannot run early) and then went alone


def test_a_lone_request_never_waits():
    # Nothing being tokenized: the batch goes at once, even with a max_wait longer than the test's bound.
    async def scenario():
        b, device = batcher(["hot"], ROWS_OF_32, max_wait_s=10 * HANG_S)
        device.open()
        b.start()
        try:
            item = await submit(b, "hot", sequence(1, 5))
            return await result(item)  # would time out (HANG_S) if it waited for max_wait
        finally:
            b.stop()

    assert asyncio.run(scenario()) == [{"tag": 1}]


# --- stop --------------------------------------------------------------------------------------------------


def test_stop_answers_queued_requests_with_503_and_lets_the_running_batch_finish():
    async def scenario():
        b, device = batcher(["hot", "cold"], ROWS_OF_32, max_batch_sequences=1)
        b.start()
        running = await submit(b, "hot", sequence(1, 3))
        assert await in_thread(device.next_batch) == ("hot", [1])
        queued = [await submit(b, "hot", sequence(2, 3)), await submit(b, "cold", sequence(3, 3))]
        stopping = threading.Thread(target=b.stop, name="stop")
        stopping.start()
        # Once stopping, new work is refused at once (and anything queued before that is answered too).
        probes = []
        while True:
            try:
                probes.append(await submit(b, "cold", sequence(99, 3)))
            except NotReady as refused:
                assert refused.status == 503 and "shutting down" in refused.message
                break
            await asyncio.sleep(0.01)
        device.open()  # the batch on the device completes
        assert await result(running) == [{"tag": 1}]
        await in_thread(stopping.join, HANG_S)
        assert not stopping.is_alive()
        for item in [*queued, *probes]:
            with pytest.raises(NotReady) as error:
                await result(item)
            assert error.value.status == 503
        assert b.queued_sequences == 0
        return device.batches

    assert asyncio.run(scenario()) == [("hot", [1])]  # nothing queued ran after stop


def test_stop_before_the_worker_started_answers_every_queued_request():
    async def scenario():
        b, _ = batcher(["hot", "cold"], ROWS_OF_32)
        items = [
            await submit(b, "hot", sequence(1, 3)),
            await submit(b, "cold", sequence(2, 3), sequence(3, 4)),
        ]
        assert b.queued_sequences == 3
        b.stop()
        for item in items:
            with pytest.raises(NotReady):
                await result(item)
        assert b.queued_sequences == 0

    asyncio.run(scenario())
