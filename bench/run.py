"""The benchmark, in one command: `python -m bench.run`.

1. builds albert-base-v2-shaped checkpoints (random weights, real shapes and a 30,000-piece vocabulary);
2. measures the float32 matmul roofline of this machine and one bare forward pass per input (measured again
   right before and after albert-serve's c=1 latency run, which it is compared with);
3. starts the baseline (FastAPI + transformers pipelines on PyTorch, one request at a time), drives each endpoint
   with closed-loop load at concurrency 1 and 16, and stops it;
4. does the same with albert-serve on the same checkpoints;
5. prints requests/s, p50 and p99 latency, the ratios, useful FLOP/s (see `Flops`) against the roofline, and the
   targets.

Servers run one at a time, so neither competes with the other for the CPU. Results are also written as JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from service.settings import ENDPOINTS, model_env_var

from . import chart, checkpoint, texts
from .load import LoadResult, run_load

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"


# --- measurements that need no server ---------------------------------------------------------------------


def matmul_roofline() -> dict:
    """Best float32 matmul throughput on this machine (JAX/XLA, the library serving uses), in FLOP/s."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    results = {}
    for m, k, n in [(512, 768, 3072), (1024, 768, 3072), (2048, 768, 3072), (2048, 2048, 2048)]:
        a = jnp.asarray(rng.standard_normal((m, k), np.float32))
        b = jnp.asarray(rng.standard_normal((k, n), np.float32))
        f = jax.jit(jnp.matmul).lower(a, b).compile()
        f(a, b).block_until_ready()
        best = min(_timed(lambda f=f, a=a, b=b: f(a, b).block_until_ready()) for _ in range(15))
        results[f"{m}x{k}x{n}"] = 2 * m * k * n / best
    return {"roofline_flops": max(results.values()), "by_shape": results}


class Flops:
    """Matmul FLOPs of the albert-base-shaped model (attention scores and element-wise work not counted).

    `per_token` is a full forward pass per token, the issue's "about 170 MFLOP". What a request *needs* is
    less for the heads that read a single token ([CLS] for classify, the mask for fill-mask): the last layer
    only has to produce that token, and needs just the keys and values of the others. Useful FLOP/s are
    counted by what requests need, the same for both servers, so work skipped is never counted as done.
    """

    def __init__(self, shape: dict):
        h, i, e = shape["hidden_size"], shape["intermediate_size"], shape["embedding_size"]
        self.layer = 2 * (4 * h * h + 2 * h * i)
        self.keys_values = 2 * (2 * h * h)
        self.layers = shape["num_hidden_layers"]
        self.per_token = self.layers * self.layer + 2 * e * h

    def needed(self, endpoint: str, tokens: int, sequences: int) -> float:
        if endpoint not in ("classify", "fill-mask"):
            return tokens * self.per_token
        return tokens * (self.per_token - self.layer + self.keys_values) + sequences * (
            self.layer - self.keys_values
        )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def token_counts(directory: Path, endpoint: str, bodies: list[dict]) -> list[int]:
    """Model tokens each request costs (special tokens included), as albert-serve tokenizes it."""
    from model import load_tokenizer

    tokenizer = load_tokenizer(directory)
    counts = []
    for body in bodies:
        inputs = body["inputs"]
        if endpoint == "qa":
            counts.append(len(tokenizer.encode(inputs["question"], inputs["context"])[0].ids))
        else:
            counts.append(len(tokenizer.encode(inputs)[0].ids))
    return counts


class BareForward:
    """One forward pass of each input alone, unpadded, jitted for its exact length: the floor for latency.

    Compiled once, measured when asked: the benchmark measures it right before and right after the c=1
    latency run, because this machine's speed drifts by 10-20% over minutes (shared host) and a reference
    taken minutes away from what it is compared with would be off by as much.
    """

    def __init__(self, directory: Path, bodies: list[dict], dtype: str = "float32"):
        import jax

        from model import from_pretrained, load_tokenizer

        model = from_pretrained(directory, dtype=dtype)
        tokenizer = load_tokenizer(directory)
        forward = jax.jit(  # the first output (logits, or the hidden states of a bare backbone)
            lambda p, ids, types: jax.tree_util.tree_leaves(
                model.module.apply({"params": p}, ids, token_type_ids=types)
            )[0]
        )
        self.params = model.params
        self.runs = []
        for body in bodies:
            encoding = tokenizer.encode(body["inputs"])[0]
            ids = np.asarray([encoding.ids], np.int32)
            types = np.asarray([encoding.type_ids], np.int32)
            self.runs.append((forward.lower(model.params, ids, types).compile(), ids, types))

    def measure(self) -> list[float]:
        """The typical time of each input's forward pass (median of 9 back to back, after one untimed)."""
        times = []
        for compiled, ids, types in self.runs:
            compiled(self.params, ids, types).block_until_ready()
            times.append(
                statistics.median(
                    _timed(lambda c=compiled, i=ids, t=types: c(self.params, i, t).block_until_ready())
                    for _ in range(9)
                )
            )
        return times


# --- servers --------------------------------------------------------------------------------------------


def serve_env(port: int, **variables: str) -> dict[str, str]:
    """The ALBERT_* variables of a benchmarked albert-serve on this machine's loopback, on the benchmarks'
    shared compilation cache, offline, with `variables` (its models, dtype, ...) added."""
    return dict(
        ALBERT_HOST="127.0.0.1",
        ALBERT_PORT=str(port),
        ALBERT_COMPILATION_CACHE_DIR=str(CACHE / "jax"),
        ALBERT_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
        **variables,
    )


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.log_path = log

    def wait_ready(self, timeout: float = 1800) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout}s")

    def wait_grid(self, timeout: float = 1800) -> float:
        """Wait until every model's whole grid is compiled and timed (a server without progressive readiness
        reports no grid: complete once ready); the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            models = httpx.get(self.url + "/models", timeout=10).json().get("models", [])
            if all(m.get("grid", {}).get("complete", True) for m in models):
                return time.monotonic() - start
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: grid not complete after {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()

    def metric(self, name: str) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name):
                key, value = line.rsplit(" ", 1)
                values[key] = float(value)
        return values


def drive(server: Server, endpoint: str, bodies, tokens, concurrencies, duration) -> dict[int, LoadResult]:
    results = {}
    for concurrency in concurrencies:
        result = run_load(server.url, endpoint, bodies, tokens, concurrency, duration=duration)
        results[concurrency] = result
        print(
            f"  {server.name:>10} {endpoint:>9} c={concurrency:<3} {result.requests_per_s:7.1f} req/s  "
            f"p50 {result.percentile(50) * 1000:7.1f} ms  p99 {result.percentile(99) * 1000:7.1f} ms  "
            f"statuses {result.statuses}",
            flush=True,
        )
    return results


# --- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per load point")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve-args", default="", help="extra albert-serve flags, e.g. '--max-wait-ms 5'")
    args = parser.parse_args(argv)
    endpoints = [e for e in args.endpoints.split(",") if e]
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    CACHE.mkdir(parents=True, exist_ok=True)
    print("building the albert-base-shaped checkpoints (cached in bench/.cache) ...", flush=True)
    repos = checkpoint.build(CACHE / "models")
    shape = checkpoint.describe(repos)
    flops = Flops(shape)
    print(f"model {shape}: {flops.per_token / 1e6:.1f} MFLOP per token", flush=True)

    bodies = {endpoint: texts.requests(endpoint, 256, seed=1) for endpoint in endpoints}
    tokens = {endpoint: token_counts(repos[endpoint], endpoint, bodies[endpoint]) for endpoint in endpoints}
    latency_bodies = texts.requests("classify", 16, seed=2)
    latency_tokens = token_counts(repos["classify"], "classify", latency_bodies)

    print("measuring the matmul roofline and bare forward passes ...", flush=True)
    roofline = matmul_roofline()
    bare = BareForward(repos["classify"], latency_bodies) if "classify" in endpoints else None
    print(
        f"roofline {roofline['roofline_flops'] / 1e9:.0f} GFLOP/s (float32 matmul, best of {list(roofline['by_shape'])})"
        + (f"; bare forward median {statistics.median(bare.measure()) * 1000:.1f} ms" if bare else ""),
        flush=True,
    )
    around_latency: list[float] = []  # bare forward times measured just before and after the c=1 run

    results: dict[str, dict] = {"baseline": {}, "albert-serve": {}}
    logs = CACHE / "logs"
    logs.mkdir(exist_ok=True)
    if not args.skip_baseline:
        baseline = Server(
            "baseline",
            [sys.executable, "-m", "bench.baseline_server"],
            {"BASELINE_MODELS": json.dumps({e: str(repos[e]) for e in endpoints}), "BASELINE_PORT": "8711"},
            8711,
            logs / "baseline.log",
        )
        try:
            print(f"baseline ready in {baseline.wait_ready():.0f}s", flush=True)
            for endpoint in endpoints:
                results["baseline"][endpoint] = drive(
                    baseline, endpoint, bodies[endpoint], tokens[endpoint], concurrencies, args.duration
                )
            if "classify" in endpoints and 1 in concurrencies:
                results["baseline"]["latency"] = run_load(
                    baseline.url, "classify", latency_bodies, latency_tokens, 1, duration=args.duration
                )
        finally:
            baseline.stop()

    env = {model_env_var(e): (str(repos[e]) if e in endpoints else "") for e in ENDPOINTS}
    env.update(serve_env(8712))
    ours = Server(
        "albert-serve",
        [sys.executable, "-m", "service", *args.serve_args.split()],
        env,
        8712,
        logs / "albert-serve.log",
    )
    try:
        startup = ours.wait_ready()
        print(f"albert-serve ready in {startup:.0f}s (compilation cache: {CACHE / 'jax'})", flush=True)
        grid = ours.wait_grid()  # measured with every bucket in use
        print(f"albert-serve's whole grid compiled {grid:.0f}s later", flush=True)
        for endpoint in endpoints:
            results["albert-serve"][endpoint] = drive(
                ours, endpoint, bodies[endpoint], tokens[endpoint], concurrencies, args.duration
            )
        if "classify" in endpoints and 1 in concurrencies:
            around_latency += bare.measure()
            results["albert-serve"]["latency"] = run_load(
                ours.url, "classify", latency_bodies, latency_tokens, 1, duration=args.duration
            )
            around_latency += bare.measure()
        padding = ours.metric("albert_batch_padding_ratio_sum")
        batches = ours.metric("albert_batch_padding_ratio_count")
        compilations = ours.metric("albert_compilations ")
    finally:
        ours.stop()

    report = summarize(
        results,
        endpoints,
        concurrencies,
        roofline,
        around_latency,
        flops,
        startup,
        padding,
        batches,
        compilations,
    )
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    path = out / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {path}")
    print(f"chart written to {chart.write_chart(path)}")
    return 0 if report["targets_met"] else 1


def summarize(
    results,
    endpoints,
    concurrencies,
    roofline,
    bare,
    flops: Flops,
    startup,
    padding,
    batches,
    compilations,
) -> dict:
    roof = roofline["roofline_flops"]
    rows = []
    print("\n| endpoint | c | server | req/s | p50 ms | p99 ms | useful GFLOP/s | % roofline | all 200 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for endpoint in endpoints:
        for c in concurrencies:
            for server in ("baseline", "albert-serve"):
                r = results[server].get(endpoint, {}).get(c)
                if r is None:
                    continue
                useful = flops.needed(endpoint, r.tokens, r.completed) / r.seconds
                rows.append(
                    dict(
                        endpoint=endpoint,
                        concurrency=c,
                        server=server,
                        rps=r.requests_per_s,
                        p50_ms=r.percentile(50) * 1000,
                        p99_ms=r.percentile(99) * 1000,
                        useful_gflops=useful / 1e9,
                        roofline_pct=100 * useful / roof,
                        all_ok=r.all_ok,
                        statuses=r.statuses,
                    )
                )
                print(
                    f"| {endpoint} | {c} | {server} | {r.requests_per_s:.1f} | {r.percentile(50) * 1000:.1f} | "
                    f"{r.percentile(99) * 1000:.1f} | {useful / 1e9:.0f} | {100 * useful / roof:.0f}% | {r.all_ok} |"
                )
    targets = {}
    ours, base = results["albert-serve"], results["baseline"]
    if "classify" in endpoints and 16 in concurrencies:
        o16 = ours["classify"][16]
        useful = flops.needed("classify", o16.tokens, o16.completed) / o16.seconds
        targets["classify c=16 >= 80% of roofline"] = (100 * useful / roof, 100 * useful / roof >= 80)
        if base:
            b16 = base["classify"][16]
            targets["classify c=16 >= 2x baseline req/s"] = (
                o16.requests_per_s / b16.requests_per_s,
                o16.requests_per_s >= 2 * b16.requests_per_s,
            )
            targets["classify c=16 p99 <= baseline p99 / 2"] = (
                o16.percentile(99) / b16.percentile(99),
                o16.percentile(99) <= b16.percentile(99) / 2,
            )
    if "latency" in ours and bare:
        p50 = ours["latency"].percentile(50)
        floor = statistics.median(bare)
        print(
            f"\nclassify c=1: p50 {p50 * 1000:.1f} ms; bare forward of the same inputs, measured just before and "
            f"after: median {floor * 1000:.1f} ms"
        )
        targets["classify c=1 p50 within 15% of a bare forward pass"] = (p50 / floor, p50 <= 1.15 * floor)
        if "latency" in base:
            targets["classify c=1 p50 <= baseline p50"] = (
                p50 / base["latency"].percentile(50),
                p50 <= base["latency"].percentile(50),
            )
    all_ok = all(row["all_ok"] for row in rows)
    targets["every response 200"] = (float(all_ok), all_ok)
    print("\n| target | measured | met |\n|---|---|---|")
    for name, (value, met) in targets.items():
        print(f"| {name} | {value:.2f} | {'yes' if met else 'NO'} |")
    mean_padding = sum(padding.values()) / max(1.0, sum(batches.values()))
    print(
        f"\nalbert-serve: start-up {startup:.0f}s; mean padding per batch {100 * mean_padding:.1f}%; "
        f"compilations {compilations}; roofline {roof / 1e9:.0f} GFLOP/s; machine {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name()},
        "flops_per_token": flops.per_token,
        "roofline": roofline,
        "bare_forward_ms": [t * 1000 for t in bare],
        "startup_s": startup,
        "rows": rows,
        "targets": {k: {"value": v, "met": m} for k, (v, m) in targets.items()},
        "targets_met": all(m for _, m in targets.values()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
