"""ClassificationTask against transformers' text-classification pipeline on the same tiny checkpoints.

The model between prepare and finish is transformers' PyTorch model (tests/service/reference.py), so
these tests check the pre- and post-processing alone. Labels and problem_type are read from the
repository's config.json, as the service does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from builders import read_json
from compare import assert_matches_pipeline

from model.tokenizer import load_tokenizer
from service.errors import InvalidInput
from service.tasks.classify import ClassificationTask, ClassifyItem, ClassifyParams

# tests/service/reference.py: a plain module beside the tests, not part of the `service` package.
sys.path.insert(0, str(Path(__file__).parents[1]))
from reference import torch_outputs

# (labels, config overrides): the cases that pick each default function_to_apply.
REPOS = {
    "3-labels": (None, {}),  # softmax
    "3-labels-seed1": (None, {"seed": 1}),
    "1-label": (["score"], {}),  # sigmoid
    "regression": (["score"], {"problem_type": "regression"}),  # none
    "multi-label": (None, {"problem_type": "multi_label_classification"}),  # sigmoid
    "1-label-single": (["score"], {"problem_type": "single_label_classification"}),  # sigmoid: one label wins
    "2-labels-single": (["no", "yes"], {"problem_type": "single_label_classification", "seed": 2}),  # softmax
}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "an excellent and beautiful museum",
    "terrible, awful, bad!",
    "Zürich, café and crème brûlée: déjà vu.",
    "日本語のテキスト and 中文",
    "  spaces around  ",
]

PAIRS = [
    ClassifyItem("Where is the museum?", "The museum is in Paris, near the river."),
    ClassifyItem("naïve señor", "año niño façade"),
    ClassifyItem("one", "two three four"),
]


def _as_pipeline_input(item: ClassifyItem):
    return item.text if item.text_pair is None else {"text": item.text, "text_pair": item.text_pair}


class Setup:
    def __init__(self, directory, model):
        from transformers import AutoTokenizer, pipeline

        self.model = model
        config = read_json(directory / "config.json")
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.tokenizer = load_tokenizer(directory)
        self.max_length = min(self.tokenizer.model_max_length, config["max_position_embeddings"])
        self.task = ClassificationTask(self.tokenizer, self.max_length, labels, config.get("problem_type"))
        self.pipe = pipeline(
            "text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(directory)
        )

    def answer(self, items: list, params: ClassifyParams | None = None) -> list:
        items = [ClassifyItem(item) if isinstance(item, str) else item for item in items]
        prepared = self.task.prepare(items, params or ClassifyParams())
        return self.task.finish(prepared, torch_outputs(self.model, prepared.model_inputs, self.task.name))

    def reference(self, item, params: ClassifyParams, **tokenizer_kwargs):
        kwargs = {"top_k": params.top_k, **tokenizer_kwargs}
        if params.function_to_apply is not None:
            kwargs["function_to_apply"] = params.function_to_apply
        return self.pipe(_as_pipeline_input(item) if isinstance(item, ClassifyItem) else item, **kwargs)


@pytest.fixture(scope="module", params=list(REPOS))
def setup(request, make_repo) -> Setup:
    labels, overrides = REPOS[request.param]
    kwargs = dict(overrides)
    if labels is not None:
        kwargs["labels"] = labels
    return Setup(*make_repo("sequence-classification", **kwargs))


@pytest.fixture(scope="module")
def setup3(make_repo) -> Setup:
    return Setup(*make_repo("sequence-classification"))


@pytest.mark.parametrize("function_to_apply", [None, "softmax", "sigmoid", "none"])
def test_texts_and_pairs_match_pipeline(setup, function_to_apply):
    params = ClassifyParams(function_to_apply=function_to_apply)
    items = [ClassifyItem(t) for t in TEXTS] + PAIRS
    ours = setup.answer(items, params)
    assert len(ours) == len(items)
    for item, answer in zip(items, ours, strict=True):
        assert_matches_pipeline(answer, setup.reference(item, params), path=repr(item))


@pytest.mark.parametrize(
    "params",
    [
        ClassifyParams(top_k=1),
        ClassifyParams(top_k=2, function_to_apply="sigmoid"),
        ClassifyParams(top_k=3, function_to_apply="none"),
        ClassifyParams(top_k=10),  # more than the labels: all of them, as the pipeline
        ClassifyParams(top_k=1, function_to_apply="SoftMax"),  # the pipeline reads the name in any case
    ],
)
def test_top_k_matches_pipeline(setup, params):
    items = [ClassifyItem(TEXTS[0]), ClassifyItem(TEXTS[3]), PAIRS[0]]
    for item, answer in zip(items, setup.answer(items, params), strict=True):
        assert len(answer) == min(params.top_k, len(setup.task.labels))
        assert_matches_pipeline(answer, setup.reference(item, params), path=repr(item))


def test_default_is_all_labels_best_first(setup3):
    (answer,) = setup3.answer([TEXTS[0]])
    scores = [a["score"] for a in answer]
    assert scores == sorted(scores, reverse=True)
    assert sorted(a["label"] for a in answer) == sorted(setup3.model.config.id2label.values())
    assert_matches_pipeline(answer, setup3.pipe(TEXTS[0], top_k=None))


def test_list_input_matches_pipeline_list(setup3):
    items = [TEXTS[0], PAIRS[0], TEXTS[3], PAIRS[1]]
    ours = setup3.answer(items, ClassifyParams(top_k=2))
    assert_matches_pipeline(
        ours,
        setup3.pipe([_as_pipeline_input(i) if isinstance(i, ClassifyItem) else i for i in items], top_k=2),
    )


def _long(n_words: int, start: int = 0) -> str:
    words = ["the", "city", "of", "paris", "has", "a", "river", "and", "an", "excellent", "old", "museum"]
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


@pytest.mark.parametrize("function_to_apply", [None, "sigmoid"])
def test_long_inputs_are_truncated_as_the_pipeline_with_truncation(setup3, function_to_apply):
    items = [
        ClassifyItem(_long(400)),
        ClassifyItem(_long(300), "a short question?"),  # only the long segment loses tokens
        ClassifyItem("a short text", _long(300, 5)),
        ClassifyItem(_long(200, 3), _long(250, 7)),  # both long: the longest loses first
    ]
    for item in items:
        assert len(setup3.tokenizer.encode(item.text, item.text_pair)[0].ids) > setup3.max_length
    params = ClassifyParams(function_to_apply=function_to_apply)
    prepared = setup3.task.prepare(items, params)
    assert all(len(mi) == setup3.max_length for mi in prepared.model_inputs)
    for item, answer in zip(items, setup3.answer(items, params), strict=True):
        assert_matches_pipeline(answer, setup3.reference(item, params, truncation=True), path=repr(item)[:60])


def test_model_inputs(setup3):
    prepared = setup3.task.prepare([PAIRS[0], ClassifyItem(TEXTS[3])], ClassifyParams())
    for model_input, item in zip(prepared.model_inputs, [PAIRS[0], ClassifyItem(TEXTS[3])], strict=True):
        encoded = setup3.pipe.tokenizer(item.text, item.text_pair)
        assert model_input.input_ids.tolist() == encoded["input_ids"]
        assert model_input.token_type_ids.tolist() == encoded["token_type_ids"]
        assert model_input.mask_positions is None


# Invalid inputs.


@pytest.mark.parametrize("text", ["", " ", "\n\t  "])
def test_empty_text_is_invalid(setup3, text):
    with pytest.raises(InvalidInput, match="text is empty"):
        setup3.task.prepare([ClassifyItem(text)], ClassifyParams())
    with pytest.raises(InvalidInput, match="text is empty"):
        setup3.task.prepare([ClassifyItem(text, "a pair")], ClassifyParams())


@pytest.mark.parametrize("text_pair", ["", "   "])
def test_empty_text_pair_is_invalid(setup3, text_pair):
    with pytest.raises(InvalidInput, match="text_pair is empty"):
        setup3.task.prepare([ClassifyItem("a text", text_pair)], ClassifyParams())


def test_one_bad_item_in_a_list_is_named(setup3):
    with pytest.raises(InvalidInput, match="input 2"):
        setup3.task.prepare([ClassifyItem("a"), ClassifyItem("b"), ClassifyItem(" ")], ClassifyParams())


@pytest.mark.parametrize("function_to_apply", ["default", "relu", ""])
def test_unknown_function_to_apply_is_invalid(setup3, function_to_apply):
    with pytest.raises(InvalidInput, match=rf"softmax, sigmoid, none, got '{function_to_apply}'"):
        setup3.task.prepare([ClassifyItem("a text")], ClassifyParams(function_to_apply=function_to_apply))
    with pytest.raises(KeyError):  # the pipeline has no such function either
        setup3.pipe("a text", top_k=None, function_to_apply=function_to_apply)


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one_is_invalid(setup3, top_k):
    with pytest.raises(InvalidInput, match=rf"top_k.*got {top_k}"):
        setup3.task.prepare([ClassifyItem("a text")], ClassifyParams(top_k=top_k))
