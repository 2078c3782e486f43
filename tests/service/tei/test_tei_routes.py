"""TEI's routes (/predict, /embed_all, /tokenize, /decode, /info, POST /): answers valid against TEI's own
OpenAPI schemas, values against the 4.57 text-classification pipeline, PyTorch, sentence-transformers'
token embeddings and the tokenizer; bad input in TEI's {error, error_type} body."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests.service.tei.tei_schema import LABELS, assert_tei_schema

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Marie Curie worked in Paris.", "terrible, awful!"]
PAIR = ["A man is playing a guitar.", "Someone makes music."]


def _logits(directory, text, pair=None) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(**tokenizer(text, pair, return_tensors="pt")).logits[0].numpy()


def _as_dict(predictions) -> dict[str, float]:
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True), "labels are not best first"
    return {p["label"]: p["score"] for p in predictions}


# --- /predict ---------------------------------------------------------------------------------------------------


def test_predict_single_pair_and_batch_equal_the_pipeline(tei_client, tei_repos):
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = pipeline("text-classification", model=str(tei_repos["nli"]), top_k=None)
    single = tei_client.post("/predict", json={"inputs": TEXTS[0]})
    pair = tei_client.post("/predict", json={"inputs": PAIR})
    batch = tei_client.post("/predict", json={"inputs": [[TEXTS[1]], PAIR, [TEXTS[2]]]})
    for response in (single, pair, batch):
        assert response.status_code == 200, response.text
        assert_tei_schema(response.json(), "PredictResponse")
    expected = {
        "single": classifier(TEXTS[0]),
        "pair": classifier({"text": PAIR[0], "text_pair": PAIR[1]}),
        "b1": classifier(TEXTS[1]),
        "b3": classifier(TEXTS[2]),
    }
    got = {
        "single": single.json(),
        "pair": pair.json(),
        "b1": batch.json()[0],
        "b3": batch.json()[2],
    }
    for key, answer in got.items():
        assert len(answer) == len(LABELS)
        ranked = expected[key][0] if isinstance(expected[key][0], list) else expected[key]
        reference = {p["label"]: p["score"] for p in ranked}
        for label, score in _as_dict(answer).items():
            assert score == pytest.approx(reference[label], abs=1e-5), key
    assert _as_dict(batch.json()[1]) == pytest.approx(_as_dict(pair.json()), abs=1e-6)


def test_predict_raw_scores_and_one_label_sigmoid(tei_client, tei_repos):
    raw = tei_client.post("/predict", json={"inputs": PAIR, "raw_scores": True}).json()
    logits = _logits(tei_repos["nli"], *PAIR)
    for label, score in _as_dict(raw).items():
        assert score == pytest.approx(float(logits[LABELS.index(label)]), abs=1e-4)
    one = tei_client.post("/predict", json={"inputs": TEXTS[0], "model": "one"})
    assert one.status_code == 200, one.text
    logit = float(_logits(tei_repos["one"], TEXTS[0])[0])
    assert one.json() == [{"label": "score", "score": pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)}]


# --- /embed_all -------------------------------------------------------------------------------------------------


def test_embed_all_equals_sentence_transformers_token_embeddings(tei_client, tei_repos):
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(str(tei_repos["st"]), device="cpu")
        reference = model.encode(TEXTS, output_value="token_embeddings")
        prompted = model.encode(TEXTS[:1], output_value="token_embeddings", prompt_name="query")
    response = tei_client.post("/embed_all", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "EmbedAllResponse")
    for ours, theirs in zip(response.json(), reference, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
    one = tei_client.post("/embed_all", json={"inputs": TEXTS[0], "prompt_name": "query"}).json()
    np.testing.assert_allclose(np.asarray(one[0]), prompted[0].numpy(), atol=1e-5)


# --- /tokenize and /decode --------------------------------------------------------------------------------------


def test_tokenize_is_the_tokenizer_with_the_callers_substrings(tei_client, tei_repos):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tei_repos["st"]))
    text = "Héllo wörld, Marie Curie!"
    sources = [text, TEXTS[0], "héllo wörld ✓"]  # 1, 2 and 3 bytes a character
    response = tei_client.post("/tokenize", json={"inputs": sources})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "TokenizeResponse")
    last = [t for t in response.json()[2] if not t["special"]][-1]
    assert last["stop"] == len(sources[2].encode()) != len(sources[2])
    for tokens, source in zip(response.json(), sources, strict=True):
        encoded = tokenizer(source, return_special_tokens_mask=True, return_offsets_mapping=True)
        assert [t["id"] for t in tokens] == encoded["input_ids"]
        # TEI's offsets count UTF-8 bytes (its Rust tokenizer's); transformers' count characters.
        offsets = [
            (len(source[:start].encode()), len(source[:stop].encode()))
            for (start, stop), special in zip(
                encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True
            )
            if not special
        ]
        assert [(t["start"], t["stop"]) for t in tokens if not t["special"]] == offsets
        assert [t["special"] for t in tokens] == [bool(x) for x in encoded["special_tokens_mask"]]
        for token in tokens:
            if token["special"]:
                assert token["start"] is None and token["stop"] is None
                assert token["text"] == tokenizer.convert_ids_to_tokens(token["id"])
            else:
                assert token["text"] == source.encode()[token["start"] : token["stop"]].decode()
    bare = tei_client.post("/tokenize", json={"inputs": text, "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == tokenizer(text, add_special_tokens=False)["input_ids"]
    prompted = tei_client.post("/tokenize", json={"inputs": text, "prompt_name": "query"}).json()
    assert [t["id"] for t in prompted[0]] == tokenizer("query: " + text)["input_ids"]


def test_decode_one_and_many_lists_as_the_tokenizer(tei_client, tei_repos):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tei_repos["st"]))
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    one = tei_client.post("/decode", json={"ids": ids[0]})
    many = tei_client.post("/decode", json={"ids": ids, "skip_special_tokens": False})
    for response in (one, many):
        assert response.status_code == 200, response.text
        assert_tei_schema(response.json(), "DecodeResponse")
    assert one.json() == [tokenizer.decode(ids[0], skip_special_tokens=True)]
    assert many.json() == [tokenizer.decode(x, skip_special_tokens=False) for x in ids]


# --- /info and POST / -------------------------------------------------------------------------------------------


def test_info_has_teis_fields_beside_the_services(tei_client, tei_runtime):
    info = tei_client.get("/info").json()
    assert_tei_schema(info, "Info")
    assert info["served_model_name"] == "st" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 160 and info["auto_truncate"] is True
    assert info["max_client_batch_size"] == tei_runtime.settings.max_client_batch_size
    assert "models" in info and "endpoints" in info  # the service's own fields stay


def test_root_post_answers_as_embed_for_the_default_model(tei_client):
    root = tei_client.post("/", json={"inputs": TEXTS[0]})
    assert root.status_code == 200, root.text
    embed = tei_client.post("/embed", json={"inputs": TEXTS[0]}).json()
    np.testing.assert_allclose(root.json(), embed, atol=1e-6)


# --- bad input: 4xx in TEI's body -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, kind, fragments",
    [
        ("/predict", {"inputs": []}, 400, "Empty", ["inputs", "empty"]),
        ("/predict", {"inputs": ["a", "b", "c"]}, 422, "Validation", ["3 strings"]),
        ("/predict", {"inputs": [["a", "b", "c"]]}, 422, "Validation", ["inputs[0]", "3 strings"]),
        ("/predict", {"inputs": 5}, 422, "Validation", ["inputs"]),
        ("/predict", {"inputs": "a", "model": "st"}, 422, "Validation", ["st", "embed"]),
        ("/embed_all", {"inputs": []}, 400, "Empty", ["inputs"]),
        ("/embed_all", {"inputs": "a", "prompt_name": "nope"}, 422, "Validation", ["nope", "query"]),
        ("/tokenize", {"inputs": []}, 400, "Empty", ["inputs"]),
        ("/tokenize", {"inputs": "a", "prompt_name": "nope"}, 422, "Validation", ["nope", "query"]),
        ("/decode", {"ids": []}, 400, "Empty", ["ids"]),
        ("/decode", {"ids": [2, 99999]}, 422, "Validation", ["99999", "vocabulary"]),
        ("/decode", {"ids": [[2], [-1]]}, 422, "Validation", ["ids[1]", "-1"]),
        ("/decode", {"ids": "abc"}, 422, "Validation", ["ids"]),
        ("/predict", {"inputs": "a", "model": "nope"}, 404, "model_not_found", ["nope"]),  # TEI has no 404
    ],
)
def test_bad_input_is_a_4xx_in_teis_body(tei_client, path, body, status, kind, fragments):
    response = tei_client.post(path, json=body)
    assert response.status_code == status, response.text
    if status != 404:
        assert_tei_schema(response.json(), "ErrorResponse")
    assert response.json()["error_type"] == kind
    for fragment in fragments:
        assert fragment in response.json()["error"], response.json()


def test_embed_dimensions_keeps_the_first_values_then_normalizes(tei_client, tei_repos):
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SentenceTransformer(str(tei_repos["st"]), device="cpu", truncate_dim=8)
        reference = model.encode(TEXTS, normalize_embeddings=True)  # truncate_dim, then normalize
    response = tei_client.post("/embed", json={"inputs": TEXTS, "dimensions": 8})
    assert response.status_code == 200, response.text
    assert_tei_schema(response.json(), "EmbedResponse")
    np.testing.assert_allclose(np.asarray(response.json()), reference, atol=1e-5)
    too_many = tei_client.post("/embed", json={"inputs": "a", "dimensions": 5000})
    assert too_many.status_code == 422 and "5000" in too_many.json()["error"]
