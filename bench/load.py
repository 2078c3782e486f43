"""Closed-loop load: `concurrency` clients, each sending its next request as soon as the last is answered."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    endpoint: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of 200 responses sent inside the window
    statuses: dict[int, int] = field(default_factory=dict)
    completed: int = 0  # 200 responses received inside the window
    tokens: int = 0  # model tokens of those (for useful FLOP/s)

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    @property
    def all_ok(self) -> bool:
        return set(self.statuses) == {200}


async def _drive(
    url: str,
    endpoint: str,
    bodies: list[dict],
    tokens: list[int],
    concurrency: int,
    duration: float,
    warmup: float,
) -> LoadResult:
    result = LoadResult(endpoint, concurrency, 0.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration
        counter = iter(range(10**9))

        async def client_loop():
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                i = next(counter) % len(bodies)
                sent = time.perf_counter()
                response = await client.post("/" + endpoint, json=bodies[i])
                done = time.perf_counter()
                ok = response.status_code == 200
                if measure_from <= done <= stop_at or not ok:  # errors count whenever they happen
                    result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
                if ok and measure_from <= done <= stop_at:
                    result.completed += 1
                    result.tokens += tokens[i]
                    if sent >= measure_from:
                        result.latencies.append(done - sent)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.seconds = duration
    return result


def run_load(
    url: str,
    endpoint: str,
    bodies: list[dict],
    tokens: list[int],
    concurrency: int,
    duration: float = 15.0,
    warmup: float = 2.0,
) -> LoadResult:
    return asyncio.run(_drive(url, endpoint, bodies, tokens, concurrency, duration, warmup))
