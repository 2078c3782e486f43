"""The demo checkpoints of `albert-serve-demo`: real Hugging Face repositories, marked as demo weights.

The repositories are built by the project's own code (no transformers); transformers is the reference that
reads them back: its fast and slow ALBERT tokenizers, and its own Flax ALBERT models on flax_model.msgpack.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import model
from service import demo
from service.models import configured_models
from service.settings import Settings

TEXTS = [
    "John lives in Paris and works at the [MASK].",
    "What is the capital of France? It is Paris, since 1790!",
    "Zürich  costs $3.50 -- naïve café.",
]
TRANSFORMERS_CLASSES = {
    "classify": "FlaxAlbertForSequenceClassification",
    "fill-mask": "FlaxAlbertForMaskedLM",
    "qa": "FlaxAlbertForQuestionAnswering",
    "ner": "FlaxAlbertForTokenClassification",
}


@pytest.fixture(autouse=True)
def keep_logging(monkeypatch):
    # demo.main installs the service's log handler on the root logger; not in the test process.
    import service.app

    monkeypatch.setattr(service.app, "configure_logging", lambda level: None)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return demo.build_demo_models(tmp_path_factory.mktemp("demo-models"))


def test_every_endpoint_and_named_model_gets_a_complete_repository(repos):
    assert set(repos) == {"classify", "fill-mask", "qa", "ner", *demo.NAMED_REPOS}
    for path in repos.values():
        names = {p.name for p in path.iterdir()}
        assert {
            "config.json",
            "tokenizer_config.json",
            "spiece.model",
            "flax_model.msgpack",
            "README.md",
        } <= names
    # Nothing half-built is left beside them.
    assert sorted(p.name for p in next(iter(repos.values())).parent.iterdir()) == sorted(
        [*repos, demo.MODELS_FILE]
    )


def test_repositories_say_they_are_demo_weights(repos):
    for endpoint, path in repos.items():
        config = json.loads((path / "config.json").read_text())
        assert config["demo"] is True
        assert "random" in (path / "README.md").read_text().lower()
        if endpoint in (
            "classify",
            "ner",
            "reviews",
            "cross",
        ):  # nli's labels must be NLI's to serve zero-shot
            labels = [label for label in config["id2label"].values() if label != "O"]
            assert labels and all("DEMO_" in label for label in labels)


@pytest.mark.parametrize("endpoint", ["classify", "fill-mask", "qa", "ner"])
def test_repository_loads_with_the_project_and_matches_transformers(repos, endpoint):
    transformers = pytest.importorskip("transformers")
    path = repos[endpoint]

    loaded = model.from_pretrained(path)
    assert loaded.task == demo.DEMO_REPOS[endpoint][0]
    tokenizer = model.load_tokenizer(path)
    assert tokenizer.mask_token == "[MASK]" and tokenizer.model_max_length == demo.MAX_LENGTH

    fast = transformers.AlbertTokenizerFast.from_pretrained(str(path))
    slow = transformers.AlbertTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        ours = tokenizer.encode(text)[0].ids
        assert ours == fast(text)["input_ids"] == slow(text)["input_ids"], text

    reference = getattr(transformers, TRANSFORMERS_CLASSES[endpoint]).from_pretrained(str(path))
    batch = fast(TEXTS, padding=True, return_tensors="np")
    expected = reference(**batch)
    outputs = loaded(**batch)
    assert outputs
    for name, value in outputs.items():
        np.testing.assert_allclose(
            value, np.asarray(getattr(expected, name)), atol=1e-4, rtol=0, err_msg=name
        )


def test_existing_repositories_are_kept_unless_rebuild(repos):
    weights = repos["qa"] / "flax_model.msgpack"
    before = weights.stat().st_mtime_ns
    os.utime(weights, ns=(before - 10**9, before - 10**9))
    demo.build_demo_models(repos["qa"].parent)
    assert weights.stat().st_mtime_ns == before - 10**9
    demo.build_demo_models(repos["qa"].parent, rebuild=True)
    assert weights.stat().st_mtime_ns != before - 10**9


def test_command_points_the_service_at_the_repositories(repos, monkeypatch):
    """`albert-serve-demo` sets the four model sources, the models file of the named models and a small grid,
    and passes other flags on."""
    import service.__main__

    environment = {k: v for k, v in os.environ.items() if not k.startswith("ALBERT_")}
    environment["ALBERT_NER_MODEL"] = "someone/else"  # the demo overrides model sources...
    environment["ALBERT_BATCH_BUCKETS"] = "1,2"  # ...but keeps other settings the caller gave
    monkeypatch.setattr(os, "environ", environment)
    served = {}
    monkeypatch.setattr(service.__main__, "main", lambda argv: served.update(argv=argv, env=dict(os.environ)))

    demo.main(["--models-dir", str(repos["qa"].parent), "--port", "9123"])

    assert served["argv"] == ["--port", "9123"]
    settings = Settings()
    assert {m.name: m.source for m in configured_models(settings)} == {
        endpoint: str(path) for endpoint, path in repos.items()
    }
    tasks = {m.name: m.task for m in configured_models(settings)}
    assert {name: tasks[name] for name in demo.NAMED_REPOS} == {
        name: task for name, (_, _, task, _) in demo.NAMED_REPOS.items()
    }
    assert settings.batch_buckets == [1, 2]
    assert settings.seq_buckets == [32, 128] and settings.batch_seq_buckets == [128]
    assert served["env"]["HF_HUB_OFFLINE"] == "1"


def test_build_only_prints_the_repositories(repos, capsys):
    demo.main(["--models-dir", str(repos["qa"].parent), "--build-only"])
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert printed == {endpoint: str(path) for endpoint, path in repos.items()}


def _torch_copy(repo, directory, flax_class: str, torch_class: str):
    """The repository with its weights converted to PyTorch by transformers' own Flax-to-PyTorch loader
    (sentence-transformers reads no flax_model.msgpack; `from_flax=True` leaves 4.57's weights on `meta`)."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    shutil.copytree(repo, directory)
    flax = getattr(transformers, flax_class).from_pretrained(str(repo))
    torch_model = getattr(transformers, torch_class)(flax.config)
    load_flax_weights_in_pytorch_model(torch_model, flax.params)
    torch_model.tie_weights()
    (directory / "flax_model.msgpack").unlink()
    torch_model.save_pretrained(str(directory))
    return directory


def test_embedding_repositories_answer_as_sentence_transformers_reads_them(repos, tmp_path):
    """The demo's sentence-transformers and SparseEncoder layouts: sentence-transformers 5 reads the modules
    we mean from them, and the service's /embed and /embed_sparse equal its encode on the same weights."""
    import warnings

    from fastapi.testclient import TestClient

    from service.app import create_app
    from tests.service.support import models_file_runtime

    st = pytest.importorskip("sentence_transformers")
    texts = TEXTS[:2]
    models = tmp_path / "models.toml"
    # No task given: found from modules.json, as for any checkpoint.
    models.write_text(
        f'[models.embedder]\nsource = "{repos["my-embedder"]}"\n'
        f'[models.splade]\nsource = "{repos["splade"]}"\n'
    )
    runtime = models_file_runtime(models)
    try:
        with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
            dense = client.post("/embed", json={"inputs": texts})
            sparse = client.post("/embed_sparse", json={"inputs": texts})
            tasks = {m["name"]: m["task"] for m in client.get("/models").json()["models"]}
    finally:
        runtime.stop()
    assert tasks == {"embedder": "embed", "splade": "sparse-embed"}
    assert dense.status_code == 200 and sparse.status_code == 200, dense.text + sparse.text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedder = _torch_copy(repos["my-embedder"], tmp_path / "embedder", "FlaxAlbertModel", "AlbertModel")
        splade = _torch_copy(
            repos["splade"], tmp_path / "splade", "FlaxAlbertForMaskedLM", "AlbertForMaskedLM"
        )
        encoder = st.SentenceTransformer(str(embedder), device="cpu")
        sparse_encoder = st.SparseEncoder(str(splade), device="cpu")
        expected_dense = encoder.encode(texts)
        expected_sparse = sparse_encoder.encode(texts).to_dense().numpy()
    assert [type(m).__name__ for m in encoder] == ["Transformer", "Pooling", "Normalize"]
    assert [type(m).__name__ for m in sparse_encoder] == ["MLMTransformer", "SpladePooling"]
    np.testing.assert_allclose(np.asarray(dense.json()), expected_dense, atol=1e-5, rtol=0)
    for answer, expected in zip(sparse.json(), expected_sparse, strict=True):
        ours = np.zeros_like(expected)
        ours[[term["index"] for term in answer]] = [term["value"] for term in answer]
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
        assert len(answer) > 10
