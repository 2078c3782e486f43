"""The sparse line of `python -m bench.embed` (also alone: `python -m bench.embed_sparse`): SPLADE texts/s.

1. builds an albert-base-shaped SPLADE checkpoint in sentence-transformers 5's SparseEncoder layout
   (AlbertForMaskedLM with random weights and the benchmarks' 30,000-piece vocabulary, then SpladePooling
   max/relu), cached in bench/.cache;
2. times `SparseEncoder.encode(texts, batch_size=32)` in process, after a warm-up;
3. starts albert-serve serving only that checkpoint (task sparse-embed from modules.json) and drives
   `/embed_sparse` with 32 texts a request at concurrency 4;
4. prints texts/s of both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from model.config import PRESETS
from service.settings import ENDPOINTS, model_env_var

from . import checkpoint, texts
from .run import CACHE, Server, drive, serve_env

PORT = 8723
PER_REQUEST = 32


def build_checkpoint(root: Path) -> Path:
    directory = root / "splade"
    if (directory / "modules.json").is_file():
        return directory
    import torch
    import transformers
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        checkpoint.build_tokenizer(tokenizer_dir)
    backbone = root / "splade-mlm"
    values = dict(
        PRESETS["albert-base-v2"], vocab_size=checkpoint.VOCAB_SIZE, architectures=["AlbertForMaskedLM"]
    )
    torch.manual_seed(0)
    transformers.AlbertForMaskedLM(transformers.AlbertConfig(**values)).eval().save_pretrained(
        str(backbone), safe_serialization=True
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (backbone / name).write_bytes((tokenizer_dir / name).read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modules = [MLMTransformer(str(backbone)), SpladePooling(pooling_strategy="max")]
        SparseEncoder(modules=modules, device="cpu").save(str(directory))
    return directory


def baseline_texts_per_s(directory: Path, batch: list[str], seconds: float) -> float:
    from sentence_transformers import SparseEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SparseEncoder(str(directory), device="cpu")
        model.encode(batch[:PER_REQUEST], batch_size=PER_REQUEST)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.encode(batch, batch_size=PER_REQUEST)
            done += len(batch)
    return done / (time.perf_counter() - start)


def sparse_line(duration: float, serve_args: str = "") -> dict:
    """Both figures, printed and returned: {"sentence-transformers": texts/s, "albert-serve": texts/s}."""
    directory = build_checkpoint(CACHE / "models")
    bodies = [
        {"inputs": [b["inputs"] for b in texts.requests("classify", PER_REQUEST, seed=100 + i)]}
        for i in range(16)
    ]
    corpus = [text for body in bodies for text in body["inputs"]]
    from model import load_tokenizer

    tokenizer = load_tokenizer(directory)
    tokens = [sum(len(tokenizer.encode(t)[0].ids) for t in body["inputs"]) for body in bodies]

    print("sparse: SparseEncoder.encode (batch_size 32) ...", flush=True)
    baseline = baseline_texts_per_s(directory, corpus[: 4 * PER_REQUEST], duration)
    print(f"  sentence-transformers {baseline:.1f} texts/s", flush=True)

    for variable in [model_env_var(e) for e in ENDPOINTS] + ["ALBERT_MODELS_FILE"]:
        os.environ.pop(variable, None)
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ours = Server(
        "albert-serve",
        [sys.executable, "-m", "service", *serve_args.split()],
        serve_env(PORT, ALBERT_MODELS=f"splade={directory}"),
        PORT,
        logs / "embed-sparse-albert-serve.log",
    )
    try:
        ready = ours.wait_ready()
        print(f"  albert-serve ready in {ready:.0f}s", flush=True)
        result = drive(ours, "embed_sparse", bodies, tokens, [4], duration)[4]
    finally:
        ours.stop()
    served = result.requests_per_s * PER_REQUEST
    figures = {"sentence-transformers": baseline, "albert-serve": served, "all_ok": result.all_ok}
    print(
        f"\n| sparse (SPLADE, albert-base shape) | SparseEncoder.encode texts/s | albert-serve /embed_sparse "
        f"texts/s (c=4, {PER_REQUEST}/request) | ratio | all 200 |\n|---|---|---|---|---|\n"
        f"| {directory.name} | {baseline:.1f} | {served:.1f} | {served / baseline:.2f} | {result.all_ok} |"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per side")
    parser.add_argument("--serve-args", default="")
    args = parser.parse_args(argv)
    figures = sparse_line(args.duration, args.serve_args)
    print(json.dumps(figures))
    return 0 if figures["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
