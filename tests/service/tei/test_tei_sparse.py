"""SPLADE on TEI's /embed_sparse: a checkpoint saved by sentence-transformers 5's SparseEncoder (MLMTransformer
+ SpladePooling) answers the non-zero terms of SparseEncoder.encode, found from modules.json alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from builders import build_repo
from embed_builders import build_sparse_encoder
from fastapi.testclient import TestClient

from service.app import create_app
from service.runtime import Runtime
from service.settings import Settings
from tests.service.support import SMALL_GRID, models_file_runtime
from tests.service.tei.tei_schema import assert_tei_schema

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Marie Curie worked in Paris.", "terrible, awful!"]
LONG = " ".join(f"The {i}th quick brown fox jumps over the lazy dog near the river bank." for i in range(30))
SHALLOW = dict(num_hidden_layers=2, num_hidden_groups=1, inner_group_num=1)


@pytest.fixture(scope="module")
def splade_repos(tmp_path_factory, spiece_model, tei_repos):
    tmp = tmp_path_factory.mktemp("splade")
    build_repo(tmp / "mlm", "masked-lm", spiece_model, seed=21, **SHALLOW)
    repos = {}
    for name, strategy, activation in [("splade", "max", "relu"), ("splade-sum", "sum", "log1p_relu")]:
        repos[name] = build_sparse_encoder(
            tmp / name, tmp / "mlm", pooling_strategy=strategy, activation_function=activation
        )
    repos["st"] = tei_repos["st"]
    return repos


@pytest.fixture(scope="module")
def sparse_client(splade_repos, tmp_path_factory):
    path = tmp_path_factory.mktemp("splade-config") / "models.toml"
    path.write_text(
        f'[models.splade]\nsource = "{splade_repos["splade"]}"\ndefault = true\n'
        f'[models.splade-sum]\nsource = "{splade_repos["splade-sum"]}"\n'
        f'[models.st]\nsource = "{splade_repos["st"]}"\n'
    )
    runtime = models_file_runtime(path)
    with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
        yield client
    runtime.stop()


def _reference(directory, texts) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = SparseEncoder(str(directory), device="cpu").encode(texts)
    return encoded.to_dense().numpy()


@pytest.mark.parametrize("name", ["splade", "splade-sum"])
def test_embed_sparse_is_sparse_encoders_non_zeros(sparse_client, splade_repos, name):
    models = {m["name"]: m for m in sparse_client.get("/models").json()["models"]}
    assert models[name]["task"] == "sparse-embed"  # from modules.json alone
    response = sparse_client.post("/embed_sparse", json={"inputs": [*TEXTS, LONG], "model": name})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "EmbedSparseResponse")
    reference = _reference(splade_repos[name], [*TEXTS, LONG])  # it truncates LONG
    for answer, dense in zip(response.json(), reference, strict=True):
        indices = [term["index"] for term in answer]
        assert indices == sorted(indices) and all(term["value"] > 0 for term in answer)
        ours = np.zeros_like(dense)
        ours[indices] = [term["value"] for term in answer]
        np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-5)
        # The same terms, but for any within float32 noise of zero (a logit at the relu's edge).
        differ = set(indices) ^ set(np.nonzero(dense)[0].tolist())
        assert all(max(ours[i], dense[i]) < 1e-5 for i in differ), differ
        assert len(indices) > 10


def test_info_says_splade_for_a_sparse_default(tmp_path, splade_repos):
    from service.tei import tei_info

    path = tmp_path / "models.toml"
    path.write_text(f'[models.splade]\nsource = "{splade_repos["splade"]}"\n')
    runtime = Runtime(
        Settings(
            **SMALL_GRID,
            models_file=str(path),
            classify_model=None,
            fill_mask_model=None,
            qa_model=None,
            ner_model=None,
        )
    )  # not started: /info describes configured models
    assert runtime.models["splade"].task == "sparse-embed"  # from modules.json, at configuration
    info = tei_info(runtime)
    assert_tei_schema(info, "Info")
    assert (
        info["model_type"] == {"embedding": {"pooling": "splade"}} and info["served_model_name"] == "splade"
    )


def test_models_route_answers_as_embed_sparse(sparse_client):
    by_name = sparse_client.post("/models/splade", json={"inputs": TEXTS[:2]})
    assert by_name.status_code == 200, by_name.text
    assert by_name.json() == sparse_client.post("/embed_sparse", json={"inputs": TEXTS[:2]}).json()


def test_embed_sparse_bad_input(sparse_client):
    wrong = sparse_client.post("/embed_sparse", json={"inputs": "a", "model": "st"})
    assert wrong.status_code == 422 and "sparse-embed" in wrong.json()["error"]
    long = sparse_client.post("/embed_sparse", json={"inputs": LONG, "truncate": False})
    assert long.status_code == 413, long.text
    empty = sparse_client.post("/embed_sparse", json={"inputs": []})
    assert empty.status_code == 422
    # A route only TEI has answers its errors in TEI's kinds (a 413 and a 422 are both its `Validation`).
    for response in (wrong, long, empty):
        assert_tei_schema(response.json(), "ErrorResponse")
        assert response.json()["error_type"] == "Validation", response.text


def test_batch_job_answers_as_embed_sparse(sparse_client, splade_repos, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.batch.cli import main as batch

    models = tmp_path / "models.toml"
    models.write_text(f'[models.splade]\nsource = "{splade_repos["splade"]}"\n')
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    flags = ["--models-file", str(models), "--compilation-cache-dir", ""]
    for name, value in SMALL_GRID.items():
        if name != "compilation_cache_dir":
            flags += [
                "--" + name.replace("_", "-"),
                ",".join(map(str, value)) if isinstance(value, list) else str(value),
            ]
    assert batch([str(source), str(tmp_path / "out"), "--model", "splade", *flags]) == 0
    table = pq.read_table(sorted(str(p) for p in (tmp_path / "out").glob("part-*.parquet")))
    assert table.schema.field("indices").type == pa.list_(pa.int32())
    assert table.schema.field("values").type == pa.list_(pa.float32())
    expected = sparse_client.post("/embed_sparse", json={"inputs": TEXTS, "model": "splade"}).json()
    assert table.column("indices").to_pylist() == [[t["index"] for t in terms] for terms in expected]
    np.testing.assert_allclose(
        np.concatenate([np.asarray(v, np.float32) for v in table.column("values").to_pylist()]),
        np.asarray([t["value"] for terms in expected for t in terms], np.float32),
        rtol=1e-6,
    )
