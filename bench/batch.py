"""The batch-job benchmark, in one command: `python -m bench.batch [--rows 2048]`.

On the albert-base-shaped sentence-transformers checkpoint of bench.embed (random weights, real shapes), with
texts of 6-40 words, in one run:

1. the float32 matmul roofline of this machine and the useful FLOPs of the texts (a full forward pass of
   every real token);
2. the service's best way for a client: albert-serve serving that checkpoint, /embed driven by 4 clients
   sending 32 texts a request for `--duration` seconds (texts/s);
3. `albert-serve batch` on a JSON-lines file of `--rows` texts, in its own process, on the same compilation
   cache: texts/s with start-up and without it (from its log), its peak resident memory;
4. the ratios: batch / service (targets: >= 1.0x with start-up, >= 1.3x without) and the roofline fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from service.settings import ENDPOINTS, model_env_var

from . import texts
from .embed import build_checkpoint, uptime
from .run import CACHE, Flops, Server, matmul_roofline, token_counts

PORT = 8731
CLIENTS, PER_REQUEST = 4, 32


def service_texts_per_s(directory: Path, sentences: list[str], duration: float) -> float:
    env = dict(
        ALBERT_MODELS=f"embed={directory}",
        ALBERT_HOST="127.0.0.1",
        ALBERT_PORT=str(PORT),
        ALBERT_COMPILATION_CACHE_DIR=str(CACHE / "jax"),
        ALBERT_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
    )
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


def batch_job(directory: Path, source: Path, output: Path) -> dict:
    command = [
        "/usr/bin/time", "-f", "maxrss_kb=%M",
        sys.executable, "-m", "service", "batch", str(source), str(output), "--model", str(directory),
        "--compilation-cache-dir", str(CACHE / "jax"), "--log-level", "info",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in [model_env_var(e) for e in ENDPOINTS]}
    start = time.monotonic()
    finished = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.monotonic() - start
    if finished.returncode != 0:
        raise RuntimeError(f"batch job failed:\n{finished.stderr[-3000:]}")
    ready_at = None
    for line in finished.stderr.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg", "").startswith("model ") and " ready in " in record["msg"]:
            ready_at = float(record["msg"].rsplit(" ready in ", 1)[1].rstrip("s"))
    maxrss = next(int(x.split("=")[1]) for x in finished.stderr.splitlines() if x.startswith("maxrss_kb="))
    return {"wall_s": wall, "startup_s": ready_at, "maxrss_mb": maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048, help="texts in the batch job's input")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of /embed load on the service")
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
    job = batch_job(directory, source, output)
    with_startup = args.rows / job["wall_s"]
    without = args.rows / (job["wall_s"] - (job["startup_s"] or 0.0))
    print(
        f"batch job: {args.rows} texts in {job['wall_s']:.1f}s (start-up {job['startup_s']:.1f}s), "
        f"peak RSS {job['maxrss_mb']:.0f} MB",
        flush=True,
    )
    print("\n| way | texts/s | vs service | useful GFLOP/s (% of roofline) |\n|---|---|---|---|")
    for name, rate in [
        (f"service /embed c={CLIENTS}x{PER_REQUEST}", served),
        ("batch, start-up included", with_startup),
        ("batch, start-up excluded", without),
    ]:
        useful = rate * flop_per_text
        print(f"| {name} | {rate:.1f} | {rate / served:.2f}x | {useful / 1e9:.0f} ({useful / roof:.0%}) |")
    print(f"\nuptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
