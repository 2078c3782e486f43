"""The service computes in bfloat16 and float16 when asked to, and its answers stay close to float32's.

Three things would each fail if `--dtype` were ignored (the service silently computing in float32):
- the arrays the runners serve (matmul weights) and the compiled programs are in the half dtype, read from
  the runners themselves, not from /info (which echoes the settings);
- the answers differ from the float32 service's by more than float32 could (the same float32 program gives
  bit-identical answers), yet by less than the stated tolerance;
- labels, tokens and spans are the float32 service's.
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from compare import assert_matches_pipeline
from fastapi.testclient import TestClient
from flax.traverse_util import flatten_dict

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.ner import NERParams

# Unit roundoff u = 2^-p of each dtype's significand: bfloat16 p = 8, float16 p = 11.
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
HLO_TYPE = {"bfloat16": r"\bbf16\[", "float16": r"(?<![b\w])f16\[", "float32": r"(?<![b\w])f16\[|\bbf16\["}
# Scores are probabilities, so their scale is 1. tests/model/test_parity.py allows 32 roundings (u each) on
# the outputs of a 4-layer model; these 2-layer models, then a softmax that only shrinks differences, stay
# well inside that (measured: bfloat16 <= 1.5e-2, float16 <= 2.7e-3). Any real error (a lost mask, a wrong
# weight) moves scores by O(0.1) even in float32.
SCORE_TOLERANCE = {name: 32 * u for name, u in UNIT_ROUNDOFF.items()}  # 0.125, 0.0156
# A float32 service run again answers bit for bit the same; half precision cannot get closer than this.
MORE_THAN_ROUNDING = 1e-5

TEXTS = [
    "John Smith works for Microsoft in Paris.",
    "Maria Müller met George at the Berlin museum, near the river.",
    "Anna lives in Rome and teaches at the university of Madrid.",
]
REQUESTS = {
    "classify": ("/classify", {"inputs": TEXTS}),
    "fill-mask": (
        "/fill-mask",
        {
            "inputs": [t.replace("works", "[MASK]") for t in TEXTS[:1]]
            + [
                "The capital of France is [MASK].",
                "Anna lives in [MASK] and teaches at the [MASK] of Madrid.",
            ]
        },
    ),
    "qa": (
        "/qa",
        {
            "inputs": [
                {"question": "Where does John work?", "context": TEXTS[0]},
                {"question": "Who met George?", "context": " ".join(TEXTS)},
            ],
            "parameters": {"top_k": 3},
        },
    ),
    "ner": ("/ner", {"inputs": TEXTS, "parameters": {"aggregation_strategy": "none"}}),
}


# Fewer shapes than the float32 session service, to start quickly: rows of 64 and of the maximum (160).
HALF_GRID = dict(
    seq_buckets=[64],
    batch_seq_buckets=[160],
    batch_buckets=[1],
    max_batch_tokens=160,
    compilation_cache_dir="",
)


@pytest.fixture(scope="module", params=list(UNIT_ROUNDOFF))
def half(request, service_settings):
    settings = Settings(**{**service_settings.model_dump(), **HALF_GRID, "dtype": request.param})
    runtime = Runtime(settings)
    runtime.start(background=False)
    assert not runtime.failed, runtime.failed
    with TestClient(create_app(settings, runtime=runtime, start_runtime=False)) as client:
        yield request.param, runtime, client
    runtime.stop()


def _scores(answer) -> list[float]:
    if isinstance(answer, dict):
        return [answer["score"]] if "score" in answer else [s for v in answer.values() for s in _scores(v)]
    if isinstance(answer, list):
        return [s for item in answer for s in _scores(item)]
    return []


def _admit_boundary_ties(ours, full, wide, tie: float):
    """`full` with each top-k candidate list replaced by the candidates `ours` chose, read from `wide` (the
    float32 answer with a larger top_k), where the two lists differ only by candidates tied within `tie`
    with float32's k-th score: at a tie on the boundary either candidate is a correct k-th answer."""
    if isinstance(full, list) and full and all(isinstance(c, dict) and "token" in c for c in full):
        kth = full[-1]["score"]
        chosen = {c["token"] for c in ours}
        by_token = {c["token"]: c for c in wide}
        swapped = chosen ^ {c["token"] for c in full}
        if swapped and all(t in by_token and abs(by_token[t]["score"] - kth) <= tie for t in swapped):
            return [c for c in wide if c["token"] in chosen]
        return full
    if isinstance(full, list):
        return [_admit_boundary_ties(a, b, c, tie) for a, b, c in zip(ours, full, wide, strict=True)]
    return full


def _kernels(params) -> dict:
    return {p: v for p, v in flatten_dict(params).items() if p[-1] in ("kernel", "embedding")}


def test_the_runners_serve_half_precision_weights_and_programs(half, runtime):
    dtype_name, half_runtime, client = half
    dtype = jnp.dtype(dtype_name)
    for name, runner in half_runtime.runners.items():
        kernels = _kernels(runner.params)
        assert kernels, name
        wrong = {"/".join(p): v.dtype.name for p, v in kernels.items() if v.dtype != dtype}
        assert not wrong, f"{name}: weights not in {dtype_name}: {wrong}"
        layer_norms = [v for p, v in flatten_dict(runner.params).items() if "LayerNorm" in p[-2]]
        assert layer_norms and all(v.dtype == jnp.float32 for v in layer_norms), name
        # The compiled program of every bucket computes in the half dtype.
        for bucket in runner.buckets:
            text = runner._compiled[bucket].as_text()
            assert re.search(HLO_TYPE[dtype_name], text), f"{name} {bucket}: no {dtype_name} op compiled"
        # The control: the float32 service's weights and programs have no half-precision type at all.
        full = runtime.runners[name]
        assert all(v.dtype == jnp.float32 for v in _kernels(full.params).values()), name
        assert not re.search(HLO_TYPE["float32"], full._compiled[full.buckets[0]].as_text()), name
        # /info agrees with what is served.
        assert client.get("/info").json()["endpoints"][name]["dtype"] == dtype_name


@pytest.mark.parametrize("endpoint", list(REQUESTS))
def test_answers_differ_from_float32_within_tolerance_with_the_same_labels_and_spans(half, client, endpoint):
    dtype_name, _, half_client = half
    path, body = REQUESTS[endpoint]
    ours = half_client.post(path, json=body)
    full = client.post(path, json=body)
    again = client.post(path, json=body)
    assert ours.status_code == full.status_code == again.status_code == 200, ours.text
    half_scores, full_scores = _scores(ours.json()), _scores(full.json())
    assert len(half_scores) == len(full_scores) > 0
    assert all(math.isfinite(s) for s in half_scores)
    assert _scores(again.json()) == full_scores  # float32 answers repeat exactly
    diff = max(abs(a - b) for a, b in zip(half_scores, full_scores, strict=True))
    tolerance = SCORE_TOLERANCE[dtype_name]
    print(f"{dtype_name} {endpoint}: max |score diff| {diff:.3g} (tolerance {tolerance:.3g})")
    assert diff > MORE_THAN_ROUNDING, f"{dtype_name} answers equal float32's: half precision was not used"
    reference = full.json()
    if endpoint == "fill-mask":  # random tiny models: the 5th and 6th tokens may tie within the tolerance
        wide = client.post(path, json={**body, "parameters": {"top_k": 10}}).json()
        reference = _admit_boundary_ties(ours.json(), reference, wide, tolerance)
    # Everything else (labels, tokens, sequences, spans, offsets, entity words) equal; scores within the
    # tolerance; candidates whose float32 scores are tied within it may come in either order.
    assert_matches_pipeline(ours.json(), reference, atol=tolerance, tie=tolerance)


def test_served_outputs_are_half_precision_values(half, runtime):
    # The logits themselves, straight from the runner: half-precision rounding, not float32's.
    dtype_name, half_runtime, _ = half
    task = runtime.tasks["ner"]
    params = NERParams(aggregation_strategy="none", ignore_labels=("O",), stride=None)
    sequences = task.prepare(TEXTS, params).model_inputs
    ours, _ = half_runtime.runners["ner"].run(sequences)
    full, _ = runtime.runners["ner"].run(sequences)
    for a, b in zip(ours, full, strict=True):
        logits, reference = np.asarray(a["logits"], np.float32), np.asarray(b["logits"], np.float32)
        scale = max(1.0, float(np.sqrt(np.mean(reference**2))))
        diff = float(np.max(np.abs(logits - reference)))
        assert MORE_THAN_ROUNDING < diff <= SCORE_TOLERANCE[dtype_name] * scale, (dtype_name, diff)
