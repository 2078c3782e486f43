"""RerankTask (text-embeddings-inference's /rerank) on tiny one-label ALBERT cross-encoders.

The references: sigmoid over the PyTorch model's logits for the (query, text) pairs as transformers'
tokenizer encodes them, and sentence-transformers' CrossEncoder on the same directory. As in the other
task tests, transformers' PyTorch model runs between prepare and finish (tests/service/reference.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import read_json
from pydantic import ValidationError

from model.tokenizer import load_tokenizer
from service.errors import InvalidInput, PayloadTooLarge
from service.tasks.rerank import RerankItem, RerankParams, RerankRequest, RerankTask

sys.path.insert(0, str(Path(__file__).parents[1]))
from reference import torch_outputs

ATOL = 1e-5

QUERY = "where is the old museum of paris?"
TEXTS = [
    "The museum is in Paris, near the river.",
    "an excellent and beautiful museum",
    "terrible, awful, bad!",
    "Zürich, café and crème brûlée: déjà vu.",
    "日本語のテキスト and 中文",
    "The quick brown fox jumps over the lazy dog.",
]
MAX_DIFF = {"torch": 0.0, "cross_encoder": 0.0}


def _long(n_words: int, start: int = 0) -> str:
    words = ["the", "city", "of", "paris", "has", "a", "river", "and", "an", "excellent", "old", "museum"]
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


class Setup:
    def __init__(self, directory, model):
        from transformers import AutoTokenizer

        self.directory = directory
        self.model = model
        config = read_json(directory / "config.json")
        self.tokenizer = load_tokenizer(directory)
        self.max_length = min(self.tokenizer.model_max_length, config["max_position_embeddings"])
        self.task = RerankTask(self.tokenizer, self.max_length, len(config["id2label"]))
        self.hf = AutoTokenizer.from_pretrained(directory)

    def answer(self, query: str, texts: list[str], params: RerankParams | None = None) -> list[dict]:
        prepared = self.task.prepare([RerankItem(query, tuple(texts))], params or RerankParams())
        (answer,) = self.task.finish(prepared, torch_outputs(self.model, prepared.model_inputs, "classify"))
        return answer

    def logits(self, query: str, texts: list[str], **tokenizer_kwargs) -> np.ndarray:
        """The PyTorch model's logit for each pair as transformers' tokenizer encodes it."""
        results = []
        with torch.no_grad():
            for text in texts:
                encoded = self.hf(query, text, return_tensors="pt", **tokenizer_kwargs)
                results.append(self.model(**encoded).logits[0, 0].item())
        return np.asarray(results, dtype=np.float32)


def tei_order(scores) -> list[int]:
    """TEI: a stable ascending sort by score, reversed."""
    return sorted(range(len(scores)), key=lambda i: scores[i])[::-1]


def check_scores(ours: list[dict], expected: np.ndarray, key: str = "torch") -> None:
    by_index = {rank["index"]: rank["score"] for rank in ours}
    assert sorted(by_index) == list(range(len(expected)))
    diff = max(abs(by_index[i] - float(e)) for i, e in enumerate(expected))
    MAX_DIFF[key] = max(MAX_DIFF[key], diff)
    assert diff <= ATOL, f"{by_index} != {expected}"
    assert [rank["index"] for rank in ours] == tei_order([by_index[i] for i in range(len(expected))])
    if key == "torch":
        # The reference ordering itself, where its scores are not within a hair of each other.
        ref_order = tei_order(list(expected))
        gaps = np.diff(np.sort(expected))
        if len(gaps) == 0 or gaps.min() > 1e-6:
            assert [rank["index"] for rank in ours] == ref_order


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


@pytest.fixture(scope="module", params=[0, 1, 2])
def setup(request, make_repo) -> Setup:
    return Setup(*make_repo("sequence-classification", labels=["score"], seed=request.param))


@pytest.fixture(scope="module")
def setup0(make_repo) -> Setup:
    return Setup(*make_repo("sequence-classification", labels=["score"]))


@pytest.fixture(scope="module")
def cross_encoder(setup):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(setup.directory), device="cpu")


def test_scores_are_the_sigmoid_of_the_torch_logits(setup):
    ours = setup.answer(QUERY, TEXTS)
    check_scores(ours, sigmoid(setup.logits(QUERY, TEXTS)))
    assert all(set(rank) == {"index", "score"} for rank in ours)
    assert all(isinstance(rank["score"], float) for rank in ours)


def test_scores_match_sentence_transformers_cross_encoder(setup, cross_encoder):
    assert cross_encoder.max_length == setup.max_length
    for query, texts in [(QUERY, TEXTS), ("paris", TEXTS[::-1]), ("a b c", ["d e f", "g", "paris museum"])]:
        ours = setup.answer(query, texts)
        predicted = cross_encoder.predict([(query, t) for t in texts], batch_size=4)
        check_scores(ours, predicted, key="cross_encoder")
        ranked = cross_encoder.rank(query, texts, return_documents=True)
        ours_text = setup.answer(query, texts, RerankParams(return_text=True))
        if min(np.diff(np.sort(predicted))) > 1e-5:
            assert [r["index"] for r in ours_text] == [r["corpus_id"] for r in ranked]
            assert [r["text"] for r in ours_text] == [r["text"] for r in ranked]


def test_raw_scores_are_the_logits(setup):
    ours = setup.answer(QUERY, TEXTS, RerankParams(raw_scores=True))
    logits = setup.logits(QUERY, TEXTS)
    check_scores(ours, logits)
    # The same ranking as with sigmoid scores (sigmoid is monotonic).
    assert [r["index"] for r in ours] == [r["index"] for r in setup.answer(QUERY, TEXTS)]


def test_return_text(setup0):
    ours = setup0.answer(QUERY, TEXTS, RerankParams(return_text=True))
    assert all(set(rank) == {"index", "score", "text"} for rank in ours)
    assert all(rank["text"] == TEXTS[rank["index"]] for rank in ours)
    assert [{k: r[k] for k in ("index", "score")} for r in ours] == setup0.answer(QUERY, TEXTS)


def test_model_inputs_are_transformers_pairs(setup0):
    prepared = setup0.task.prepare([RerankItem(QUERY, tuple(TEXTS))], RerankParams())
    for model_input, text in zip(prepared.model_inputs, TEXTS, strict=True):
        encoded = setup0.hf(QUERY, text)
        assert model_input.input_ids.tolist() == encoded["input_ids"]
        assert model_input.token_type_ids.tolist() == encoded["token_type_ids"]


def test_several_items_are_answered_in_order(setup0):
    items = [RerankItem(QUERY, tuple(TEXTS)), RerankItem("paris", tuple(TEXTS[:2]))]
    prepared = setup0.task.prepare(items, RerankParams())
    answers = setup0.task.finish(prepared, torch_outputs(setup0.model, prepared.model_inputs, "classify"))
    assert answers == [setup0.answer(QUERY, TEXTS), setup0.answer("paris", TEXTS[:2])]


def test_equal_scores_come_out_as_tei_orders_them(setup0):
    # TEI sorts ascending (stable) and reverses: among equal scores the later index comes first.
    texts = ["a", "b", "c", "d", "e"]
    prepared = setup0.task.prepare([RerankItem("q", tuple(texts))], RerankParams(raw_scores=True))
    logits = [0.5, 2.0, 0.5, -1.0, 2.0]
    (answer,) = setup0.task.finish(prepared, [{"logits": np.asarray([x], np.float32)} for x in logits])
    assert [r["index"] for r in answer] == [4, 1, 2, 0, 3]
    assert [r["score"] for r in answer] == [2.0, 2.0, 0.5, 0.5, -1.0]
    (answer,) = setup0.task.finish(
        setup0.task.prepare([RerankItem("q", tuple(texts))], RerankParams()),
        [{"logits": np.asarray([x], np.float32)} for x in logits],
    )
    expected = np.float32(1) / (np.float32(1) + np.exp(-np.asarray(logits, np.float32)))
    assert [r["score"] for r in answer] == [float(expected[i]) for i in [4, 1, 2, 0, 3]]


# Length: 413 without truncate, truncation with it.


def _text_of_length(setup: Setup, query: str, length: int) -> str:
    """A text whose pair with `query` is exactly `length` tokens."""
    for n in range(1, 400):
        text = _long(n, 1)
        got = len(setup.tokenizer.encode(query, text)[0].ids)
        if got == length:
            return text
        if got > length:
            break
    for n in range(1, 400):  # word steps can jump over the length: trim characters instead
        text = _long(n, 1)
        while text:
            got = len(setup.tokenizer.encode(query, text)[0].ids)
            if got == length:
                return text
            if got < length:
                break
            text = text[:-1]
    raise AssertionError(f"no text of length {length}")


def test_a_pair_at_the_limit_is_served_one_past_it_is_413(setup0):
    at_limit = _text_of_length(setup0, QUERY, setup0.max_length)
    over = _text_of_length(setup0, QUERY, setup0.max_length + 1)
    ours = setup0.answer(QUERY, [TEXTS[0], at_limit])
    check_scores(ours, sigmoid(setup0.logits(QUERY, [TEXTS[0], at_limit])))
    with pytest.raises(PayloadTooLarge) as info:
        setup0.task.prepare([RerankItem(QUERY, (TEXTS[0], over))], RerankParams())
    message = info.value.message
    assert f"are {setup0.max_length + 1} tokens" in message
    assert f"the limit is {setup0.max_length}" in message
    assert "texts[1]" in message


LONG_PAIRS = [
    (QUERY, _long(300)),  # only the text is long
    (_long(250, 3), "a short text"),  # only the query is long
    (_long(120, 2), _long(200, 7)),  # both long: the longer loses first
]


@pytest.mark.parametrize("query, text", LONG_PAIRS)
def test_long_pairs_are_413_without_truncate(setup0, query, text):
    length = len(setup0.hf(query, text)["input_ids"])
    assert length > setup0.max_length
    with pytest.raises(PayloadTooLarge, match=rf"are {length} tokens .* limit is {setup0.max_length}"):
        setup0.task.prepare([RerankItem(query, (text,))], RerankParams())
    with pytest.raises(PayloadTooLarge):
        setup0.task.prepare([RerankItem(query, (text,))], RerankParams(truncate=False, raw_scores=True))


@pytest.mark.parametrize("query, text", LONG_PAIRS)
def test_truncate_right_is_longest_first_as_tei_and_cross_encoder(setup, cross_encoder, query, text):
    params = RerankParams(truncate=True)
    prepared = setup.task.prepare([RerankItem(query, (text, TEXTS[0]))], params)
    encoded = setup.hf(query, text, truncation="longest_first", max_length=setup.max_length)
    assert prepared.model_inputs[0].input_ids.tolist() == encoded["input_ids"]
    assert prepared.model_inputs[0].token_type_ids.tolist() == encoded["token_type_ids"]
    assert len(prepared.model_inputs[0]) == setup.max_length
    ours = setup.answer(query, [text, TEXTS[0]], params)
    kwargs = {"truncation": "longest_first", "max_length": setup.max_length}
    check_scores(ours, sigmoid(setup.logits(query, [text, TEXTS[0]], **kwargs)))
    # CrossEncoder truncates the same way (tokenizer(..., truncation=True, max_length=max_length)).
    check_scores(ours, cross_encoder.predict([(query, text), (query, TEXTS[0])]), key="cross_encoder")


@pytest.mark.parametrize("direction", ["left", "Left"])
@pytest.mark.parametrize("query, text", LONG_PAIRS)
def test_truncate_left_cuts_from_the_start(setup0, direction, query, text):
    from transformers import AutoTokenizer

    left = AutoTokenizer.from_pretrained(setup0.directory, truncation_side="left")
    params = RerankParams(truncate=True, truncation_direction=direction)
    prepared = setup0.task.prepare([RerankItem(query, (text,))], params)
    encoded = left(query, text, truncation="longest_first", max_length=setup0.max_length)
    assert prepared.model_inputs[0].input_ids.tolist() == encoded["input_ids"]
    assert prepared.model_inputs[0].token_type_ids.tolist() == encoded["token_type_ids"]
    right = setup0.task.prepare([RerankItem(query, (text,))], RerankParams(truncate=True))
    assert prepared.model_inputs[0].input_ids.tolist() != right.model_inputs[0].input_ids.tolist()
    with torch.no_grad():
        logit = setup0.model(**left(query, text, truncation="longest_first", return_tensors="pt")).logits
    (rank,) = setup0.answer(query, [text], params)
    assert abs(rank["score"] - sigmoid(logit[0].numpy())[0]) <= ATOL


def test_truncate_leaves_short_pairs_alone(setup0):
    for direction in ("right", "left"):
        params = RerankParams(truncate=True, truncation_direction=direction)
        assert setup0.answer(QUERY, TEXTS, params) == setup0.answer(QUERY, TEXTS)


# Models and invalid inputs.


@pytest.mark.parametrize("num_labels", [0, 2, 3])
def test_a_model_without_exactly_one_label_is_refused(setup0, num_labels):
    with pytest.raises(ValueError, match=rf"exactly one label; this model has {num_labels} labels"):
        RerankTask(setup0.tokenizer, setup0.max_length, num_labels)


@pytest.mark.parametrize("query", ["", "  ", "\n"])
def test_empty_query_is_invalid(setup0, query):
    with pytest.raises(InvalidInput, match="query must not be empty"):
        setup0.task.prepare([RerankItem(query, ("a text",))], RerankParams())


def test_empty_texts_are_invalid(setup0):
    with pytest.raises(InvalidInput, match="texts must not be empty"):
        setup0.task.prepare([RerankItem(QUERY, ())], RerankParams())
    with pytest.raises(InvalidInput, match=r"texts\[2\] must not be empty"):
        setup0.task.prepare([RerankItem(QUERY, ("a", "b", " "))], RerankParams())


def test_too_many_texts_is_413(setup0):
    task = RerankTask(setup0.tokenizer, setup0.max_length, 1, max_texts=3)
    task.prepare([RerankItem(QUERY, ("a", "b", "c"))], RerankParams())
    with pytest.raises(PayloadTooLarge, match="texts has 4 items; the limit is 3"):
        task.prepare([RerankItem(QUERY, ("a", "b", "c", "d"))], RerankParams())


def test_unknown_truncation_direction_is_invalid(setup0):
    with pytest.raises(InvalidInput, match="left or right, got 'up'"):
        setup0.task.prepare([RerankItem(QUERY, ("a",))], RerankParams(truncation_direction="up"))


# Request schema.


def test_request_schema_defaults_and_forms():
    request = RerankRequest.model_validate({"query": "q", "texts": ["a", "b"]})
    # truncate absent: None, so the server's --auto-truncate decides (TEI's `unwrap_or(auto_truncate)`).
    assert (request.raw_scores, request.return_text, request.truncate) == (False, False, None)
    assert request.truncation_direction == "right"
    assert request.model is None
    request = RerankRequest.model_validate(
        {
            "query": "q",
            "texts": ["a"],
            "raw_scores": True,
            "return_text": True,
            "truncate": None,  # TEI's schema has it nullable: the default
            "truncation_direction": "Left",  # TEI's OpenAPI spelling
            "model": "ce",
        }
    )
    assert request.truncate is None and request.truncation_direction == "Left"
    for example in RerankRequest.model_config["json_schema_extra"]["examples"]:
        RerankRequest.model_validate(example)


@pytest.mark.parametrize(
    "body",
    [
        {"texts": ["a"]},
        {"query": "q"},
        {"query": "q", "texts": "a"},
        {"query": "q", "texts": ["a"], "top_n": 3},  # unknown field
        {"query": "q", "texts": ["a"], "raw_scores": "true"},
        {"query": "q", "texts": ["a"], "truncation_direction": "middle"},
        {"query": "q", "texts": [1]},
    ],
)
def test_request_schema_refuses(body):
    with pytest.raises(ValidationError):
        RerankRequest.model_validate(body)


def test_zz_report_parity():
    print(
        f"\nrerank: largest score difference: {MAX_DIFF['torch']:.3g} from the PyTorch logits (sigmoid or raw), "
        f"{MAX_DIFF['cross_encoder']:.3g} from CrossEncoder.predict"
    )
