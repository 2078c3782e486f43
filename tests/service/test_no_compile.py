"""Once ready, the service never compiles: every request runs through a bucket compiled at start-up."""

from __future__ import annotations

import gc
import random
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from service.engine import Bucket, Packer, bucket_grid
from service.metrics import COMPILES
from service.runtime import Runtime
from service.settings import Settings
from service.tasks.base import ModelInput

WORDS = [
    "the",
    "model",
    "city",
    "river",
    "paris",
    "london",
    "anna",
    "george",
    "works",
    "lives",
    "in",
    "for",
    "and",
    "of",
    "café",
    "zürich",
    "1879",
    "!",
]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def test_no_compilation_after_ready_whatever_the_lengths(client):
    rng = random.Random(0)
    before = COMPILES.compilations
    requests = []
    for words in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233]:  # from a few tokens to far past the maximum
        text = _text(rng, words)
        requests += [
            ("/classify", {"inputs": text}),
            ("/classify", {"inputs": {"text": text, "text_pair": _text(rng, words // 2 + 1)}}),
            ("/fill-mask", {"inputs": "[MASK] " + text}),  # at the start: a mask cut off is a 422
            ("/fill-mask", {"inputs": " ".join(["[MASK]"] * min(words, 100))}),
            ("/qa", {"inputs": {"question": _text(rng, 4), "context": text}}),
            (
                "/qa",
                {
                    "inputs": {"question": _text(rng, 3), "context": text},
                    "parameters": {"max_seq_len": 40, "doc_stride": 10},
                },
            ),
            ("/ner", {"inputs": text}),
            ("/ner", {"inputs": text, "parameters": {"stride": 12}}),
        ]
    requests.append(("/classify", {"inputs": [_text(rng, rng.randint(1, 60)) for _ in range(40)]}))

    def send(request):
        path, body = request
        return client.post(path, json=body).status_code

    with ThreadPoolExecutor(8) as pool:  # concurrent, so batches of many shapes form too
        statuses = list(pool.map(send, requests))
    failures = [(r, s) for r, s in zip(requests, statuses, strict=True) if s != 200]
    assert not failures, failures[:3]
    assert COMPILES.compilations == before, "the service compiled while serving"
    # The metric reports the same counter (that both move when something compiles is tested below).
    assert _metric_compilations(client) == COMPILES.compilations


def _metric_compilations(client) -> float:
    metrics = client.get("/metrics").text
    line = next(line for line in metrics.splitlines() if line.startswith("albert_compilations "))
    return float(line.split()[1])


def test_the_compile_counter_counts_start_up_compiles(service_repos):
    # The control for the test above: the counter it watches does move when something compiles. A start-up
    # compiles every program of its grid (no persistent cache here), and each one is counted.
    settings = Settings(
        classify_model="",
        fill_mask_model="",
        qa_model="",
        ner_model=str(service_repos["ner"][0]),
        seq_buckets=[32],
        batch_seq_buckets=[64],
        batch_buckets=[1, 2],
        max_batch_tokens=128,
        compilation_cache_dir="",
    )
    before = COMPILES.compilations
    runtime = Runtime(settings)
    runtime.start(background=False)
    try:
        assert not runtime.failed, runtime.failed
        programs = runtime.runners["ner"].program_count()
        assert programs >= 3  # 1x32, 1x160 and 2x64 at least
        assert COMPILES.compilations - before >= programs
    finally:
        runtime.stop()


def test_one_compile_after_ready_moves_the_counter_and_the_metric(client):
    before = COMPILES.compilations
    assert _metric_compilations(client) == before
    jax.jit(lambda x: x * 3 + 1).lower(np.zeros(7, np.float32)).compile()  # one compile, forced
    assert COMPILES.compilations == before + 1
    assert _metric_compilations(client) == before + 1


def test_a_compiled_executable_refuses_other_shapes(runtime):
    # The guarantee behind the test above: AOT-compiled executables raise on a new shape instead of compiling.
    runner = runtime.runners["ner"]
    bucket = runner.buckets[0]
    executable = runner._compiled[bucket]
    wrong = [np.zeros((bucket.rows, bucket.length + 8), np.int32) for _ in range(4)]
    with pytest.raises(TypeError, match="compiled with int32"):
        executable(runner.params, *wrong)


def test_start_up_objects_are_out_of_the_garbage_collectors_reach(runtime):
    # Nor does serving pay for start-up in garbage collection: the objects start-up made are frozen, so a full
    # collection while serving (a pause of every thread) scans only what requests create.
    assert runtime.ready
    assert gc.get_freeze_count() > 0


def test_every_length_up_to_the_maximum_has_a_bucket():
    grid = bucket_grid(
        160, single_row_lengths=[16, 32], multi_row_lengths=[64], row_counts=[1, 2, 4], max_batch_tokens=256
    )
    packer = Packer(grid, attention_cost_per_token=0.001)
    for length in range(1, 161):
        assert packer.plan([length]) is not None
    assert Bucket(1, 160) in grid


def test_packing_plans_are_valid_and_always_serve_the_oldest():
    grid = bucket_grid(
        128,
        single_row_lengths=[16, 32, 64],
        multi_row_lengths=[32, 64, 128],
        row_counts=[1, 2, 3, 4, 8],
        max_batch_tokens=512,
    )
    packer = Packer(grid, attention_cost_per_token=0.001)
    rng = np.random.default_rng(0)
    for _ in range(300):
        lengths = [int(n) for n in rng.integers(3, 60, size=rng.integers(1, 30))]
        plan = packer.plan(lengths)
        assert plan is not None and 0 in plan.chosen  # the oldest sequence is always served
        assert len(plan.chosen) == len(set(plan.chosen))
        assert len(plan.rows) <= plan.bucket.rows
        assert all(sum(lengths[i] for i in row) <= plan.bucket.length for row in plan.rows)

        everything = packer.plan_all(lengths)
        if everything is None:
            assert sum(lengths) > 128  # only sets larger than a bucket may find none
            continue
        assert everything.chosen == list(range(len(lengths)))
        # Packing never costs more than giving every sequence a row of its own would.
        unpacked = [b for b in grid if b.rows >= len(lengths) and b.length >= max(lengths)]
        if unpacked:
            assert packer.cost(everything.bucket) <= min(packer.cost(b) for b in unpacked)
        sequences = [ModelInput(np.arange(n, dtype=np.int32) + 5, np.zeros(n, np.int32)) for n in lengths]
        batch = packer.pack(sequences, everything)
        for seq, (r, offset, n) in zip(sequences, batch.placements, strict=True):
            np.testing.assert_array_equal(batch.input_ids[r, offset : offset + n], seq.input_ids)
            np.testing.assert_array_equal(batch.position_ids[r, offset : offset + n], np.arange(n))
            assert len(set(batch.segment_ids[r, offset : offset + n])) == 1


def test_measured_costs_steer_the_choice():
    grid = bucket_grid(
        32, single_row_lengths=[32], multi_row_lengths=[32], row_counts=[1, 2, 4], max_batch_tokens=128
    )
    packer = Packer(grid, attention_cost_per_token=0.0)
    # A fixed cost per forward pass (as on real hardware) favours filling the biggest bucket; what does not
    # fit waits for the next batch, and the oldest sequence is in this one.
    packer.set_measured_costs({b: 1.0 + b.tokens / 32 for b in grid})
    plan = packer.plan([30, 30, 30, 30, 30])
    assert plan.bucket == Bucket(4, 32) and plan.chosen == [0, 1, 2, 3]
    # With no fixed cost, a lone short sequence takes the smallest bucket.
    packer.set_measured_costs({b: b.tokens for b in grid})
    assert packer.plan([7]).bucket == Bucket(1, 32)
    # Measured costs are smoothed: a bigger bucket never looks cheaper than a smaller one.
    packer.set_measured_costs({b: (0.001 if b.rows == 4 else 1.0) for b in grid})
    assert all(
        packer.cost(a) <= packer.cost(b)
        for a in grid
        for b in grid
        if a.rows <= b.rows and a.length <= b.length
    )
