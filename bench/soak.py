"""Soak: thousands of mixed requests against a running albert-serve, with the server's memory watched.

Not part of the test run. Drives `--requests` requests (all four endpoints, lengths from one word to past
the model's maximum, lists, windows, every parameter kind, and a few malformed requests) from
`--concurrency` clients, samples the server's resident memory (VmRSS of `--pid`) every
`--sample-interval` seconds, and prints requests/s, statuses, latency percentiles and RSS at the start,
after the warm-up, at its peak and at the end.

Exits 1 if the RSS grew by more than `--max-growth-mib` between the end of the warm-up (the first
`--warmup-fraction` of the requests: allocator pools, thread stacks and caches fill there) and the end of
the run, or if any request got a 5xx or no answer. Exits 0 otherwise.

    albert-serve-demo --build-only --models-dir /tmp/demo        # small random models, or any others
    ALBERT_QA_MODEL=/tmp/demo/qa ... albert-serve --port 8000 &
    python -m bench.soak --url http://127.0.0.1:8000 --pid $! --requests 5000 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

# Words of several scripts and kinds (names, numbers, accents, punctuation), joined at random.
_VOCABULARY = (
    "the a of and to in for with by from at as is was were has had will can not no city river capital "
    "university museum station engineer teacher doctor writer team season match goal company market bank "
    "Anna George Maria Peter Linda Thomas Paris London Berlin Tokyo Madrid Rome Zürich München São Paulo "
    "café naïve crème 1879 1901 2024 3.50 % ! ? , . — 日本語"
)
WORDS = _VOCABULARY.split()
MASK = "[MASK]"

# Requests no client should send; each must get its 4xx, never a 5xx, whatever the load around it.
MALFORMED: list[tuple[str, bytes]] = [
    ("/classify", b'{"inputs": '),
    ("/classify", b""),
    ("/ner", b'{"inputs": "   "}'),
    ("/fill-mask", b'{"inputs": "no mask here"}'),
    ("/qa", b'{"inputs": {"question": "", "context": "Paris."}}'),
    ("/classify", b'{"inputs": "a", "parameters": {"top_k": 0}}'),
    ("/ner", b'{"inputs": "a", "parameters": {"aggregation_strategy": "median"}}'),
    ("/classify", b'{"inputs": "\xff\xfe"}'),
    ("/ner", b'{"inputs": "a\\u0000b"}'),
    ("/ner", json.dumps({"inputs": ["a"] * 1000}).encode()),
]


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _masked(rng: random.Random) -> str:
    words = _text(rng, 3, 120).split()
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        words.insert(rng.randrange(min(len(words), 40) + 1), MASK)  # early: a mask cut off would be a 422
    return " ".join(words)


PARAMETERS = {
    "/classify": [{}, {"top_k": 1}, {"function_to_apply": "sigmoid"}],
    "/fill-mask": [{}, {"top_k": 10}, {"targets": ["Paris", "city"]}],
    "/qa": [{}, {"top_k": 3}, {"max_seq_len": 64, "doc_stride": 16}, {"handle_impossible_answer": True}],
    "/ner": [{}, {"aggregation_strategy": "none"}, {"aggregation_strategy": "max"}, {"stride": 16}],
}


def _one_input(path: str, rng: random.Random):
    if path == "/classify":
        if rng.random() < 0.1:
            return {"text": _text(rng, 1, 40), "text_pair": _text(rng, 1, 40)}
        return _text(rng, 1, 220)  # up to past the model's maximum: truncated
    if path == "/fill-mask":
        return _masked(rng)
    if path == "/qa":
        return {"question": _text(rng, 3, 8) + "?", "context": _text(rng, 5, 700)}  # long ones: windows
    return _text(rng, 1, 300)


def mixed_requests(count: int, seed: int = 0) -> list[tuple[str, bytes, bool]]:
    """(path, JSON body, expected to succeed) for `count` requests of every kind."""
    rng = random.Random(seed)
    result = []
    for _ in range(count):
        if rng.random() < 0.05:
            path, body = rng.choice(MALFORMED)
            result.append((path, body, False))
            continue
        path = rng.choice(list(PARAMETERS))
        if rng.random() < 0.15:
            inputs = [_one_input(path, rng) for _ in range(rng.randint(2, 8))]
        else:
            inputs = _one_input(path, rng)
        body = {"inputs": inputs, "parameters": rng.choice(PARAMETERS[path])}
        result.append((path, json.dumps(body).encode(), True))
    return result


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # 5xx, transport errors, good requests refused
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, requests done, RSS MiB)
    done: int = 0


def drive(
    url: str, pid: int, requests: list[tuple[str, bytes, bool]], concurrency: int, interval: float
) -> tuple[Run, float]:
    run = Run()
    lock = threading.Lock()
    next_index = iter(range(len(requests)))
    finished = threading.Event()
    start = time.monotonic()

    def sample() -> None:
        while True:
            with lock:
                done = run.done
            run.samples.append((time.monotonic() - start, done, rss_mib(pid)))
            if finished.wait(interval):
                return

    def client_loop(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                path, body, should_succeed = requests[index]
                headers = {"Content-Type": "application/json", "X-Request-ID": f"soak-{index}"}
                t0 = time.monotonic()
                try:
                    status = client.post(path, content=body, headers=headers).status_code
                except httpx.HTTPError as exc:
                    status, problem = 0, f"{path} #{index}: {type(exc).__name__}: {exc}"
                else:
                    problem = None
                    if (
                        status >= 500
                        or (should_succeed and status != 200)
                        or (not should_succeed and status < 400)
                    ):
                        problem = f"{path} #{index}: status {status}"
                with lock:
                    run.latencies.append(time.monotonic() - t0)
                    run.statuses[status] += 1
                    run.done += 1
                    if problem:
                        run.unexpected.append(problem)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    workers = [
        threading.Thread(target=client_loop, args=(i,), name=f"client-{i}") for i in range(concurrency)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - start
    finished.set()
    sampler.join()
    run.samples.append((seconds, run.done, rss_mib(pid)))
    return run, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="Base URL of a started, ready albert-serve.")
    parser.add_argument(
        "--pid", type=int, required=True, help="The server's process id (its RSS is sampled)."
    )
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-interval", type=float, default=1.0, help="Seconds between RSS samples.")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument(
        "--max-growth-mib",
        type=float,
        default=64.0,
        help="Largest RSS growth allowed from the end of the warm-up to the end of the run.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples-csv", type=Path, help="Also write every (seconds, requests, RSS MiB) sample here."
    )
    args = parser.parse_args(argv)

    if httpx.get(args.url + "/ready", timeout=10).status_code != 200:
        print(f"{args.url} is not ready", file=sys.stderr)
        return 2
    requests = mixed_requests(args.requests, args.seed)
    print(
        f"soak: {len(requests)} requests at concurrency {args.concurrency} against {args.url} (pid {args.pid})"
    )
    run, seconds = drive(args.url, args.pid, requests, args.concurrency, args.sample_interval)

    warm_after = int(args.warmup_fraction * len(requests))
    rss = [r for _, _, r in run.samples]
    warm = next(r for _, done, r in run.samples if done >= warm_after)
    second_half = [(t, r) for t, done, r in run.samples if done >= len(requests) // 2]
    slope = (
        float(np.polyfit(*zip(*second_half, strict=True), 1)[0]) if len(second_half) >= 3 else float("nan")
    )
    growth = rss[-1] - warm
    latencies = np.array(run.latencies) * 1000
    summary = {
        "requests": run.done,
        "seconds": round(seconds, 1),
        "requests_per_s": round(run.done / seconds, 1),
        "statuses": dict(sorted(run.statuses.items())),
        "latency_ms": {q: round(float(np.percentile(latencies, q)), 1) for q in (50, 90, 99)}
        | {"max": round(float(latencies.max()), 1)},
        "rss_mib": {
            "start": round(rss[0], 1),
            "after_warmup": round(warm, 1),
            "peak": round(max(rss), 1),
            "end": round(rss[-1], 1),
            "growth_after_warmup": round(growth, 1),
            "second_half_slope_mib_per_min": round(slope * 60, 2),
        },
        "samples": len(run.samples),
        "max_growth_mib": args.max_growth_mib,
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    if args.samples_csv:
        lines = ["seconds,requests,rss_mib"] + [f"{t:.2f},{done},{r:.1f}" for t, done, r in run.samples]
        args.samples_csv.write_text("\n".join(lines) + "\n")
    failures = []
    if run.unexpected:
        failures.append(f"{len(run.unexpected)} unexpected answers, e.g. {run.unexpected[:3]}")
    if growth > args.max_growth_mib:
        failures.append(f"RSS grew {growth:.1f} MiB after the warm-up (bound {args.max_growth_mib:g} MiB)")
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    if not failures:
        print(
            f"OK: memory flat within {args.max_growth_mib:g} MiB after the warm-up; no 5xx, no lost request"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
