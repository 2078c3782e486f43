"""`albert-serve batch` in-process: every input format and task against the endpoints' answers (the service's
own routes on the same models, through TestClient), bad rows, a mismatched OUTPUT refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from compare import assert_matches_pipeline

from service.batch.cli import main as batch

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Marie Curie worked in Paris.",
    "terrible, awful, bad!",
    "A much longer sentence about the weather in Lisbon, which was sunny for most of the week in May.",
    "ok",
]
MASKED = [
    "The capital of France is [MASK].",
    "Marie [MASK] worked in Paris.",
    "[MASK] is good, [MASK] is not.",
]
CONTEXT = "Marie Curie was a physicist and chemist. She was born in Warsaw and worked in Paris for most of her life."
QUESTIONS = ["Where was Marie Curie born?", "What was her job?", "Where did she work?"]


def read_output(directory) -> pa.Table:
    return pq.read_table(sorted(str(p) for p in directory.glob("part-*.parquet")))


def write_input(path, rows: list[dict]) -> str:
    """`rows` as a file of the format its suffix names (or, for a directory, two parquet files)."""
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pq.write_table(table, path)
    else:  # a directory of two files, read in name order
        path.mkdir()
        half = len(rows) // 2
        pq.write_table(table.slice(0, half), path / "a.parquet")
        pq.write_table(table.slice(half), path / "b.parquet")
    return str(path)


@pytest.mark.parametrize("name", ["in.jsonl", "in.csv", "in.parquet", "in-dir", "hf"])
def test_embed_from_every_format_equals_the_endpoint(tmp_path, name, batch_flags, endpoints):
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS * 2)]
    if name == "hf":  # a dataset repository as the Hub holds one (data files), loaded by `datasets`
        (tmp_path / "dataset").mkdir()
        write_input(tmp_path / "dataset" / "train.jsonl", rows)
        source = f"hf://datasets/{tmp_path / 'dataset'}"
    else:
        source = write_input(tmp_path / name, rows)
    assert batch([source, str(tmp_path / "out"), "--model", "embed", "--chunk-rows", "4", *batch_flags]) == 0
    table = read_output(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [
        f"part-0000{i}.parquet" for i in range(3)
    ]
    assert table.column("id").to_pylist() == list(range(10))
    assert table.column("text").to_pylist() == TEXTS * 2
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    expected = endpoints.post("/embed", json={"inputs": TEXTS, "model": "embed"}).json()
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, np.array(expected * 2, dtype=np.float32), rtol=1e-5, atol=1e-6)
    assert table.column("error").null_count == 10


def test_classify_label_score_and_scores_in_label_order(tmp_path, batch_flags, endpoints):
    rows = [{"text": t, "pair": p} for t, p in zip(TEXTS, TEXTS[::-1], strict=True)]
    source = write_input(tmp_path / "in.csv", rows)
    args = [source, str(tmp_path / "out"), "--model", "classify", "--pair-column", "pair", *batch_flags]
    assert batch(args) == 0
    table = read_output(tmp_path / "out").to_pylist()
    for row in table:
        ranked = endpoints.post(
            "/classify",
            json={"inputs": {"text": row["text"], "text_pair": row["pair"]}, "model": "classify"},
        ).json()
        # Batched with other rows, a score may differ from a lone request's in the last float32 place.
        assert row["label"] == ranked[0]["label"]
        assert row["score"] == pytest.approx(ranked[0]["score"], rel=1e-5, abs=1e-6)
        by_label = {entry["label"]: entry["score"] for entry in ranked}
        expected = [by_label[label] for label in ("neg", "pos", "neutral")]
        assert row["scores"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert row["error"] is None


def _endpoint_answer(endpoints, task: str, row: dict, options: dict):
    if task == "qa":
        body = {"inputs": {"question": row["question"], "context": row["context"]}}
    elif task == "rerank":
        body = {"query": row["query"], "texts": [row["text"]]}
    else:
        body = {"inputs": row["text"]}
    response = endpoints.post(f"/{task}", json={**options, **body, "model": task})
    assert response.status_code == 200, response.text
    return response.json()


CASES = {
    "fill-mask": ([{"text": t} for t in MASKED], {"parameters": {"top_k": 3}}),
    "ner": ([{"text": t} for t in TEXTS], {"parameters": {"aggregation_strategy": "simple"}}),
    "qa": ([{"question": q, "context": CONTEXT} for q in QUESTIONS], {"parameters": {"top_k": 2}}),
    "zero-shot": (
        [{"text": t} for t in TEXTS],
        {"parameters": {"candidate_labels": ["weather", "science", "feelings"], "multi_label": True}},
    ),
    "rerank": ([{"query": "Where did Curie work?", "text": t} for t in TEXTS], {"raw_scores": True}),
}


@pytest.mark.parametrize("task", CASES)
def test_every_other_task_answers_as_its_endpoint(tmp_path, task, batch_flags, endpoints):
    rows, options = CASES[task]
    source = write_input(tmp_path / "in.parquet", rows)
    args = [source, str(tmp_path / "out"), "--model", task, "--options", json.dumps(options), *batch_flags]
    assert batch(args) == 0
    table = read_output(tmp_path / "out").to_pylist()
    assert len(table) == len(rows)
    for row in table:
        assert row["error"] is None
        # Batched with other rows, scores may differ from a lone request's in the last float32 places.
        assert_matches_pipeline(
            json.loads(row["answer"]), _endpoint_answer(endpoints, task, row, options), atol=1e-5
        )


def test_bad_rows_get_an_error_and_the_others_their_answers(tmp_path, batch_flags, endpoints):
    # A number among the texts: Arrow cannot type that column, the job still reads every row.
    values = ["Marie Curie worked in Paris.", "", 5, None, ["a list"], "ok", "word " * 400]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": v}) + "\n" for v in values))
    # truncate: false, so that the over-long text is an error (413) rather than cut.
    options = ["--options", '{"truncate": false}']
    assert batch([str(source), str(tmp_path / "out"), "--model", "embed", *options, *batch_flags]) == 0
    table = read_output(tmp_path / "out").to_pylist()
    assert len(table) == len(values)
    errors = [row["error"] for row in table]
    answered = [i for i, e in enumerate(errors) if e is None]
    assert answered == [0, 5]
    assert errors[1].startswith("inputs:") and "413" in errors[6], errors
    assert all("expected a string" in errors[i] for i in (2, 3, 4)), errors
    for i in answered:
        expected = endpoints.post("/embed", json={"inputs": [values[i]], "model": "embed"}).json()[0]
        np.testing.assert_allclose(
            np.float32(table[i]["embedding"]), np.float32(expected), rtol=1e-5, atol=1e-6
        )
        assert all(table[j]["embedding"] is None for j in range(len(values)) if j not in answered)
    # The endpoint refuses the empty and the over-long text too.
    assert endpoints.post("/embed", json={"inputs": values[1], "model": "embed"}).status_code == 422
    too_long = {"inputs": [values[6]], "model": "embed", "truncate": False}
    assert endpoints.post("/embed", json=too_long).status_code == 413


def test_a_different_model_or_input_in_the_same_output_is_refused(tmp_path, batch_flags, capsys):
    source = write_input(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    out = str(tmp_path / "out")
    assert batch([source, out, "--model", "embed", *batch_flags]) == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()
    assert batch([source, out, "--model", "classify", *batch_flags]) == 2
    assert "model" in capsys.readouterr().err
    other = write_input(tmp_path / "other.jsonl", [{"text": t} for t in TEXTS[::-1]])
    assert batch([other, out, "--model", "embed", *batch_flags]) == 2
    assert "input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    # Run again as it was: nothing to do, nothing changed.
    assert batch([source, out, "--model", "embed", *batch_flags]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--column", "body"], "no column 'body'"),
        (["--options", "[1]"], "JSON object"),
        (["--chunk-rows", "0"], "at least 1"),
    ],
)
def test_a_job_that_cannot_run_exits_2_saying_why(tmp_path, args, fragment, batch_flags, capsys):
    source = write_input(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    assert batch([source, str(tmp_path / "out"), "--model", "embed", *args, *batch_flags]) == 2
    assert fragment in capsys.readouterr().err


def test_an_input_column_named_like_an_answer_needs_a_prefix(tmp_path, batch_flags, capsys):
    source = write_input(tmp_path / "in.parquet", [{"text": t, "label": "gold"} for t in TEXTS])
    assert batch([source, str(tmp_path / "out"), "--model", "classify", *batch_flags]) == 2
    assert "--output-prefix" in capsys.readouterr().err
    args = [
        source,
        str(tmp_path / "out2"),
        "--model",
        "classify",
        "--output-prefix",
        "predicted_",
        *batch_flags,
    ]
    assert batch(args) == 0
    table = read_output(tmp_path / "out2")
    assert {"label", "predicted_label", "predicted_scores", "predicted_error"} <= set(table.column_names)
