"""A batch job killed with SIGKILL at several points and started again with the same arguments ends with
every row exactly once, answered as an uninterrupted job answers it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from service.batch.cli import main as batch

ROOT = Path(__file__).resolve().parents[3]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "batch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the job ended before it could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the job did not get there in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_twice_then_resumed_every_row_exactly_once(tmp_path, batch_flags):
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(600)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    job = lambda out: [str(source), str(out), "--model", "embed", "--chunk-rows", "10", *batch_flags]  # noqa: E731

    reference = tmp_path / "reference"
    assert batch(job(reference)) == 0
    expected = pq.read_table(sorted(reference.glob("part-*.parquet")))

    out = tmp_path / "out"
    parts = lambda: len(list(out.glob("part-*.parquet")))  # noqa: E731
    # Killed as soon as the manifest is written (before any part), then again in the middle of the parts.
    _kill_when(_start(job(out)), lambda: (out / "_albert_batch.json").exists())
    first = parts()
    _kill_when(_start(job(out)), lambda: parts() >= first + 5)
    killed_at = parts()
    assert killed_at < 60, "the job finished before the second kill"
    finished = _start(job(out))
    assert finished.wait(300) == 0, finished.stderr.read()

    names = sorted(p.name for p in out.iterdir())
    assert names == ["_albert_batch.json"] + [f"part-{i:05d}.parquet" for i in range(60)], names
    table = pq.read_table([str(out / name) for name in names[1:]])
    assert table.column("id").to_pylist() == list(range(600))  # every row once, in order
    assert table.column("text").to_pylist() == texts
    assert table.column("error").null_count == 600
    np.testing.assert_allclose(
        np.array(table.column("embedding").to_pylist(), dtype=np.float32),
        np.array(expected.column("embedding").to_pylist(), dtype=np.float32),
        rtol=1e-5,
        atol=1e-6,
    )
