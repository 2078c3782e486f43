"""Batches split across several devices (data parallel, parameters replicated) give the same answers.

JAX fixes its device count when it starts, so the service runs in a subprocess with 4 forced CPU devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

from compare import assert_matches_pipeline

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
    requests = json.loads(os.environ["REQUESTS"])
    with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
        answers = [client.post(path, json=body).json() for path, body in requests]
        info = client.get("/info").json()
    runtime.stop()
    print(json.dumps({"devices": len(jax.devices()), "answers": answers, "info": info}))
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
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    for entry in result["info"]["endpoints"].values():
        assert len(entry["devices"]) == 4
        assert all(int(b.split("x")[0]) % 4 == 0 for b in entry["buckets"])  # rows split evenly

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
