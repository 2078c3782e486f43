"""`albert-serve batch --ray`: the job on a real Ray (a local one it starts, and a cluster started with `ray
start --head` that it joins) writes what the in-process job writes, and the two finish each other's OUTPUT."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.batch.cli import main as batch

from .test_batch import TEXTS as BATCH_TEXTS

ray = pytest.importorskip("ray")  # the test extra installs it; CI runs these

ROOT = Path(__file__).resolve().parents[3]
TEXTS = [*BATCH_TEXTS, "Rain again in Manchester."]


def _parts(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("part-*.parquet"))


def _assert_same_output(got: Path, expected: Path, floats: set[str]) -> None:
    assert _parts(got) == _parts(expected)
    for name in _parts(expected):
        a, b = pq.read_table(got / name), pq.read_table(expected / name)
        assert a.schema.equals(b.schema), (a.schema, b.schema)
        for column in a.column_names:
            if column in floats:  # batched with other neighbours: equal within float32 rounding
                for x, y in zip(a.column(column).to_pylist(), b.column(column).to_pylist(), strict=True):
                    if y is None:
                        assert x is None
                    else:
                        np.testing.assert_allclose(np.float32(x), np.float32(y), rtol=1e-5, atol=1e-6)
            else:
                assert a.column(column).to_pylist() == b.column(column).to_pylist(), column


def test_local_ray_writes_what_the_in_process_job_writes(tmp_path, batch_flags):
    # A number and an empty text among the rows: their errors travel through Ray as in-process.
    values = [*TEXTS, 5, "", *TEXTS[:3]]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": v}) + "\n" for i, v in enumerate(values)))
    common = [str(source), "--model", "embed", "--chunk-rows", "4", *batch_flags]
    assert batch([common[0], str(tmp_path / "in-process"), *common[1:]]) == 0
    assert batch([common[0], str(tmp_path / "on-ray"), *common[1:], "--ray", "local"]) == 0
    assert not ray.is_initialized()  # the job shut down the Ray it started

    _assert_same_output(tmp_path / "on-ray", tmp_path / "in-process", {"embedding"})
    manifest = "_albert_batch.json"
    assert (tmp_path / "on-ray" / manifest).read_text() == (tmp_path / "in-process" / manifest).read_text()
    errors = pq.read_table(sorted((tmp_path / "on-ray").glob("part-*"))).column("error").to_pylist()
    assert [i for i, e in enumerate(errors) if e is not None] == [6, 7]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head started as a user starts one (`ray start --head`), stopped afterwards."""
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--port=0",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr
    address = re.search(r"ray start --address='([^']+)'", started.stdout)
    assert address, started.stdout
    yield address.group(1)
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_a_ray_cluster_job_resumes_an_in_process_output(tmp_path, batch_flags, ray_cluster):
    rows = [{"text": t, "pair": p} for t, p in zip(TEXTS * 2, TEXTS[::-1] * 2, strict=True)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    args = [str(source), "--model", "classify", "--pair-column", "pair", "--chunk-rows", "5", *batch_flags]
    reference, output = tmp_path / "reference", tmp_path / "out"
    assert batch([args[0], str(reference), *args[1:]]) == 0
    assert _parts(reference) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    # An in-process job stopped after its first and last chunks; the Ray job writes only the one left.
    shutil.copytree(reference, output)
    (output / "part-00001.parquet").unlink()
    kept = {name: (output / name).stat().st_mtime_ns for name in _parts(output)}
    job = subprocess.run(
        [sys.executable, "-m", "service", "batch", args[0], str(output), *args[1:], "--ray", ray_cluster],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "5 row(s) answered" in job.stderr and "7 already done" in job.stderr, job.stderr[-3000:]
    assert {name: (output / name).stat().st_mtime_ns for name in kept} == kept
    _assert_same_output(output, reference, {"score", "scores"})


def test_a_model_that_fails_on_the_actors_ends_the_job_with_its_reason(
    tmp_path, batch_repos, batch_flags, ray_cluster, capsys
):  # ray_cluster: running, so that `--ray` alone joins it
    broken = tmp_path / "broken"
    shutil.copytree(batch_repos["embed"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "hello"}\n')
    # `--ray` alone: the cluster this machine runs (the fixture's), as Ray's own default finds it.
    code = batch([str(source), str(tmp_path / "out"), "--model", str(broken), *batch_flags, "--ray"])
    assert code == 1
    assert "model.safetensors: corrupt or truncated" in capsys.readouterr().err.splitlines()[-1]
    assert not list((tmp_path / "out").glob("part-*"))


def test_the_cluster_docs_commands_are_the_jobs_own():
    """docs/batch-on-ray.md: its RayJob is a RayJob of ray.io/v1, and every `albert-serve batch` line in it (the
    RayJob's entrypoint too) parses with the job's own flags."""
    import shlex

    import yaml

    from service.batch.cli import build_parser

    text = (ROOT / "docs" / "batch-on-ray.md").read_text()
    (manifest,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    job = yaml.safe_load(manifest)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    commands = [job["spec"]["entrypoint"]]
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        commands += [
            line[line.index("albert-serve batch") :]
            for line in joined.splitlines()
            if "albert-serve batch" in line
        ]
    assert len(commands) == 3
    for command in commands:
        words = shlex.split(command)
        assert words[:2] == ["albert-serve", "batch"]
        args, rest = build_parser().parse_known_args(words[2:])
        assert args.ray == "auto" and args.model and args.output
        assert rest == ["--compilation-cache-dir", rest[1]]  # the server's flag, passed on to its settings
