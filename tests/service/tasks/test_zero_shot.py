"""ZeroShotTask against transformers' zero-shot-classification pipeline on tiny NLI classifiers.

The model between prepare and finish is transformers' PyTorch model (tests/service/reference.py), as in
the other task tests, so these check the pre- and post-processing alone: labels must be equal and scores
within 1e-5 (they come out bit-identical, as the same float32 logits go through the same numpy).
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
from service.tasks.zero_shot import (
    ZeroShotParams,
    ZeroShotRequest,
    ZeroShotTask,
    find_entailment_id,
    parse_candidate_labels,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from reference import torch_outputs

ATOL = 1e-5

# id2label of each tiny NLI model: the usual MNLI order, entailment first (so contradiction is the last
# id, the pipeline's -1), capitalised names, and 2-label RTE-style models.
REPOS = {
    "mnli": ["contradiction", "neutral", "entailment"],
    "entail-first": ["entailment", "neutral", "contradiction"],
    "upper": ["CONTRADICTION", "ENTAILMENT", "NEUTRAL"],
    "capitalised": ["Neutral", "Entailment", "Contradiction"],  # contradiction id stays 0 ("Neutral")
    "2-labels": ["not_entailment", "entailment"],
    "2-labels-entail-first": ["entailment", "not_entailment"],
}
SEEDS = {"upper": 1, "capitalised": 2, "2-labels": 3, "2-labels-entail-first": 4}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "an excellent and beautiful museum in paris",
    "terrible, awful, bad!",
    "Zürich, café and crème brûlée: déjà vu.",
    "日本語のテキスト and 中文",
]
LABEL_SETS = [
    ["sports", "politics", "economy", "art"],
    ["positive", "negative"],
    ["travel", "food", "the weather today", "music", "science", "history"],
]
TEMPLATES = ["This example is {}.", "The topic of this text is {}", "{}", "Is it about {0}? Yes, {0}."]


class Setup:
    def __init__(self, directory, model):
        from transformers import pipeline

        self.model = model
        config = read_json(directory / "config.json")
        self.config = config
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.tokenizer = load_tokenizer(directory)
        self.max_length = min(self.tokenizer.model_max_length, config["max_position_embeddings"])
        self.task = ZeroShotTask(self.tokenizer, self.max_length, self.labels)
        self.pipe = pipeline("zero-shot-classification", model=str(directory))

    def answer(self, items: list[str], params: ZeroShotParams) -> list[dict]:
        prepared = self.task.prepare(items, params)
        return self.task.finish(prepared, torch_outputs(self.model, prepared.model_inputs, "classify"))

    def reference(self, sequence, params: ZeroShotParams):
        labels = params.candidate_labels
        return self.pipe(
            sequence,
            candidate_labels=list(labels) if isinstance(labels, tuple) else labels,
            hypothesis_template=params.hypothesis_template,
            multi_label=params.multi_label,
        )


MAX_DIFF = {"value": 0.0}


def assert_same(ours: dict, ref: dict) -> None:
    assert ours["sequence"] == ref["sequence"]
    assert ours["labels"] == ref["labels"], f"{ours['labels']} != reference {ref['labels']}"
    assert len(ours["scores"]) == len(ref["scores"])
    diff = max(abs(a - b) for a, b in zip(ours["scores"], ref["scores"], strict=True))
    MAX_DIFF["value"] = max(MAX_DIFF["value"], diff)
    assert diff <= ATOL, f"scores {ours['scores']} != reference {ref['scores']}"
    assert all(isinstance(s, float) for s in ours["scores"])


@pytest.fixture(scope="module", params=list(REPOS))
def setup(request, make_repo) -> Setup:
    return Setup(
        *make_repo("sequence-classification", labels=REPOS[request.param], seed=SEEDS.get(request.param, 0))
    )


@pytest.fixture(scope="module")
def mnli(make_repo) -> Setup:
    return Setup(*make_repo("sequence-classification", labels=REPOS["mnli"]))


def test_entailment_and_contradiction_ids_follow_the_pipeline(setup):
    assert setup.task.entailment_id == setup.pipe.entailment_id
    # The pipeline's postprocess: contradiction is 0 unless entailment is 0, then -1.
    assert setup.task.contradiction_id == (-1 if setup.pipe.entailment_id == 0 else 0)


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("template", TEMPLATES)
def test_matches_pipeline(setup, multi_label, template):
    for labels in LABEL_SETS:
        params = ZeroShotParams(
            candidate_labels=labels, hypothesis_template=template, multi_label=multi_label
        )
        ours = setup.answer(TEXTS, params)
        assert len(ours) == len(TEXTS)
        for text, answer in zip(TEXTS, ours, strict=True):
            assert_same(answer, setup.reference(text, params))
            assert sorted(answer["labels"]) == sorted(labels)
            assert answer["scores"] == sorted(answer["scores"], reverse=True)


def test_single_label_scores_sum_to_one_and_multi_label_do_not_have_to(mnli):
    labels = LABEL_SETS[2]
    (single,) = mnli.answer([TEXTS[0]], ZeroShotParams(labels))
    (multi,) = mnli.answer([TEXTS[0]], ZeroShotParams(labels, multi_label=True))
    assert abs(sum(single["scores"]) - 1) < 1e-5
    assert all(0 <= s <= 1 for s in multi["scores"])
    assert abs(sum(multi["scores"]) - 1) > 1e-3


@pytest.mark.parametrize("multi_label", [False, True])
def test_one_candidate_is_scored_as_multi_label(setup, multi_label):
    # The pipeline takes the entailment-vs-contradiction path for a single candidate label either way.
    params = ZeroShotParams(candidate_labels=["sports"], multi_label=multi_label)
    (answer,) = setup.answer([TEXTS[1]], params)
    assert_same(answer, setup.reference(TEXTS[1], params))
    (multi,) = setup.answer([TEXTS[1]], ZeroShotParams(["sports"], multi_label=True))
    assert answer == multi
    assert answer["scores"][0] != 1.0


@pytest.mark.parametrize(
    "labels",
    [
        "sports, politics ,economy",
        " sports,,politics, ,  ",  # empty pieces dropped
        "sports",
        "a single label with spaces",
    ],
)
def test_comma_separated_labels_are_split_as_the_pipeline(mnli, labels):
    params = ZeroShotParams(candidate_labels=labels)
    (answer,) = mnli.answer([TEXTS[0]], params)
    assert_same(answer, mnli.reference(TEXTS[0], params))
    assert sorted(answer["labels"]) == sorted(parse_candidate_labels(labels))


def test_list_labels_are_kept_as_given(mnli):
    # Unlike a string, a list is neither stripped nor split, and duplicates stay (as the pipeline).
    labels = [" sports ", "a, b", "art", "art"]
    params = ZeroShotParams(candidate_labels=labels)
    (answer,) = mnli.answer([TEXTS[2]], params)
    assert_same(answer, mnli.reference(TEXTS[2], params))
    assert sorted(answer["labels"]) == sorted(labels)


def test_list_input_matches_pipeline_list(mnli):
    params = ZeroShotParams(candidate_labels=LABEL_SETS[0], multi_label=True)
    ours = mnli.answer(TEXTS, params)
    refs = mnli.pipe(TEXTS, candidate_labels=LABEL_SETS[0], multi_label=True)
    for answer, ref in zip(ours, refs, strict=True):
        assert_same(answer, ref)


def test_model_inputs_are_the_pipelines_pairs(mnli):
    params = ZeroShotParams(candidate_labels=["sports", "art"], hypothesis_template="It is {}!")
    prepared = mnli.task.prepare(TEXTS[:2], params)
    assert len(prepared.model_inputs) == 4  # one per (sequence, label), sequence-major
    pairs = [(t, f"It is {label}!") for t in TEXTS[:2] for label in ["sports", "art"]]
    for model_input, pair in zip(prepared.model_inputs, pairs, strict=True):
        encoded = mnli.pipe.tokenizer([list(pair)], truncation="only_first")
        assert model_input.input_ids.tolist() == encoded["input_ids"][0]
        assert model_input.token_type_ids.tolist() == encoded["token_type_ids"][0]
        assert model_input.mask_positions is None


def _long(n_words: int, start: int = 0) -> str:
    words = ["the", "city", "of", "paris", "has", "a", "river", "and", "an", "excellent", "old", "museum"]
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


@pytest.mark.parametrize("multi_label", [False, True])
def test_long_sequences_are_truncated_only_first_as_the_pipeline(setup, multi_label):
    texts = [_long(400), _long(170, 3), _long(150, 5)]
    labels = ["sports", "the history of old european cities and their rivers"]
    for text in texts:
        assert len(setup.tokenizer.encode(text, "This example is sports.")[0].ids) > setup.max_length
    params = ZeroShotParams(candidate_labels=labels, multi_label=multi_label)
    prepared = setup.task.prepare(texts, params)
    assert all(len(mi) == setup.max_length for mi in prepared.model_inputs)
    for model_input, label in zip(prepared.model_inputs, labels * len(texts), strict=True):
        hypothesis = setup.tokenizer.encode(f"This example is {label}.", add_special_tokens=False)[0].ids
        # The hypothesis is whole: [.. sequence cut ..] [SEP] hypothesis [SEP]
        assert model_input.input_ids[-len(hypothesis) - 1 : -1].tolist() == hypothesis
    for text, answer in zip(texts, setup.answer(texts, params), strict=True):
        assert_same(answer, setup.reference(text, params))


def test_only_first_is_what_keeps_a_long_hypothesis_whole(mnli):
    # Where only_first matters: both segments long. longest_first would cut the hypothesis too (and change
    # the answer); only_first, which the pipeline asks for and the task uses, cuts the sequence alone.
    template = "In this long hypothesis, " + _long(60, 2) + ", the topic is {}."
    sequence = _long(200, 1)
    params = ZeroShotParams(candidate_labels=["sports", "art", "rivers"], hypothesis_template=template)
    prepared = mnli.task.prepare([sequence], params)
    hf = mnli.pipe.tokenizer
    for model_input, label in zip(prepared.model_inputs, ["sports", "art", "rivers"], strict=True):
        pair = [[sequence, template.format(label)]]
        only_first = hf(pair, truncation="only_first")["input_ids"][0]
        longest_first = hf(pair, truncation="longest_first")["input_ids"][0]
        assert model_input.input_ids.tolist() == only_first
        assert only_first != longest_first
        assert len(only_first) == len(longest_first) == mnli.max_length
    (answer,) = mnli.answer([sequence], params)
    assert_same(answer, mnli.reference(sequence, params))


def test_a_hypothesis_that_cannot_fit_is_413(mnli):
    template = _long(200) + " {}"
    params = ZeroShotParams(candidate_labels=["sports"], hypothesis_template=template)
    with pytest.raises(PayloadTooLarge, match=rf"limit is {mnli.max_length} tokens") as info:
        mnli.task.prepare(["a short text"], params)
    assert "'sports'" in info.value.message
    # The pipeline retries without truncation and the model then fails on the over-long input.
    with pytest.raises(Exception):  # noqa: B017
        mnli.reference("a short text", params)


def test_the_pipelines_float32_formula_bit_for_bit_ties_included(mnli):
    """Crafted logits through the pipeline's own postprocess: ties, equal rows, negative values."""
    rng = np.random.default_rng(0)
    cases = [
        rng.normal(size=(5, 3)).astype(np.float32),
        np.ones((4, 3), dtype=np.float32),  # every label tied
        np.array([[0, 0, 1], [0, 0, 1], [0, 0, 2], [0, 0, 1]], dtype=np.float32),  # some tied
        (20 * rng.normal(size=(6, 3))).astype(np.float32),
    ]
    for logits in cases:
        labels = [f"label {i}" for i in range(len(logits))]
        for multi_label in (False, True):
            params = ZeroShotParams(candidate_labels=labels, multi_label=multi_label)
            prepared = mnli.task.prepare(["a text"], params)
            (ours,) = mnli.task.finish(prepared, [{"logits": row} for row in logits])
            ref = mnli.pipe.postprocess(
                [
                    {"candidate_label": label, "sequence": "a text", "logits": torch.from_numpy(row[None])}
                    for label, row in zip(labels, logits, strict=True)
                ],
                multi_label=multi_label,
            )
            assert ours == ref


def test_logits_that_overflow_the_pipelines_exp_still_give_scores(mnli):
    logits = np.array([[0, 0, 95], [0, 0, 90], [0, 0, 1]], dtype=np.float32)
    labels = ["a", "b", "c"]
    prepared = mnli.task.prepare(["a text"], ZeroShotParams(candidate_labels=labels))
    (ours,) = mnli.task.finish(prepared, [{"logits": row} for row in logits])
    with np.errstate(all="ignore"):
        ref = mnli.pipe.postprocess(
            [
                {"candidate_label": label, "sequence": "a text", "logits": torch.from_numpy(row[None])}
                for label, row in zip(labels, logits, strict=True)
            ]
        )
    assert any(np.isnan(ref["scores"]))  # what the pipeline answers
    assert ours["labels"] == ["a", "b", "c"]
    expected = np.exp(logits[:, 2] - 95) / np.exp(logits[:, 2] - 95).sum()
    np.testing.assert_allclose(ours["scores"], expected, rtol=1e-6)


# Models.


@pytest.mark.parametrize("labels", [["LABEL_0", "LABEL_1", "LABEL_2"], ["negative", "positive"], ["score"]])
def test_a_model_without_an_entailment_label_is_refused_at_construction(make_repo, labels):
    directory, _ = make_repo("sequence-classification", labels=labels)
    tokenizer = load_tokenizer(directory)
    with pytest.raises(ValueError, match="entailment label") as info:
        ZeroShotTask(tokenizer, 160, labels)
    assert str(labels) in str(info.value)
    # The pipeline accepts it with a warning and uses id -1, the last label.
    from transformers import pipeline

    assert pipeline("zero-shot-classification", model=str(directory)).entailment_id == -1


def test_entailment_id_search():
    assert find_entailment_id(["contradiction", "neutral", "entailment"]) == 2
    assert find_entailment_id(["Entailed", "entailment"]) == 0  # the first match
    assert find_entailment_id(["not_entailment", "ENTAILMENT"]) == 1
    assert find_entailment_id(["neutral", "contradiction"]) == -1
    assert find_entailment_id(["a", "b"], {"b": 1, "entail": 0}) == 0


def test_label2id_from_the_config_is_searched_as_the_pipeline_does(make_repo):
    # A config whose label2id disagrees with id2label: the pipeline reads label2id.
    labels = ["contradiction", "neutral", "entailment"]
    label2id = {"contradiction": 0, "entailment": 1, "neutral": 2}
    setup = Setup(*make_repo("sequence-classification", labels=labels, label2id=label2id, seed=5))
    assert setup.pipe.entailment_id == 1
    assert setup.task.entailment_id == 2  # id2label alone
    task = ZeroShotTask(setup.tokenizer, setup.max_length, labels, label2id=setup.config["label2id"])
    assert task.entailment_id == 1
    setup.task = task
    for multi_label in (False, True):
        params = ZeroShotParams(candidate_labels=LABEL_SETS[0], multi_label=multi_label)
        for text, answer in zip(TEXTS, setup.answer(TEXTS, params), strict=True):
            assert_same(answer, setup.reference(text, params))


# Invalid inputs.


@pytest.mark.parametrize("labels", [[], (), "", " , ,", ","])
def test_no_candidate_labels_is_invalid(mnli, labels):
    with pytest.raises(InvalidInput, match="at least one label"):
        mnli.task.prepare(["a text"], ZeroShotParams(candidate_labels=labels))
    with pytest.raises(ValueError, match="at least one label"):
        mnli.pipe("a text", candidate_labels=labels)


@pytest.mark.parametrize("template", ["This example is about sports.", ""])
def test_a_template_without_a_placeholder_is_invalid(mnli, template):
    with pytest.raises(InvalidInput, match="hypothesis_template"):
        mnli.task.prepare(["a text"], ZeroShotParams(["sports"], hypothesis_template=template))
    with pytest.raises(ValueError, match="not able to be formatted"):
        mnli.pipe("a text", candidate_labels=["sports"], hypothesis_template=template)


@pytest.mark.parametrize("template", ["This is {label}.", "{0} and {1}", "an open { brace", "{:d}"])
def test_a_malformed_template_is_invalid(mnli, template):
    with pytest.raises(InvalidInput, match="hypothesis_template"):
        mnli.task.prepare(["a text"], ZeroShotParams(["sports"], hypothesis_template=template))


def test_too_many_candidate_labels_is_413(mnli):
    task = ZeroShotTask(mnli.tokenizer, mnli.max_length, mnli.labels, max_candidate_labels=5)
    task.prepare(["a text"], ZeroShotParams([str(i) for i in range(5)]))
    with pytest.raises(PayloadTooLarge, match="has 6 labels; the limit is 5"):
        task.prepare(["a text"], ZeroShotParams([str(i) for i in range(6)]))
    with pytest.raises(PayloadTooLarge, match="has 6 labels; the limit is 5"):
        task.prepare(["a text"], ZeroShotParams(",".join(str(i) for i in range(6))))


@pytest.mark.parametrize("text", ["", " ", "\n\t"])
def test_empty_text_is_invalid(mnli, text):
    with pytest.raises(InvalidInput, match="text is empty"):
        mnli.task.prepare([text], ZeroShotParams(["sports"]))
    with pytest.raises(InvalidInput, match="input 1: text is empty"):
        mnli.task.prepare(["a text", text], ZeroShotParams(["sports"]))


# Request schema.


def test_request_schema_defaults_and_forms():
    request = ZeroShotRequest.model_validate({"inputs": "a text", "parameters": {"candidate_labels": "a, b"}})
    assert request.parameters.candidate_labels == "a, b"
    assert request.parameters.hypothesis_template == "This example is {}."
    assert request.parameters.multi_label is False
    assert request.model is None
    request = ZeroShotRequest.model_validate(
        {
            "inputs": ["a", "b"],
            "parameters": {"candidate_labels": ["x", "y"], "hypothesis_template": "{}!", "multi_label": True},
            "model": "nli",
        }
    )
    assert request.inputs == ["a", "b"]
    assert request.parameters.candidate_labels == ["x", "y"]
    assert request.model == "nli"
    for example in ZeroShotRequest.model_config["json_schema_extra"]["examples"]:
        ZeroShotRequest.model_validate(example)


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "a text"},  # candidate_labels are required
        {"inputs": "a text", "parameters": {}},
        {"inputs": "a text", "parameters": {"candidate_labels": ["a"], "top_k": 1}},  # unknown parameter
        {"inputs": "a text", "parameters": {"candidate_labels": ["a"]}, "extra": 1},
        {"inputs": "a text", "parameters": {"candidate_labels": ["a"], "multi_label": "yes"}},
        {"inputs": "a text", "parameters": {"candidate_labels": [1, 2]}},
        {"inputs": 3, "parameters": {"candidate_labels": ["a"]}},
    ],
)
def test_request_schema_refuses(body):
    with pytest.raises(ValidationError):
        ZeroShotRequest.model_validate(body)


def test_zz_report_parity():
    print(f"\nzero-shot: largest score difference from the pipeline: {MAX_DIFF['value']:.3g}")
