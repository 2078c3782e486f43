"""The /embed benchmark, in one command: `python -m bench.embed`.

1. builds an albert-base-v2-shaped sentence-transformers checkpoint (random weights, real shapes, the same
   30,000-piece vocabulary as bench.run): AlbertModel + Pooling("mean") + Normalize, cached in bench/.cache;
2. measures the float32 matmul roofline of this machine;
3. starts the baseline (FastAPI around `SentenceTransformer.encode`, one request at a time, see
   bench/embed_baseline.py), drives /embed with closed-loop load at concurrency 1 and 16 (inputs of 6-40
   words), and stops it;
4. does the same with albert-serve serving only that checkpoint;
5. prints requests/s, p50 and p99 latency, useful FLOP/s (a full forward pass of every real token: mean
   pooling reads them all) against the roofline, and the targets at c=16: >= 2x the baseline's requests/s
   and <= half its p99. Results are also written as JSON to bench/results/embed-<timestamp>.json.
6. the sparse line (bench/embed_sparse.py; `--no-sparse` skips it): SPLADE texts/s of albert-serve's
   /embed_sparse against sentence-transformers' SparseEncoder.encode on the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from model.config import PRESETS
from service.settings import ENDPOINTS, model_env_var

from . import checkpoint, texts
from .embed_sparse import sparse_line
from .run import CACHE, ROOT, Flops, Server, _cpu_name, drive, matmul_roofline, serve_env, token_counts

BASELINE_PORT, OURS_PORT = 8721, 8722


def build_checkpoint(root: Path, name: str = "embed", **shape) -> Path:
    """The sentence-transformers directory (built once; reused when present): albert-base-v2's shape, or that
    shape with `shape`'s config values instead."""
    directory = root / name
    if (directory / "modules.json").is_file():
        return directory
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        checkpoint.build_tokenizer(tokenizer_dir)
    backbone = root / f"{name}-backbone"
    values = dict(
        PRESETS["albert-base-v2"], vocab_size=checkpoint.VOCAB_SIZE, architectures=["AlbertModel"], **shape
    )
    torch.manual_seed(0)
    transformers.AlbertModel(transformers.AlbertConfig(**values)).eval().save_pretrained(
        str(backbone), safe_serialization=True
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (backbone / name).write_bytes((tokenizer_dir / name).read_bytes())
    transformer = Transformer(str(backbone))
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(directory))
    return directory


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per load point")
    parser.add_argument("--serve-args", default="", help="extra albert-serve flags, e.g. '--max-wait-ms 5'")
    parser.add_argument(
        "--no-sparse", action="store_true", help="skip the SPLADE line (bench/embed_sparse.py)"
    )
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    load_before = uptime()
    print(f"uptime before: {load_before}", flush=True)

    print("building the albert-base-shaped sentence-transformers checkpoint (bench/.cache) ...", flush=True)
    directory = build_checkpoint(CACHE / "models")
    config = json.loads((directory / "config.json").read_text())
    flops = Flops(config)
    print(f"{directory}: {flops.per_token / 1e6:.1f} MFLOP per token", flush=True)
    bodies = texts.requests("classify", 256, seed=1)  # {"inputs": "<6-40 words>"}, TEI's body as it is
    tokens = token_counts(directory, "embed", bodies)

    print("measuring the matmul roofline ...", flush=True)
    roofline = matmul_roofline()
    roof = roofline["roofline_flops"]
    print(
        f"roofline {roof / 1e9:.0f} GFLOP/s (float32 matmul, best of {list(roofline['by_shape'])})",
        flush=True,
    )

    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results, startup = {}, {}
    baseline = Server(
        "baseline",
        [sys.executable, "-m", "bench.embed_baseline"],
        {"BASELINE_MODEL": str(directory), "BASELINE_PORT": str(BASELINE_PORT), "HF_HUB_OFFLINE": "1"},
        BASELINE_PORT,
        logs / "embed-baseline.log",
    )
    try:
        startup["baseline"] = baseline.wait_ready()
        print(f"baseline ready in {startup['baseline']:.0f}s", flush=True)
        results["baseline"] = drive(baseline, "embed", bodies, tokens, concurrencies, args.duration)
    finally:
        baseline.stop()

    for variable in [model_env_var(e) for e in ENDPOINTS] + ["ALBERT_MODELS_FILE"]:
        os.environ.pop(variable, None)  # unset: only the embed model serves
    ours = Server(
        "albert-serve",
        [sys.executable, "-m", "service", *args.serve_args.split()],
        serve_env(OURS_PORT, ALBERT_MODELS=f"embed={directory}"),
        OURS_PORT,
        logs / "embed-albert-serve.log",
    )
    try:
        startup["albert-serve"] = ours.wait_ready()
        print(f"albert-serve ready in {startup['albert-serve']:.0f}s (cache: {CACHE / 'jax'})", flush=True)
        results["albert-serve"] = drive(ours, "embed", bodies, tokens, concurrencies, args.duration)
    finally:
        ours.stop()

    rows = []
    print("\n| concurrency | server | req/s | p50 ms | p99 ms | useful GFLOP/s | % roofline | all 200 |")
    print("|---|---|---|---|---|---|---|---|")
    for c in concurrencies:
        for server in ("baseline", "albert-serve"):
            r = results[server][c]
            useful = flops.needed("embed", r.tokens, r.completed) / r.seconds
            row = dict(
                concurrency=c,
                server=server,
                rps=r.requests_per_s,
                p50_ms=r.percentile(50) * 1000,
                p99_ms=r.percentile(99) * 1000,
                useful_gflops=useful / 1e9,
                roofline_pct=100 * useful / roof,
                all_ok=r.all_ok,
                statuses=r.statuses,
                tokens_per_request=r.tokens / max(1, r.completed),
            )
            rows.append(row)
            print(
                f"| {c} | {server} | {row['rps']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['useful_gflops']:.0f} | {row['roofline_pct']:.0f}% | {r.all_ok} |"
            )

    targets = {}
    if 16 in concurrencies:
        o16, b16 = results["albert-serve"][16], results["baseline"][16]
        rps_ratio = o16.requests_per_s / b16.requests_per_s
        p99_ratio = o16.percentile(99) / b16.percentile(99)
        targets["embed c=16 >= 2x baseline req/s"] = (rps_ratio, rps_ratio >= 2)
        targets["embed c=16 p99 <= baseline p99 / 2"] = (p99_ratio, p99_ratio <= 0.5)
    all_ok = all(row["all_ok"] for row in rows)
    targets["every response 200"] = (float(all_ok), all_ok)
    print("\n| target | measured | met |\n|---|---|---|")
    for name, (value, met) in targets.items():
        print(f"| {name} | {value:.2f} | {'yes' if met else 'NO'} |")

    sparse = None if args.no_sparse else sparse_line(args.duration, args.serve_args)

    load_after = uptime()
    print(
        f"\nroofline {roof / 1e9:.0f} GFLOP/s; {flops.per_token / 1e6:.1f} MFLOP per token; machine "
        f"{_cpu_name()}, {os.cpu_count()} CPUs; albert-serve start-up {startup['albert-serve']:.0f}s\n"
        f"uptime before: {load_before}\nuptime after:  {load_after}"
    )
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_name()},
        "uptime": {"before": load_before, "after": load_after},
        "checkpoint": str(directory),
        "duration_s": args.duration,
        "flops_per_token": flops.per_token,
        "roofline": roofline,
        "startup_s": startup,
        "rows": rows,
        "targets": {k: {"value": v, "met": m} for k, (v, m) in targets.items()},
        "targets_met": all(m for _, m in targets.values()),
        "sparse_texts_per_s": sparse,
    }
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    path = out / time.strftime("embed-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"results written to {path}")
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
