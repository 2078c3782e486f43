"""Start-up benchmark: `python -m bench.startup` (run it under `flock /tmp/albert-bench.lock`).

For each case, starts `python -m service` on albert-base-shaped random checkpoints with an empty compilation
cache, and measures the time to /ready, the time until every model's whole grid is compiled and timed (from
GET /models; a server without progressive readiness has its grid complete when it is ready) and resident
memory (VmRSS of the server and of its children: the background grid compiler) at both points; with
`--load` (the default), /classify at c=16 (requests/s, p99) and c=1 (p50, p99) in the first window after
ready (the grid still compiling) and again once the grid is complete. Then it starts again on the now warm
cache (`warm`), and on a fresh cache filled by `albert-serve compile` first (`compiled`, its time as
`compile_s`), and measures the same. Cases:

  endpoints   the four endpoint models (ALBERT_<TASK>_MODEL)
  sixteen     those four plus eight classifiers with 2 to 8 labels, two NER and two QA (ALBERT_MODELS_FILE)

`--tree DIR` runs another checkout's service (e.g. the commit before this work: `git worktree add /tmp/base
7be913d`); a tree whose service does not know ALBERT_MODELS_FILE runs the `endpoints` case only. Results
are printed and written as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from . import checkpoint, texts
from .load import run_load

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
ENDPOINT_VARS = {
    "classify": "ALBERT_CLASSIFY_MODEL",
    "fill-mask": "ALBERT_FILL_MASK_MODEL",
    "qa": "ALBERT_QA_MODEL",
    "ner": "ALBERT_NER_MODEL",
}


def build_models() -> dict[str, tuple[str, Path]]:
    """name -> (task, directory) for the sixteen models (the first four are the endpoint models)."""
    root = CACHE / "models"
    repos = checkpoint.build(root)
    models = {endpoint: (endpoint, repos[endpoint]) for endpoint in ENDPOINT_VARS}
    for i, labels in enumerate([2, 3, 4, 5, 6, 7, 8, 8]):  # eight classifiers, 2 to 8 labels
        name = f"classify-{i + 1}"
        models[name] = (
            "classify",
            checkpoint.build_extra(root, name, "classify", [f"L{k}" for k in range(labels)], i),
        )
    for i in (1, 2):
        models[f"ner-{i}"] = (
            "ner",
            checkpoint.build_extra(root, f"ner-{i}", "ner", checkpoint.LABELS["ner"], 10 + i),
        )
        models[f"qa-{i}"] = ("qa", checkpoint.build_extra(root, f"qa-{i}", "qa", None, 20 + i))
    return models


def tree_rss_mb(pid: int) -> float:
    """VmRSS of `pid` and of its children (the background grid compiler), in MB."""
    total = rss_mb(pid)[0]
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss / 2**20
    return total


WINDOW_S = 10.0  # each load's measured seconds (after 1 s of warm-up)


def measure_load(url: str, prefix: str) -> dict:
    """/classify at c=16 and c=1, WINDOW_S each."""
    bodies = texts.requests("classify", 512, seed=7)
    tokens = [0] * len(bodies)
    out = {}
    for concurrency in (16, 1):
        r = run_load(url, "classify", bodies, tokens, concurrency, duration=WINDOW_S, warmup=1.0)
        tag = f"{prefix}_c{concurrency}"
        out[f"{tag}_rps"] = r.requests_per_s
        out[f"{tag}_p50_ms"] = r.percentile(50) * 1000
        out[f"{tag}_p99_ms"] = r.percentile(99) * 1000
        out[f"{tag}_errors"] = {k: v for k, v in r.statuses.items() if k != 200}
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, amount, _ = line.split()
            values[key] = int(amount) / 1024
    return values.get("VmRSS:", 0.0), values.get("VmHWM:", 0.0)


def grid_state(url: str) -> tuple[bool, int, int]:
    """(every model's grid complete, programs compiled, programs in all)."""
    models = httpx.get(url + "/models", timeout=10).json()["models"]
    done, compiled, total = True, 0, 0
    for entry in models:
        grid = entry.get("grid")
        if grid is None:
            continue  # no progressive readiness: complete when ready
        done = done and grid["complete"]
        compiled += grid["compiled"]
        total += grid["programs"]
    return done, compiled, total


def one_start(
    tree: Path, env: dict[str, str], log: Path, port: int, timeout: float = 1800, load: bool = False
) -> dict:
    full = {
        **os.environ,
        **env,
        "PYTHONPATH": str(tree),
        "ALBERT_PORT": str(port),
        "ALBERT_HOST": "127.0.0.1",
    }
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=tree, env=full, stdout=out, stderr=out
        )
        result: dict = {}
        try:
            while "ready_s" not in result:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
                if time.monotonic() - start > timeout:
                    raise TimeoutError("not ready")
                try:
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        result["ready_s"] = time.monotonic() - start
                        result["rss_ready_mb"] = rss_mb(process.pid)[0]
                        result["rss_ready_with_child_mb"] = tree_rss_mb(process.pid)
                        done, compiled, total = grid_state(url)
                        result["programs_at_ready"] = f"{compiled}/{total}"
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            if load:
                result.update(measure_load(url, "window"))
                result["programs_after_window"] = "{1}/{2}".format(*grid_state(url))
            while True:
                done, compiled, total = grid_state(url)
                if done:
                    result["grid_s"] = time.monotonic() - start
                    break
                if time.monotonic() - start > timeout:
                    raise TimeoutError("grid not complete")
                time.sleep(0.5)
            time.sleep(2.0)  # let allocations settle
            result["rss_grid_mb"], result["peak_rss_mb"] = rss_mb(process.pid)
            result["rss_grid_with_child_mb"] = tree_rss_mb(process.pid)
            result["programs"] = total
            if load:
                result.update(measure_load(url, "steady"))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
    return result


def precompile(tree: Path, env: dict[str, str], log: Path) -> float:
    """`albert-serve compile` with these settings; its seconds."""
    full = {**os.environ, **env, "PYTHONPATH": str(tree)}
    start = time.monotonic()
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "service", "compile"], cwd=tree, env=full, stdout=out, stderr=out
        )
    if done.returncode != 0:
        raise RuntimeError(f"albert-serve compile exited {done.returncode}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - start


def run_case(
    tree: Path, case: str, models: dict, logs: Path, port: int, starts: list[str], load: bool
) -> dict:
    env = {"ALBERT_LOG_LEVEL": "info", "HF_HUB_OFFLINE": "1", "ALBERT_MODELS_FILE": "", "ALBERT_MODELS": ""}
    env.update(dict.fromkeys(ENDPOINT_VARS.values(), ""))
    if case == "endpoints":
        for endpoint, variable in ENDPOINT_VARS.items():
            env[variable] = str(models[endpoint][1])
    else:
        lines = []
        for name, (task, directory) in models.items():
            lines += [f'[models."{name}"]', f'source = "{directory}"', f'task = "{task}"']
            if name in ENDPOINT_VARS:
                lines.append("default = true")
            lines.append("")
        models_file = logs / "models.toml"
        models_file.write_text("\n".join(lines))
        env["ALBERT_MODELS_FILE"] = str(models_file)
    jax_cache = Path(tempfile.mkdtemp(prefix="albert-startup-jax-"))
    env["ALBERT_COMPILATION_CACHE_DIR"] = str(jax_cache)
    results = {}
    tag = f"{tree.name}-{case}"
    try:
        for kind in starts:
            if kind == "compiled":  # a fresh cache, filled by `albert-serve compile` first
                shutil.rmtree(jax_cache, ignore_errors=True)
                jax_cache.mkdir()
                compile_s = precompile(tree, env, logs / f"{tag}-compile.log")
            elif kind == "cold":
                shutil.rmtree(jax_cache, ignore_errors=True)
                jax_cache.mkdir()
            result = one_start(tree, env, logs / f"{tag}-{kind}.log", port, load=load)
            if kind == "compiled":
                result["compile_s"] = compile_s
            results[kind] = result
            print(f"  {tree.name} {case} {kind}: {json.dumps(result)}", flush=True)
    finally:
        shutil.rmtree(jax_cache, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", default=[], help="checkouts to run (default: this one)")
    parser.add_argument("--cases", default="endpoints,sixteen")
    parser.add_argument("--port", type=int, default=8713)
    parser.add_argument("--starts", default="cold,warm,compiled", help="cold, warm (after cold), compiled")
    parser.add_argument("--no-load", dest="load", action="store_false", help="no /classify load windows")
    args = parser.parse_args(argv)
    starts = [s for s in args.starts.split(",") if s]
    trees = [Path(t).resolve() for t in args.tree] or [ROOT.parent]
    cases = [c for c in args.cases.split(",") if c]
    print("building the albert-base-shaped checkpoints (cached in bench/.cache) ...", flush=True)
    models = build_models()
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": os.getloadavg(),
        }
    }
    for tree in trees:
        knows_files = (
            "ALBERT_MODELS_FILE" in (tree / "service" / "settings.py").read_text()
            or "models_file" in (tree / "service" / "settings.py").read_text()
        )
        for case in cases:
            if case != "endpoints" and not knows_files:
                continue
            results.setdefault(str(tree), {})[case] = run_case(
                tree, case, models, logs, args.port, starts, args.load and case == "endpoints"
            )
    results["machine"]["load_after"] = os.getloadavg()
    print()
    print(
        "| tree | case | start | ready s | full grid s | RSS at ready MB (+child) | RSS full grid MB (+child) "
        "| peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tree, by_case in results.items():
        if tree == "machine":
            continue
        for case, starts in by_case.items():
            for kind, r in starts.items():
                print(
                    f"| {Path(tree).name} | {case} | {kind} | {r['ready_s']:.1f} | {r['grid_s']:.1f} | "
                    f"{r['rss_ready_mb']:.0f} ({r.get('rss_ready_with_child_mb', 0):.0f}) | "
                    f"{r['rss_grid_mb']:.0f} ({r.get('rss_grid_with_child_mb', 0):.0f}) | {r['peak_rss_mb']:.0f} |"
                )
    print()
    print("| case | start | phase | c=16 req/s | c=16 p99 ms | c=1 p50 ms | c=1 p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for tree, by_case in results.items():
        if tree == "machine":
            continue
        for case, starts_ in by_case.items():
            for kind, r in starts_.items():
                for phase in ("window", "steady"):
                    if f"{phase}_c16_rps" in r:
                        print(
                            f"| {case} | {kind} | {phase} | {r[f'{phase}_c16_rps']:.2f} | "
                            f"{r[f'{phase}_c16_p99_ms']:.0f} | {r[f'{phase}_c1_p50_ms']:.0f} | "
                            f"{r[f'{phase}_c1_p99_ms']:.0f} |"
                        )
    out = ROOT / "results" / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
