"""float32 against bfloat16, in one command: `python -m bench.precision` (under `flock /tmp/albert-bench.lock`).

On albert-base-shaped checkpoints (bench.run's classifier, bench.embed's sentence-transformers embedder; random
weights, real shapes), texts of 6-40 words, in one run:

1. the matmul rooflines of this machine: float32 x float32, and bfloat16 x bfloat16 accumulated in float32 (the
   path XLA's CPU backend runs natively on AVX512-BF16 / AMX), at albert-base's matmul shapes;
2. for each dtype, albert-serve serving both models with `--dtype`, its whole grid compiled: `/classify` and
   `/embed` at c=16 (requests/s; useful FLOP/s as a fraction of that dtype's roofline) and at c=1 (p50, p99);
3. the bare forward pass of each c=1 input alone, unpadded, jitted for its exact length, in that dtype (the
   floor for one request), measured right before and after the c=1 runs;
4. the ratios: bfloat16 / float32 requests/s at c=16 (target >= 1.6x), roofline fractions (target >= 75%), and
   c=1 p50 / bare forward (target <= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from service.settings import ENDPOINTS, model_env_var

from . import checkpoint, texts
from .embed import build_checkpoint, uptime
from .run import CACHE, BareForward, Flops, Server, _timed, drive, serve_env, token_counts

PORT = 8741
ENDPOINT_MODELS = ("classify", "embed")
DTYPES = ("float32", "bfloat16")


def rooflines() -> dict[str, float]:
    """Best matmul FLOP/s per dtype at albert-base's shapes (bf16 operands accumulate in float32)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    best = {}
    for dtype in DTYPES:
        for m, k, n in [(512, 768, 3072), (2048, 768, 3072), (2048, 3072, 768), (2048, 768, 768)]:
            a = jnp.asarray(rng.standard_normal((m, k)), dtype)
            b = jnp.asarray(rng.standard_normal((k, n)), dtype)
            f = (
                jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
                .lower(a, b)
                .compile()
            )
            f(a, b).block_until_ready()
            seconds = min(_timed(lambda f=f, a=a, b=b: f(a, b).block_until_ready()) for _ in range(10))
            best[dtype] = max(best.get(dtype, 0.0), 2 * m * k * n / seconds)
    return best


def serve(dtype: str, repos: dict[str, Path], args) -> Server:
    env = {model_env_var(e): (str(repos["classify"]) if e == "classify" else "") for e in ENDPOINTS}
    env.update(serve_env(PORT, ALBERT_MODELS=f"embed={repos['embed']}", ALBERT_DTYPE=dtype))
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return Server(f"{dtype}", [sys.executable, "-m", "service"], env, PORT, logs / f"precision-{dtype}.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per measurement")
    args = parser.parse_args(argv)
    print(f"uptime before: {uptime()}", flush=True)
    repos = {
        "classify": checkpoint.build_extra(
            CACHE / "models", "classify", "classify", checkpoint.LABELS.get("classify")
        ),
        "embed": build_checkpoint(CACHE / "models"),
    }
    shape = json.loads((repos["classify"] / "config.json").read_text())
    flops = Flops(shape)
    bodies = {e: texts.requests("classify", 256, seed=1) for e in ENDPOINT_MODELS}
    latency_bodies = texts.requests("classify", 16, seed=2)
    tokens = {e: token_counts(repos[e], "classify", bodies[e]) for e in ENDPOINT_MODELS}
    latency_tokens = token_counts(repos["classify"], "classify", latency_bodies)
    roof = rooflines()
    print(", ".join(f"{d} roofline {r / 1e9:.0f} GFLOP/s" for d, r in roof.items()), flush=True)

    results: dict[str, dict] = {}
    for dtype in DTYPES:
        bare = {e: BareForward(repos[e], latency_bodies, dtype) for e in ENDPOINT_MODELS}
        server = serve(dtype, repos, args)
        try:
            print(
                f"{dtype}: ready in {server.wait_ready():.0f}s; grid complete {server.wait_grid():.0f}s later"
            )
            row: dict = {}
            for endpoint in ENDPOINT_MODELS:
                loaded = drive(server, endpoint, bodies[endpoint], tokens[endpoint], [16], args.duration)[16]
                needed = np.mean([flops.needed(endpoint, t, 1) for t in tokens[endpoint]])
                before = bare[endpoint].measure()
                alone = drive(server, endpoint, latency_bodies, latency_tokens, [1], args.duration)[1]
                after = bare[endpoint].measure()
                floor = statistics.median([min(a, b) for a, b in zip(before, after, strict=True)])
                row[endpoint] = {
                    "c16_rps": loaded.requests_per_s,
                    "c16_p99_ms": loaded.percentile(99) * 1000,
                    "roofline_fraction": loaded.requests_per_s * needed / roof[dtype],
                    "c1_p50_ms": alone.percentile(50) * 1000,
                    "c1_p99_ms": alone.percentile(99) * 1000,
                    "bare_ms": floor * 1000,
                }
            results[dtype] = row
        finally:
            server.stop()

    print(f"\nuptime after: {uptime()}")
    print("\n| endpoint | dtype | c=16 req/s | vs float32 | % of its roofline | c=1 p50 ms | bare forward ms "
          "| p50 / bare | c=1 p99 ms |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for endpoint in ENDPOINT_MODELS:
        for dtype in DTYPES:
            r = results[dtype][endpoint]
            ratio = r["c16_rps"] / results["float32"][endpoint]["c16_rps"]
            print(
                f"| /{endpoint} | {dtype} | {r['c16_rps']:.1f} | {ratio:.2f}x | {r['roofline_fraction']:.0%} | "
                f"{r['c1_p50_ms']:.0f} | {r['bare_ms']:.0f} | {r['c1_p50_ms'] / r['bare_ms']:.2f}x | "
                f"{r['c1_p99_ms']:.0f} |"
            )
    out = CACHE.parent / "results" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rooflines": roof, "results": results}, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
