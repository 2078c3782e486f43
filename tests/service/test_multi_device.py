"""Batches split across several devices (data parallel, parameters replicated) give the same answers.

JAX fixes its device count when it starts, so the service runs in a subprocess with 4 forced CPU devices.
Equal answers alone would not show the split (every row run on one device answers the same), so the
subprocess also records, for every forward pass its requests make, how the outputs are laid out: each
device holds its own quarter of the rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

from compare import assert_matches_pipeline

from tests.service.support import REPO_ROOT, child_env

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax
    from fastapi.testclient import TestClient
    from service.app import create_app
    from service.runtime import Runtime
    from service.settings import Settings

    settings = Settings(**json.loads(os.environ["SETTINGS"]))
    runtime = Runtime(settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed

    # Record where the outputs of every forward pass the requests below make actually live.
    calls = []

    def recording(name, key, executable):
        def call(*args):
            outputs = executable(*args)
            for leaf in jax.tree_util.tree_leaves(outputs):
                calls.append({
                    "runner": name,
                    "program": str(key),
                    "rows": leaf.shape[0],
                    "devices": sorted(str(d) for d in leaf.sharding.device_set),
                    "replicated": leaf.sharding.is_fully_replicated,
                    "shards": sorted((str(s.device), s.data.shape[0], s.index[0].start or 0)
                                     for s in leaf.addressable_shards),
                })
            return outputs
        return call

    # Programs are shared by backbone shape: wrap each program set once, named by its kind.
    program_sets = {id(ps): ps for runner in runtime.runners.values() for ps, _ in runner.programs()}
    for program_set in program_sets.values():
        for key, executable in list(program_set.compiled.items()):
            program_set.compiled[key] = recording(program_set.kind, (program_set.kind, key), executable)

    requests = json.loads(os.environ["REQUESTS"])
    with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
        answers = [client.post(path, json=body).json() for path, body in requests]
        info = client.get("/info").json()
    runtime.stop()
    print(json.dumps({"devices": len(jax.devices()), "answers": answers, "info": info, "calls": calls}))
    """
)

TEXTS = [
    "John Smith works for Microsoft in Paris.",
    "Maria Müller met George at the Berlin museum, near the river.",
    "A short one.",
    "François et José visitèrent Zürich et São Paulo en 1901 avec Anna.",
]


def test_four_devices_answer_like_the_pipelines(service_repos, pipelines):
    from tests.service.support import SMALL_GRID

    settings = {
        "classify_model": str(service_repos["classify"][0]),
        "fill_mask_model": str(service_repos["fill-mask"][0]),
        "qa_model": str(service_repos["qa"][0]),
        "ner_model": str(service_repos["ner"][0]),
        **SMALL_GRID,
    }
    requests = [
        ("/classify", {"inputs": TEXTS}),
        ("/fill-mask", {"inputs": [t + " [MASK]" for t in TEXTS]}),
        (
            "/qa",
            {
                "inputs": [{"question": "Who works in Paris?", "context": " ".join(TEXTS * 3)}],
                "parameters": {"max_seq_len": 48, "doc_stride": 16, "top_k": 2},
            },
        ),
        ("/ner", {"inputs": TEXTS}),
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "SETTINGS": json.dumps(settings),
        "REQUESTS": json.dumps(requests),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=child_env(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    for entry in result["info"]["endpoints"].values():
        assert len(entry["devices"]) == 4
        assert all(int(b.split("x")[0]) % 4 == 0 for b in entry["buckets"])  # rows split evenly

    # Every forward pass, of every endpoint (fill-mask's vocabulary projection included), ran sharded: its
    # outputs live on all 4 devices, each holding a different quarter of the rows.
    calls = result["calls"]
    kinds = {c["runner"] for c in calls}  # classify; tokens (qa, ner, fill-mask's features); vocab
    assert {"classify", "tokens", "vocab"} <= kinds, kinds
    for call in calls:
        assert len(call["devices"]) == 4 and not call["replicated"], call
        quarter = call["rows"] // 4
        assert [rows for _, rows, _ in call["shards"]] == [quarter] * 4, call
        assert sorted(start for *_, start in call["shards"]) == [0, quarter, 2 * quarter, 3 * quarter], call

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [
            [pipelines["classify"](t, top_k=None) for t in TEXTS],
            [pipelines["fill-mask"](t + " [MASK]") for t in TEXTS],
            [
                pipelines["qa"](
                    question="Who works in Paris?",
                    context=" ".join(TEXTS * 3),
                    max_seq_len=48,
                    doc_stride=16,
                    top_k=2,
                )
            ],
            [pipelines["ner"](t, aggregation_strategy="simple") for t in TEXTS],
        ]
    for ours, reference in zip(result["answers"], expected, strict=True):
        assert_matches_pipeline(ours, reference)
