"""`albert-serve batch`: every input format and task against the endpoints' answers, bad rows, refusal of a
mismatched OUTPUT."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.batch.cli import main as batch

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Marie Curie worked in Paris.",
    "terrible, awful, bad!",
    "A much longer sentence about the weather in Lisbon, which was sunny for most of the week in May.",
    "ok",
]


def read_output(directory) -> pa.Table:
    return pq.read_table(sorted(str(p) for p in directory.glob("part-*.parquet")))


def test_embed_jsonl_equals_the_endpoint(tmp_path, batch_flags, endpoints):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS * 3)))
    assert (
        batch([str(source), str(tmp_path / "out"), "--model", "embed", "--chunk-rows", "4", *batch_flags])
        == 0
    )
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(15))
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    expected = endpoints.post("/embed", json={"inputs": TEXTS, "model": "embed"}).json()
    got = table.column("embedding").to_pylist()
    np.testing.assert_array_equal(np.array(got, dtype=np.float32), np.array(expected * 3, dtype=np.float32))
    assert table.column("error").null_count == 15
