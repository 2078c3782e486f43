"""Closed-loop load: `concurrency` clients, each sending its next request as soon as the last is answered.

Each client owns one keep-alive HTTP/1.1 connection and speaks the protocol directly over asyncio streams:
the load generator shares the machine with the server it measures, so it must cost as little CPU as
possible (a general HTTP client library costs a few milliseconds of CPU per request, which would show up
in every latency and slow the server down too). Request bodies are encoded once, up front.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

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


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a JSON body, read the status and the body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        return cls(reader, writer, parts.netloc)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = None
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length is None:
            raise RuntimeError("response without Content-Length")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _drive(
    url: str,
    endpoint: str,
    bodies: list[dict],
    tokens: list[int],
    concurrency: int,
    duration: float,
    warmup: float,
) -> LoadResult:
    result = LoadResult(endpoint, concurrency, duration)
    encoded = [json.dumps(body).encode() for body in bodies]
    path = "/" + endpoint
    connections = [await Connection.open(url) for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    counter = iter(range(10**12))

    async def client_loop(connection: Connection) -> None:
        while time.perf_counter() < stop_at:
            i = next(counter) % len(encoded)
            sent = time.perf_counter()
            status, _ = await connection.post(path, encoded[i])
            done = time.perf_counter()
            ok = status == 200
            if measure_from <= done <= stop_at or not ok:  # errors count whenever they happen
                result.statuses[status] = result.statuses.get(status, 0) + 1
            if ok and measure_from <= done <= stop_at:
                result.completed += 1
                result.tokens += tokens[i]
                if sent >= measure_from:
                    result.latencies.append(done - sent)

    try:
        await asyncio.gather(*(client_loop(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
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
