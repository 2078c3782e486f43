"""--auto-truncate and --max-client-batch-size, as TEI's: an over-long input is cut as sentence-transformers
cuts it unless the request (or the server) says truncate false; a batch over the client limit is a 422."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.service.tei.tei_schema import assert_tei_schema

# Over the tiny models' 160 tokens (their max_position_embeddings).
LONG = " ".join(f"The {i}th quick brown fox jumps over the lazy dog near the river bank." for i in range(30))
SHORT = "Marie Curie worked in Paris."


def _encode(directory, texts, **kwargs) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(str(directory), device="cpu").encode(texts, **kwargs)


def test_long_input_is_cut_as_sentence_transformers_by_default(tei_client, tei_repos):
    reference = _encode(tei_repos["st"], [LONG, SHORT], normalize_embeddings=True)  # it truncates
    response = tei_client.post("/embed", json={"inputs": [LONG, SHORT]})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "EmbedResponse")
    np.testing.assert_allclose(np.asarray(response.json()), reference, atol=1e-5)
    # OpenAI's route has no truncate field: the setting decides.
    openai = tei_client.post("/v1/embeddings", json={"input": [LONG, SHORT], "model": "st"})
    assert openai.status_code == 200, openai.text
    assert_tei_schema(openai.json(), "OpenAICompatResponse")
    np.testing.assert_allclose([d["embedding"] for d in openai.json()["data"]], reference, atol=1e-5)


def test_similarity_and_rerank_cut_long_inputs_by_default(tei_client, tei_repos):
    from sentence_transformers import util
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    body = {"inputs": {"source_sentence": SHORT, "sentences": [LONG, SHORT]}}
    response = tei_client.post("/similarity", json=body)
    assert response.status_code == 200, response.text
    vectors = _encode(tei_repos["st"], [SHORT, LONG, SHORT])
    np.testing.assert_allclose(response.json(), util.cos_sim(vectors[:1], vectors[1:])[0].numpy(), atol=1e-5)

    response = tei_client.post("/rerank", json={"query": SHORT, "texts": [LONG], "raw_scores": True})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "RerankResponse")
    tokenizer = AutoTokenizer.from_pretrained(str(tei_repos["one"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(tei_repos["one"])).eval()
    with torch.no_grad():
        logit = model(**tokenizer(SHORT, LONG, truncation=True, max_length=160, return_tensors="pt")).logits
    assert response.json()[0]["score"] == pytest.approx(float(logit[0, 0]), abs=1e-4)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/embed", {"inputs": LONG, "truncate": False}),
        (
            "/similarity",
            {"inputs": {"source_sentence": LONG, "sentences": ["a"]}, "parameters": {"truncate": False}},
        ),
        ("/rerank", {"query": "q", "texts": [LONG], "truncate": False}),
        ("/predict", {"inputs": LONG, "truncate": False}),
        ("/embed_all", {"inputs": LONG, "truncate": False}),
    ],
)
def test_truncate_false_is_a_413_naming_the_limit(tei_client, path, body):
    response = tei_client.post(path, json=body)
    assert response.status_code == 413, response.text
    assert "160" in response.json()["error"]
    if path in ("/predict", "/embed_all"):
        # TEI's own routes answer as TEI: a too-long input is its `Validation` error, which TEI sends as 413
        # (router/src/http/server.rs: ErrorType::Validation => PAYLOAD_TOO_LARGE).
        assert_tei_schema(response.json(), "ErrorResponse")
        assert response.json()["error_type"] == "Validation"


def test_auto_truncate_false_makes_long_inputs_413_unless_asked(tei_client, with_settings):
    with_settings(auto_truncate=False)
    assert tei_client.get("/info").json()["auto_truncate"] is False
    for path, body in [
        ("/embed", {"inputs": LONG}),
        ("/v1/embeddings", {"input": LONG, "model": "st"}),
        ("/predict", {"inputs": LONG}),
        ("/rerank", {"query": "q", "texts": [LONG]}),
    ]:
        response = tei_client.post(path, json=body)
        assert response.status_code == 413, (path, response.text)
    assert tei_client.post("/embed", json={"inputs": LONG, "truncate": True}).status_code == 200


def test_a_batch_over_max_client_batch_size_is_a_422(tei_client, with_settings):
    with_settings(max_client_batch_size=3)
    for path, body in [
        ("/embed", {"inputs": ["a"] * 4}),
        ("/rerank", {"query": "q", "texts": ["a"] * 4}),
        ("/predict", {"inputs": [["a"]] * 4}),
        ("/embed_all", {"inputs": ["a"] * 4}),
        ("/tokenize", {"inputs": ["a"] * 4}),
        ("/decode", {"ids": [[5]] * 4}),
        ("/v1/embeddings", {"input": ["a"] * 4, "model": "st"}),
    ]:
        response = tei_client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert "batch size 4 > maximum allowed batch size 3" in response.json()["error"], path
    assert tei_client.post("/embed", json={"inputs": ["a"] * 3}).status_code == 200
