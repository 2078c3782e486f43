"""`albert-serve compile` fills the compilation cache and the bucket costs: a server started afterwards on the same
cache compiles nothing and times nothing. Each step is a real process (the cache is process-wide configuration)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.service.support import REPO_ROOT, child_env, settings_env
from tests.service.test_restart_cache import _start

GRID = {
    "seq_buckets": [32],
    "batch_seq_buckets": [64],
    "batch_buckets": [1, 2],
    "max_batch_tokens": 128,
}


def _compile(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "compile", *args],
        env=child_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_compile_then_a_start_finds_every_program_in_the_cache(service_repos, tmp_path):
    cache = tmp_path / "jax-cache"
    settings = {
        "classify_model": "",
        "qa_model": "",
        "fill_mask_model": str(service_repos["fill-mask"][0]),
        **GRID,
        "compilation_cache_dir": str(cache),
    }
    # The ner model comes from a flag, the rest from ALBERT_* variables, as the server reads them.
    done = _compile(settings_env(settings), "--ner-model", str(service_repos["ner"][0]))
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((cache / "albert-serve-bucket-costs.json").read_text())
    # One program set (ner and fill-mask share the tokens program), every bucket of the grid timed.
    assert len(table) == 1 and len(next(iter(table.values()))) == 3, table

    started = _start({**settings, "ner_model": str(service_repos["ner"][0])})
    assert started["programs"] >= 3
    assert started["cache_misses"] == 0, started  # nothing compiled: every program from the cache
    assert started["cache_hits"] >= started["programs"], started
    assert started["timed_runs"] == 0, started  # and every bucket's cost from the file


def test_compile_refuses_a_configuration_in_one_line(service_repos, tmp_path):
    no_cache = _compile(
        {"ALBERT_NER_MODEL": str(service_repos["ner"][0]), "ALBERT_COMPILATION_CACHE_DIR": ""}
    )
    assert no_cache.returncode == 2
    assert no_cache.stderr.strip().splitlines() == [
        "albert-serve compile: configuration error: no compilation cache directory to fill "
        "(set ALBERT_COMPILATION_CACHE_DIR or --compilation-cache-dir)"
    ]
    models_file = tmp_path / "models.toml"
    models_file.write_text("[models.a]\nsource = 3\n")
    bad = _compile(
        {"ALBERT_MODELS_FILE": str(models_file), "ALBERT_COMPILATION_CACHE_DIR": str(tmp_path / "c")}
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "configuration error" in lines[0] and "source" in lines[0], lines
    assert not (tmp_path / "c").exists()  # nothing compiled
