"""The batch-job benchmark, in one command: `python -m bench.batch [--rows 2048]`.

On the albert-base-shaped sentence-transformers checkpoint of bench.embed (random weights, real shapes), with
texts of 6-40 words, in one run:

1. the float32 matmul roofline of this machine and the useful FLOPs of the texts (a full forward pass of
   every real token);
2. the service's best way for a client: albert-serve serving that checkpoint, /embed driven by 4 clients
   sending 32 texts a request for `--duration` seconds (texts/s);
3. `albert-serve batch` on a JSON-lines file of `--rows` texts, in its own process, on the same compilation
   cache: texts/s with start-up and without it (from its log), its peak resident memory;
4. the same job with `--ray local` (a Ray started by the job, one actor): texts/s with everything included
   (Ray's start, the actor's engine) and in its steady state (between its first and last chunk);
5. the ratios: batch / service (targets: >= 1.0x with start-up, >= 1.3x without) and the roofline fraction;
6. memory against input size: the job's peak resident memory on `--memory-rows` rows (10k and 100k) of a
   small checkpoint of the same layout (the model's cost is not what grows with the input; rows are).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

from service.settings import ENDPOINTS, model_env_var

from . import texts
from .embed import build_checkpoint, uptime
from .run import CACHE, Flops, Server, matmul_roofline, serve_env, token_counts

PORT = 8731
CLIENTS, PER_REQUEST = 4, 32


def service_texts_per_s(directory: Path, sentences: list[str], duration: float) -> float:
    env = serve_env(PORT, ALBERT_MODELS=f"embed={directory}")
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = Server("albert-serve", [sys.executable, "-m", "service"], env, PORT, logs / "batch-serve.log")
    try:
        print(f"service ready in {server.wait_ready():.0f}s; waiting for its whole grid ...", flush=True)
        server.wait_grid()
        done = [0]
        failures = [0]
        stop = time.monotonic() + duration

        def client(offset: int) -> None:
            with httpx.Client(timeout=300) as http:
                i = offset
                while time.monotonic() < stop:
                    batch = [sentences[(i + k) % len(sentences)] for k in range(PER_REQUEST)]
                    i += PER_REQUEST * CLIENTS
                    response = http.post(f"{server.url}/embed", json={"inputs": batch})
                    if response.status_code == 200:
                        done[0] += PER_REQUEST
                    else:
                        failures[0] += 1

        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(c * PER_REQUEST,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        if failures[0]:
            print(f"  {failures[0]} request(s) failed", flush=True)
        return done[0] / elapsed
    finally:
        server.stop()


def batch_job(directory: Path, source: Path, output: Path, *extra: str) -> dict:
    command = [
        "/usr/bin/time", "-f", "maxrss_kb=%M",
        sys.executable, "-m", "service", "batch", str(source), str(output), "--model", str(directory),
        "--compilation-cache-dir", str(CACHE / "jax"), "--log-level", "info", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in [model_env_var(e) for e in ENDPOINTS]}
    start = time.monotonic()
    finished = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.monotonic() - start
    if finished.returncode != 0:
        raise RuntimeError(f"batch job failed:\n{finished.stderr[-3000:]}")
    ready_at = None
    chunks = []  # (time, rows) of each chunk's log line
    for line in finished.stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message = record.get("msg", "")
        if message.startswith("model ") and " ready in " in message:
            ready_at = float(message.rsplit(" ready in ", 1)[1].rstrip("s"))
        if message.startswith("chunk "):
            stamp = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
            chunks.append((stamp, int(message.split(": ", 1)[1].split(" rows", 1)[0])))
    # Steady state: the rows of every chunk after the first, over the time from the first chunk to the last.
    steady = sum(r for _, r in chunks[1:]) / (chunks[-1][0] - chunks[0][0]) if len(chunks) > 2 else None
    maxrss = next(int(x.split("=")[1]) for x in finished.stderr.splitlines() if x.startswith("maxrss_kb="))
    return {"wall_s": wall, "startup_s": ready_at, "maxrss_mb": maxrss / 1024, "steady_texts_s": steady}


def memory_against_rows(counts: list[int], work: Path) -> list[tuple[int, float, float]]:
    """(rows, peak RSS MB, seconds) of a job on `rows` texts of a small checkpoint."""
    small = build_checkpoint(
        CACHE / "models",
        "embed-small",
        hidden_size=128,
        num_attention_heads=2,
        intermediate_size=256,
        embedding_size=64,
        num_hidden_layers=2,
    )
    sentences = [body["inputs"] for body in texts.requests("classify", 4096, seed=2)]
    results = []
    for rows in counts:
        source = work / f"memory-{rows}.jsonl"
        with source.open("w") as handle:
            for i in range(rows):
                handle.write(json.dumps({"id": i, "text": sentences[i % len(sentences)]}) + "\n")
        job = batch_job(small, source, work / f"memory-{rows}-{time.strftime('%Y%m%d-%H%M%S')}")
        results.append((rows, job["maxrss_mb"], job["wall_s"]))
        print(f"memory: {rows} rows, peak RSS {job['maxrss_mb']:.0f} MB, {job['wall_s']:.0f}s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048, help="texts in the batch job's input")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of /embed load on the service")
    parser.add_argument("--no-ray", action="store_true", help="leave out the job on a local Ray")
    parser.add_argument(
        "--memory-rows", default="10000,100000", help="row counts of the memory runs ('' to leave them out)"
    )
    args = parser.parse_args(argv)
    print(f"uptime before: {uptime()}", flush=True)
    for variable in [model_env_var(e) for e in ENDPOINTS] + ["ALBERT_MODELS_FILE", "ALBERT_MODELS"]:
        os.environ.pop(variable, None)
    directory = build_checkpoint(CACHE / "models")
    flops = Flops(json.loads((directory / "config.json").read_text()))
    sentences = [body["inputs"] for body in texts.requests("classify", args.rows, seed=1)]
    tokens = token_counts(directory, "embed", [{"inputs": s} for s in sentences])
    flop_per_text = flops.per_token * sum(tokens) / len(tokens)
    roof = matmul_roofline()["roofline_flops"]
    print(
        f"roofline {roof / 1e9:.0f} GFLOP/s; {flop_per_text / 1e9:.2f} GFLOP per text on average", flush=True
    )

    served = service_texts_per_s(directory, sentences, args.duration)
    print(f"service /embed c={CLIENTS}x{PER_REQUEST}: {served:.1f} texts/s", flush=True)

    work = CACHE / "batch"
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"input-{args.rows}.jsonl"
    source.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    output = work / f"output-{time.strftime('%Y%m%d-%H%M%S')}"
    chunk_rows = ["--chunk-rows", str(max(args.rows // 8, 1))]  # several chunks: a steady state to measure
    job = batch_job(directory, source, output, *chunk_rows)
    with_startup = args.rows / job["wall_s"]
    without = args.rows / (job["wall_s"] - (job["startup_s"] or 0.0))
    print(
        f"batch job: {args.rows} texts in {job['wall_s']:.1f}s (start-up {job['startup_s']:.1f}s), "
        f"peak RSS {job['maxrss_mb']:.0f} MB",
        flush=True,
    )
    ways = [
        (f"service /embed c={CLIENTS}x{PER_REQUEST}", served),
        ("batch, start-up included", with_startup),
        ("batch, start-up excluded", without),
    ]
    if not args.no_ray:
        on_ray = batch_job(directory, source, Path(f"{output}-ray"), *chunk_rows, "--ray", "local")
        print(f"batch job on a local Ray: {args.rows} texts in {on_ray['wall_s']:.1f}s", flush=True)
        ways.append(("batch on local Ray, everything included", args.rows / on_ray["wall_s"]))
        if on_ray["steady_texts_s"]:
            ways.append(("batch on local Ray, steady (first to last chunk)", on_ray["steady_texts_s"]))
    memory = memory_against_rows([int(n) for n in args.memory_rows.split(",") if n.strip()], work)

    print("\n| way | texts/s | vs service | useful GFLOP/s (% of roofline) |\n|---|---|---|---|")
    for name, rate in ways:
        useful = rate * flop_per_text
        print(f"| {name} | {rate:.1f} | {rate / served:.2f}x | {useful / 1e9:.0f} ({useful / roof:.0%}) |")
    if memory:
        print("\n| rows (small checkpoint) | peak RSS MB | seconds |\n|---|---|---|")
        for rows, rss, seconds in memory:
            print(f"| {rows} | {rss:.0f} | {seconds:.0f} |")
    print(f"\nuptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
