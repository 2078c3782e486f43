"""Isolation: under concurrent mixed load, every response equals what the same request gets alone.

Concurrent requests share forward passes (their sequences are packed into the same rows of a bucket, each
attending only within itself), and batches take other shapes than a request alone would. None of that may
change an answer beyond float noise: labels, tokens, spans and offsets must be equal, scores within 1e-5.
Bad requests mixed into the load keep failing the same way and disturb no one.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

SCORE_TOLERANCE = 1e-5
_VOCABULARY = (
    "the engineer Anna travelled from Rome to Paris and met George at the Berlin museum in 1901 while "
    "Maria Müller taught physics at the university of Zürich near the river François visited Tokyo"
)
WORDS = _VOCABULARY.split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _requests() -> list[tuple[str, dict]]:
    """A mixed load: all four endpoints, short to truncated lengths, lists, windows and every parameter kind."""
    rng = random.Random(7)
    requests: list[tuple[str, dict]] = []
    for n in [1, 3, 8, 20, 45, 90, 200]:  # 200 words is past the model's 160 tokens: truncated
        requests += [
            ("/classify", {"inputs": _text(rng, n)}),
            (
                "/ner",
                {
                    "inputs": _text(rng, n),
                    "parameters": {"aggregation_strategy": rng.choice(["simple", "first", "average", "max"])},
                },
            ),
            ("/fill-mask", {"inputs": "[MASK] " + _text(rng, n)}),
            ("/qa", {"inputs": {"question": _text(rng, 4), "context": _text(rng, n + 2)}}),
        ]
    requests += [
        ("/classify", {"inputs": {"text": _text(rng, 12), "text_pair": _text(rng, 30)}}),
        ("/classify", {"inputs": [_text(rng, k) for k in (2, 40, 7, 120)], "parameters": {"top_k": 2}}),
        ("/classify", {"inputs": _text(rng, 15), "parameters": {"function_to_apply": "sigmoid"}}),
        ("/classify", {"inputs": _text(rng, 15), "parameters": {"function_to_apply": "none", "top_k": 1}}),
        (
            "/fill-mask",
            {"inputs": f"{_text(rng, 5)} [MASK] {_text(rng, 9)} [MASK] .", "parameters": {"top_k": 3}},
        ),
        ("/fill-mask", {"inputs": [f"[MASK] {_text(rng, k)}" for k in (4, 60, 11)]}),
        (
            "/fill-mask",
            {"inputs": f"{_text(rng, 6)} [MASK]", "parameters": {"targets": ["paris", "rome", "tokyo"]}},
        ),
        ("/ner", {"inputs": _text(rng, 300), "parameters": {"stride": 16}}),  # windows over a long text
        ("/ner", {"inputs": _text(rng, 40), "parameters": {"aggregation_strategy": "none"}}),
        ("/ner", {"inputs": [_text(rng, k) for k in (3, 30, 150)], "parameters": {"ignore_labels": []}}),
        (
            "/qa",
            {
                "inputs": {"question": _text(rng, 5), "context": _text(rng, 400)},
                "parameters": {"max_seq_len": 48, "doc_stride": 16, "top_k": 3},
            },
        ),
        (
            "/qa",
            {
                "inputs": {"question": _text(rng, 3), "context": _text(rng, 250)},
                "parameters": {"handle_impossible_answer": True},
            },
        ),
        (
            "/qa",
            {
                "inputs": [{"question": _text(rng, 3), "context": _text(rng, k)} for k in (5, 80, 300)],
                "parameters": {"top_k": 2},
            },
        ),
    ]
    # Bad requests, answered with errors whatever else is running.
    requests += [
        ("/fill-mask", {"inputs": "no mask at all"}),
        ("/ner", {"inputs": "   "}),
        ("/classify", {"inputs": ["a"] * 65}),
        ("/qa", {"inputs": {"question": "why?", "context": "because"}, "parameters": {"top_k": 0}}),
    ]
    return requests


def assert_same(concurrent, alone, path: str = "answer") -> None:
    if isinstance(alone, dict):
        assert isinstance(concurrent, dict) and set(concurrent) == set(alone), (
            f"{path}: {concurrent} != {alone}"
        )
        for key in alone:
            assert_same(concurrent[key], alone[key], f"{path}.{key}")
    elif isinstance(alone, list):
        assert isinstance(concurrent, list) and len(concurrent) == len(alone), (
            f"{path}: {concurrent} != {alone}"
        )
        for i, (a, b) in enumerate(zip(concurrent, alone, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(alone, float):
        assert math.isclose(concurrent, alone, abs_tol=SCORE_TOLERANCE), f"{path}: {concurrent} != {alone}"
    else:
        assert concurrent == alone, f"{path}: {concurrent!r} != {alone!r}"


@pytest.fixture
def forward_passes(runtime, monkeypatch):
    """Counts the forward passes the session runtime runs (through its batch-statistics hook)."""
    passes = []
    original = runtime.batcher.on_batch

    def counting(stats):
        passes.append(stats.sequences)
        if original is not None:
            original(stats)

    monkeypatch.setattr(runtime.batcher, "on_batch", counting)
    return passes


def test_concurrent_mixed_load_gets_the_answers_each_request_gets_alone(client, forward_passes):
    requests = _requests()

    def send(request):
        path, body = request
        response = client.post(path, json=body)
        return response.status_code, response.json()

    alone = [send(r) for r in requests]
    passes_alone = len(forward_passes)
    assert sum(status == 200 for status, _ in alone) == len(requests) - 4, [a for a in alone if a[0] != 200]

    # Twice over, shuffled, 16 at a time: each request meets different neighbours in its batches.
    order = list(range(len(requests))) * 2
    random.Random(11).shuffle(order)
    del forward_passes[:]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: (i, send(requests[i])), order))
    passes_concurrent = len(forward_passes)

    for i, (status, answer) in results:
        expected_status, expected = alone[i]
        assert status == expected_status, (requests[i], answer)
        if status == 200:
            assert_same(answer, expected, f"{requests[i][0]} #{i}")
        else:
            assert answer == expected  # the same error, word for word
    # The load really was packed across requests: each request twice, in fewer passes than twice alone.
    assert passes_concurrent < 2 * passes_alone, (passes_concurrent, passes_alone)
