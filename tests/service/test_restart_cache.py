"""A restart reuses what the first start made: JAX's persistent compilation cache and the bucket-cost file.

Each start is a process of its own (the compilation cache is process-wide configuration), started twice
with the same cache directory. Each reports JAX's own monitoring events and how many buckets it timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.service.support import REPO_ROOT, child_env

SCRIPT = textwrap.dedent(
    """
    import json, os
    import jax
    from service import engine
    from service.runtime import Runtime
    from service.settings import Settings

    counts = {"cache_hits": 0, "cache_misses": 0, "backend_compiles": 0, "timed_runs": 0}

    def on_event(event, **kwargs):
        for name in ("cache_hits", "cache_misses"):
            if event == "/jax/compilation_cache/" + name:
                counts[name] += 1

    def on_duration(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["backend_compiles"] += 1

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    timed_run = engine.ProgramSet.time_run

    def counting(self, *args, **kwargs):
        counts["timed_runs"] += 1
        return timed_run(self, *args, **kwargs)

    engine.ProgramSet.time_run = counting

    runtime = Runtime(Settings(**json.loads(os.environ["SETTINGS"])))
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    runner = runtime.runners["ner"]
    costs = {str(b): runner.packer.cost(b) for b in runner.buckets}
    runtime.stop()
    print(json.dumps({**counts, "programs": runner.program_count(), "costs": costs}))
    """
)


def _start(settings: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=child_env({"SETTINGS": json.dumps(settings)}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_restart_hits_the_compilation_cache_and_reads_the_bucket_costs(service_repos, tmp_path):
    cache = tmp_path / "jax-cache"
    settings = {
        "classify_model": "",
        "fill_mask_model": "",
        "qa_model": "",
        "ner_model": str(service_repos["ner"][0]),
        "seq_buckets": [32],
        "batch_seq_buckets": [64],
        "batch_buckets": [1, 2],
        "max_batch_tokens": 128,
        "compilation_cache_dir": str(cache),
    }
    costs_file = cache / "albert-serve-bucket-costs.json"

    first = _start(settings)
    programs = first["programs"]
    assert programs >= 3
    # A cold start compiles every program and times every bucket, and keeps both.
    assert first["cache_hits"] == 0 and first["cache_misses"] >= programs, first
    assert first["backend_compiles"] >= programs, first
    assert first["timed_runs"] >= len(first["costs"]), first  # every bucket timed (covering ones once more)
    assert any(cache.iterdir())
    table = json.loads(costs_file.read_text())
    assert len(table) == 1 and set(next(iter(table.values()))) == set(first["costs"]), table
    written = costs_file.read_text()

    second = _start(settings)
    # The restart: every program from the cache (JAX's backend-compile event, which the service's compile
    # counter follows, also fires for a cache hit, so it is no measure here), no bucket timed again, the
    # same costs.
    assert second["cache_hits"] >= programs, second
    assert second["cache_misses"] == 0, second
    assert second["timed_runs"] == 0, second
    assert second["costs"] == first["costs"]
    assert costs_file.read_text() == written

    # The control: a cost file that does not match this program (its key) is ignored, and measured afresh.
    costs_file.write_text(json.dumps({"someone-else": next(iter(table.values()))}))
    third = _start(settings)
    assert third["timed_runs"] >= len(third["costs"]), third
    assert len(json.loads(costs_file.read_text())) == 2
