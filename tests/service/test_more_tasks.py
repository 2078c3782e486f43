"""/embed, /v1/embeddings, /similarity, /zero-shot and /rerank through the real engine, against the libraries
people use: SentenceTransformer.encode, the 4.57 zero-shot pipeline, a sigmoid over PyTorch cross-encoder
logits; the openai client and huggingface_hub's InferenceClient against a started server."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from compare import assert_matches_pipeline
from embed_builders import SHALLOW, build_backbone, build_sentence_transformer
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.support import SMALL_GRID, ServiceProcess, models_file_runtime, settings_env

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Marie Curie worked in Paris.",
    "terrible, awful, bad!",
]
NLI_LABELS = ["contradiction", "neutral", "entailment"]


@pytest.fixture(scope="module")
def task_repos(tmp_path_factory, spiece_model, make_repo):
    tmp = tmp_path_factory.mktemp("more-tasks")
    backbone = build_backbone(tmp / "backbone", spiece_model, seed=4)
    return {
        "st-mean": build_sentence_transformer(tmp / "st-mean", backbone, pooling_mode="mean"),
        "st-dense": build_sentence_transformer(
            tmp / "st-dense",
            backbone,
            pooling_mode="cls",
            dense=[(24, "Tanh", True)],
            normalize=True,
            prompts={"query": "query: "},
            default_prompt_name="query",
        ),
        "plain": backbone,
        "nli": make_repo("sequence-classification", seed=7, labels=NLI_LABELS, **SHALLOW)[0],
        "cross": make_repo("sequence-classification", seed=8, labels=["score"], **SHALLOW)[0],
    }


def _models_toml(repos) -> str:
    return "\n".join(
        [
            f'[models.st-mean]\nsource = "{repos["st-mean"]}"\ndefault = true',
            f'[models.st-dense]\nsource = "{repos["st-dense"]}"',
            f'[models.plain]\nsource = "{repos["plain"]}"\ntask = "embed"\npooling = "max"',
            f'[models.nli]\nsource = "{repos["nli"]}"\ntask = "zero-shot"\ndefault = true',
            f'[models.cross]\nsource = "{repos["cross"]}"\ntask = "rerank"',
            f'[models.not-nli]\nsource = "{repos["cross"]}"\ntask = "zero-shot"',
            "",
        ]
    )


@pytest.fixture(scope="module")
def tasks_client(task_repos, tmp_path_factory):
    path = tmp_path_factory.mktemp("more-tasks-config") / "models.toml"
    path.write_text(_models_toml(task_repos))
    runtime = models_file_runtime(path)
    with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
        yield client
    runtime.stop()


def _encode(directory, texts, **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(directory), device="cpu").encode(texts, **kwargs)


def test_embed_equals_sentence_transformers_encode(tasks_client, task_repos):
    for name in ("st-mean", "st-dense"):
        response = tasks_client.post("/embed", json={"inputs": TEXTS, "normalize": False, "model": name})
        assert response.status_code == 200, response.text
        ours = np.asarray(response.json(), np.float32)
        reference = _encode(task_repos[name], TEXTS)  # st-dense: its default prompt applies to both
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    # TEI's default normalizes; a single input is still one vector in a list.
    one = tasks_client.post("/embed", json={"inputs": TEXTS[0]}).json()
    reference = _encode(task_repos["st-mean"], [TEXTS[0]], normalize_embeddings=True)
    np.testing.assert_allclose(np.asarray(one), reference, atol=1e-5)


def test_plain_checkpoint_is_pooled_as_its_entry_says(tasks_client, task_repos):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task_repos["plain"]))
    model = AutoModel.from_pretrained(str(task_repos["plain"])).eval()
    with torch.no_grad():
        hidden = model(**tokenizer(TEXTS[1], return_tensors="pt")).last_hidden_state[0]
    response = tasks_client.post("/embed", json={"inputs": TEXTS[1], "model": "plain", "normalize": False})
    np.testing.assert_allclose(np.asarray(response.json()[0]), hidden.max(0).values.numpy(), atol=1e-5)


def test_similarity_is_the_cosine_of_the_embeddings(tasks_client, task_repos):
    from sentence_transformers import util

    body = {"inputs": {"source_sentence": TEXTS[0], "sentences": TEXTS[1:]}}
    response = tasks_client.post("/similarity", json=body)
    assert response.status_code == 200, response.text
    vectors = _encode(task_repos["st-mean"], TEXTS)
    expected = util.cos_sim(vectors[:1], vectors[1:])[0].numpy()
    np.testing.assert_allclose(response.json(), expected, atol=1e-5)


def test_zero_shot_equals_the_pipeline(tasks_client, task_repos):
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pipeline("zero-shot-classification", model=str(task_repos["nli"]))
        for multi_label in (False, True):
            parameters = {"candidate_labels": ["sport", "politics", "cooking"], "multi_label": multi_label}
            response = tasks_client.post("/zero-shot", json={"inputs": TEXTS[1], "parameters": parameters})
            assert response.status_code == 200, response.text
            expected = reference(TEXTS[1], **parameters)
            assert response.json()["labels"] == expected["labels"]
            np.testing.assert_allclose(response.json()["scores"], expected["scores"], atol=1e-5)


def test_rerank_is_the_sigmoid_of_the_cross_encoder(tasks_client, task_repos):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(task_repos["cross"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(task_repos["cross"])).eval()
    query = "Where did Marie Curie work?"
    with torch.no_grad():
        logits = model(**tokenizer([query] * len(TEXTS), TEXTS, return_tensors="pt", padding=True)).logits[
            :, 0
        ]
    scores = torch.sigmoid(logits).numpy()
    response = tasks_client.post("/rerank", json={"query": query, "texts": TEXTS, "return_text": True})
    assert response.status_code == 200, response.text
    ranked = response.json()
    assert [r["index"] for r in ranked] == list(np.argsort(-scores, kind="stable"))
    for entry in ranked:
        assert abs(entry["score"] - scores[entry["index"]]) < 1e-5 and entry["text"] == TEXTS[entry["index"]]
    raw = tasks_client.post("/rerank", json={"query": query, "texts": TEXTS, "raw_scores": True}).json()
    assert {r["index"]: round(r["score"], 4) for r in raw} == {
        i: round(float(x), 4) for i, x in enumerate(logits)
    }


def test_a_classifier_without_entailment_fails_alone(tasks_client):
    models = {m["name"]: m for m in tasks_client.get("/models").json()["models"]}
    assert models["not-nli"]["state"] == "failed" and "entail" in models["not-nli"]["reason"]
    assert all(m["state"] == "ready" for name, m in models.items() if name != "not-nli")
    response = tasks_client.post(
        "/zero-shot", json={"inputs": "x", "model": "not-nli", "parameters": {"candidate_labels": ["a"]}}
    )
    assert response.status_code == 503 and response.json()["error_type"] == "model_unavailable"


@pytest.mark.parametrize(
    "path, body, status, fragments",
    [
        ("/embed", {"inputs": " "}, 422, ["inputs", "empty"]),
        ("/embed", {"inputs": []}, 422, ["inputs"]),
        ("/embed", {"inputs": ["a"] * 65}, 413, ["65", "64"]),
        ("/embed", {"inputs": "word " * 400, "truncate": False}, 413, ["160"]),
        ("/embed", {"inputs": ["a"] * 33}, 422, ["batch size 33", "32"]),
        (
            "/v1/embeddings",
            {"input": "a", "model": "st-mean", "encoding_format": "int8"},
            422,
            ["encoding_format"],
        ),
        (
            "/v1/embeddings",
            {"input": "a", "model": "st-mean", "dimensions": 5000},
            422,
            ["dimensions", "5000", "embedding size"],
        ),
        ("/v1/embeddings", {"input": "a", "model": "nope"}, 404, ["nope"]),
        ("/zero-shot", {"inputs": "a", "parameters": {"candidate_labels": []}}, 422, ["label"]),
        ("/rerank", {"query": "q", "texts": []}, 422, ["texts"]),
        ("/rerank", {"query": "", "texts": ["a"]}, 422, ["query"]),
        ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 422, ["sentences"]),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(tasks_client, path, body, status, fragments):
    response = tasks_client.post(path, json=body)
    assert response.status_code == status, response.text
    for fragment in fragments:
        assert fragment in response.json()["error"], response.json()


def test_long_input_is_cut_with_truncate(tasks_client):
    response = tasks_client.post("/embed", json={"inputs": "word " * 400, "truncate": True})
    assert response.status_code == 200 and len(response.json()) == 1


# --- real clients against a started server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks_server(task_repos, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("more-tasks-server")
    (tmp / "models.toml").write_text(_models_toml(task_repos))
    env = {
        "ALBERT_MODELS_FILE": str(tmp / "models.toml"),
        "ALBERT_STRICT_READINESS": "false",  # not-nli fails on purpose
        "ALBERT_COMPILATION_CACHE_DIR": "",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(settings_env(SMALL_GRID))
    process = ServiceProcess(env, tmp / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def test_openai_client_float_and_base64(tasks_server, task_repos):
    import openai

    client = openai.OpenAI(base_url=tasks_server.url + "/v1", api_key="unused")
    reference = _encode(task_repos["st-dense"], TEXTS)  # has a Normalize module: unit vectors
    default = client.embeddings.create(model="st-dense", input=TEXTS)  # the client asks for base64
    as_float = client.embeddings.create(model="st-dense", input=TEXTS, encoding_format="float")
    for answer in (default, as_float):
        assert answer.model == "st-dense" and [d.index for d in answer.data] == [0, 1, 2]
        np.testing.assert_allclose(np.asarray([d.embedding for d in answer.data]), reference, atol=1e-5)
        assert (
            answer.usage.prompt_tokens > len(TEXTS)
            and answer.usage.total_tokens == answer.usage.prompt_tokens
        )
    short = client.embeddings.create(model="st-dense", input=TEXTS[0], dimensions=8, encoding_format="float")
    cut = reference[0, :8] / np.linalg.norm(reference[0, :8])
    np.testing.assert_allclose(short.data[0].embedding, cut, atol=1e-5)


def test_inference_client_embedding_similarity_and_zero_shot(tasks_server, task_repos):
    import requests
    from huggingface_hub import InferenceClient, configure_http_backend
    from huggingface_hub.inference._generated.types import ZeroShotClassificationOutputElement
    from huggingface_hub.utils._http import _default_backend_factory
    from sentence_transformers import util
    from transformers import pipeline

    configure_http_backend(requests.Session)  # the suite runs with HF_HUB_OFFLINE; this only reaches loopback
    try:
        embedder = InferenceClient(model=f"{tasks_server.url}/models/st-mean", timeout=60)
        vector = embedder.feature_extraction(TEXTS[0], normalize=False)
        assert isinstance(vector, np.ndarray) and vector.dtype == np.float32
        np.testing.assert_allclose(
            vector.reshape(-1), _encode(task_repos["st-mean"], [TEXTS[0]])[0], atol=1e-5
        )
        similarities = embedder.sentence_similarity(TEXTS[0], other_sentences=TEXTS[1:])
        vectors = _encode(task_repos["st-mean"], TEXTS)
        assert isinstance(similarities, list) and all(isinstance(x, float) for x in similarities)
        np.testing.assert_allclose(similarities, util.cos_sim(vectors[:1], vectors[1:])[0].numpy(), atol=1e-5)

        classifier = InferenceClient(model=f"{tasks_server.url}/models/nli", timeout=60)
        labels = ["sport", "politics", "cooking"]
        answer = classifier.zero_shot_classification(TEXTS[1], candidate_labels=labels)
        assert all(isinstance(x, ZeroShotClassificationOutputElement) for x in answer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = pipeline("zero-shot-classification", model=str(task_repos["nli"]))(TEXTS[1], labels)
        assert_matches_pipeline(
            [{"label": x.label, "score": x.score} for x in answer],
            [
                {"label": label, "score": score}
                for label, score in zip(expected["labels"], expected["scores"], strict=True)
            ],
        )
    finally:
        configure_http_backend(_default_backend_factory)
