"""FillMaskTask against transformers' fill-mask pipeline on the same tiny checkpoint.

The model between prepare and finish is transformers' PyTorch model (tests/service/reference.py), so
these tests check the pre- and post-processing alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from compare import assert_matches_pipeline

from model.tokenizer import load_tokenizer
from service.errors import InvalidInput
from service.tasks.fill_mask import FillMaskParams, FillMaskTask

# tests/service/reference.py: a plain module beside the tests, not part of the `service` package.
sys.path.insert(0, str(Path(__file__).parents[1]))
from reference import torch_outputs

SEEDS = [0, 1, 2]

TEXTS = [
    "Paris is the [MASK] of France.",
    "The capital of France is [MASK].",
    "[MASK] is a beautiful city.",
    "The river[MASK] runs through the city",  # mask glued to the word before it
    "Anna lives in the city of [MASK], near the river.",
    "He said: ([MASK])!",  # punctuation on both sides
    "Zürich, café and crème brûlée are [MASK].",
    "naïve señor año [MASK] niño façade",
    "日本語のテキスト [MASK] 中文",  # characters the vocabulary does not have
    "   leading and trailing spaces [MASK]   ",
    "x <pad> [MASK]",  # a literal pad token: the pipeline drops it from `sequence`
]

MULTI_MASK_TEXTS = [
    "Paris is the [MASK] of [MASK].",
    "[MASK][MASK][MASK]",
    "The [MASK] of Zürich is [MASK], said the café owner [MASK].",
]


class Setup:
    def __init__(self, directory, model):
        from transformers import AutoTokenizer, pipeline

        self.model = model
        self.tokenizer = load_tokenizer(directory)
        self.max_length = min(self.tokenizer.model_max_length, model.config.max_position_embeddings)
        self.task = FillMaskTask(self.tokenizer, self.max_length)
        self.pipe = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(directory))

    def answer(self, texts: list[str], params: FillMaskParams | None = None) -> list:
        prepared = self.task.prepare(texts, params or FillMaskParams())
        return self.task.finish(prepared, torch_outputs(self.model, prepared.model_inputs, self.task.name))


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def setup(request, make_repo) -> Setup:
    return Setup(*make_repo("masked-lm", seed=request.param))


@pytest.fixture(scope="module")
def setup0(make_repo) -> Setup:
    return Setup(*make_repo("masked-lm", seed=0))


def _pipeline_kwargs(params: FillMaskParams) -> dict:
    kwargs = {"top_k": params.top_k}
    if params.targets is not None:
        kwargs["targets"] = list(params.targets)
    return kwargs


@pytest.mark.parametrize("top_k", [1, 3, 5, 40])
def test_single_mask_matches_pipeline(setup, top_k):
    params = FillMaskParams(top_k=top_k)
    ours = setup.answer(TEXTS, params)
    assert len(ours) == len(TEXTS)
    for text, answer in zip(TEXTS, ours, strict=True):
        assert_matches_pipeline(answer, setup.pipe(text, **_pipeline_kwargs(params)), path=repr(text))


def test_default_params_match_pipeline_defaults(setup):
    for text, answer in zip(TEXTS[:3], setup.answer(TEXTS[:3]), strict=True):
        assert_matches_pipeline(answer, setup.pipe(text), path=repr(text))


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_several_masks_give_one_list_per_mask(setup, top_k):
    params = FillMaskParams(top_k=top_k)
    for text, answer in zip(MULTI_MASK_TEXTS, setup.answer(MULTI_MASK_TEXTS, params), strict=True):
        ref = setup.pipe(text, top_k=top_k)
        assert isinstance(ref[0], list)  # the reference really is the several-mask form
        assert_matches_pipeline(answer, ref, path=repr(text))


@pytest.mark.parametrize(
    "targets",
    [
        ("▁the", "▁paris", "▁city"),  # vocabulary entries
        ("the", "paris", "Zürich", "café"),  # not entries: their first sub-token stands in
        ("the", "▁the", "the", "▁city"),  # duplicates, also after mapping, count once
        ("▁city",),  # a single target caps top_k at 1
        ("[SEP]", "<pad>", "▁the"),  # special tokens: skipped or dropped when decoding `sequence`
        ("", "▁the"),  # a target giving no token is ignored
    ],
)
@pytest.mark.parametrize("top_k", [1, 2, 10])
def test_targets_match_pipeline(setup0, targets, top_k):
    params = FillMaskParams(top_k=top_k, targets=targets)
    texts = TEXTS[:2] + TEXTS[6:8] + MULTI_MASK_TEXTS[:1]
    for text, answer in zip(texts, setup0.answer(texts, params), strict=True):
        assert_matches_pipeline(answer, setup0.pipe(text, **_pipeline_kwargs(params)), path=repr(text))


def test_targets_are_not_renormalized(setup0):
    # The score of a target is its probability over the whole vocabulary, as without targets.
    everything = setup0.answer(["Paris is the [MASK] of France."], FillMaskParams(top_k=3))[0]
    best = everything[0]
    targeted = setup0.answer(
        ["Paris is the [MASK] of France."],
        FillMaskParams(top_k=1, targets=(setup0.tokenizer.id_to_token(best["token"]),)),
    )[0]
    assert targeted == [best]


def test_list_input_matches_pipeline_list(setup0):
    texts = [TEXTS[0], MULTI_MASK_TEXTS[0], TEXTS[6]]
    params = FillMaskParams(top_k=4, targets=("the", "▁city", "paris", "▁france", "▁rome"))
    assert_matches_pipeline(setup0.answer(texts, params), setup0.pipe(texts, **_pipeline_kwargs(params)))


def _long_text(words_before: int, words_after: int) -> str:
    filler = ["the", "city", "of", "paris", "has", "a", "river", "and", "a", "beautiful", "old", "museum"]
    before = " ".join(filler[i % len(filler)] for i in range(words_before))
    after = " ".join(filler[i % len(filler)] for i in range(words_after))
    return f"{before} [MASK] {after}".strip()


@pytest.mark.parametrize("params", [FillMaskParams(), FillMaskParams(top_k=3, targets=("the", "▁city"))])
def test_long_input_is_truncated_as_the_pipeline_with_truncation(setup0, params):
    texts = [_long_text(5, 400), _long_text(100, 100), "[MASK] [MASK] " + _long_text(20, 300)]
    for text in texts:
        assert len(setup0.tokenizer.encode(text)[0].ids) > setup0.max_length
    for text, answer in zip(texts, setup0.answer(texts, params), strict=True):
        ref = setup0.pipe(text, tokenizer_kwargs={"truncation": True}, **_pipeline_kwargs(params))
        assert_matches_pipeline(answer, ref, path=repr(text[:40]))


def test_input_of_exactly_the_maximum_length_is_kept_whole(setup0):
    # The mask is the last token before [SEP] of a text exactly model_max_length tokens long.
    text = _long_text(400, 0)
    ids = setup0.tokenizer.encode(text, max_length=setup0.max_length)[0].ids
    text = setup0.tokenizer.decode(ids[1:-2], skip_special_tokens=True) + " [MASK]"
    assert len(setup0.tokenizer.encode(text)[0].ids) == setup0.max_length
    prepared = setup0.task.prepare([text], FillMaskParams())
    assert list(prepared.model_inputs[0].mask_positions) == [setup0.max_length - 2]
    assert_matches_pipeline(setup0.answer([text])[0], setup0.pipe(text))


def test_model_inputs(setup0):
    prepared = setup0.task.prepare(MULTI_MASK_TEXTS[:1], FillMaskParams())
    (model_input,) = prepared.model_inputs
    encoded = setup0.pipe.tokenizer(MULTI_MASK_TEXTS[0])
    assert model_input.input_ids.tolist() == encoded["input_ids"]
    assert model_input.token_type_ids.tolist() == encoded["token_type_ids"]
    mask_id = setup0.pipe.tokenizer.mask_token_id
    assert model_input.mask_positions.tolist() == [
        i for i, t in enumerate(encoded["input_ids"]) if t == mask_id
    ]


# Invalid inputs: a clean InvalidInput, where the pipeline raises (or, for truncation, would silently
# answer for fewer masks than the client sent).


@pytest.mark.parametrize("text", ["Paris is the capital of France.", "[mask] lower case is no mask"])
def test_text_without_mask_is_invalid(setup0, text):
    with pytest.raises(InvalidInput, match=r"\[MASK\]"):
        setup0.task.prepare([text], FillMaskParams())
    with pytest.raises(Exception, match=r"No mask_token"):
        setup0.pipe(text)


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_invalid(setup0, text):
    with pytest.raises(InvalidInput, match="empty"):
        setup0.task.prepare([text], FillMaskParams())


def test_one_bad_item_in_a_list_is_named(setup0):
    with pytest.raises(InvalidInput, match="input 1"):
        setup0.task.prepare([TEXTS[0], "no mask here", TEXTS[1]], FillMaskParams())


def test_mask_cut_off_by_truncation_is_invalid(setup0):
    text = _long_text(400, 3)
    with pytest.raises(InvalidInput, match=rf"maximum of {setup0.max_length}.*1 of its 1 \[MASK\]"):
        setup0.task.prepare([text], FillMaskParams())
    with pytest.raises(Exception, match=r"No mask_token"):  # the pipeline has nothing left to answer
        setup0.pipe(text, tokenizer_kwargs={"truncation": True})


def test_some_masks_cut_off_by_truncation_is_invalid(setup0):
    text = "[MASK] " + _long_text(400, 3)
    with pytest.raises(InvalidInput, match=r"1 of its 2 \[MASK\]"):
        setup0.task.prepare([text], FillMaskParams())


@pytest.mark.parametrize("targets", [(), ("",), ("", "")])
def test_targets_giving_no_token_are_invalid(setup0, targets):
    with pytest.raises(InvalidInput, match="targets"):
        setup0.task.prepare([TEXTS[0]], FillMaskParams(targets=targets))
    with pytest.raises(ValueError, match="At least one target"):
        setup0.pipe(TEXTS[0], targets=list(targets))


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one_is_invalid(setup0, top_k):
    with pytest.raises(InvalidInput, match=rf"top_k.*{top_k}"):
        setup0.task.prepare([TEXTS[0]], FillMaskParams(top_k=top_k))


def test_top_k_over_the_vocabulary_is_invalid(setup0):
    vocab_size = setup0.model.config.vocab_size
    with pytest.raises(InvalidInput, match=rf"{vocab_size}.*{vocab_size + 1}"):
        setup0.task.prepare([TEXTS[0]], FillMaskParams(top_k=vocab_size + 1))
    with pytest.raises(RuntimeError):  # torch.topk: the pipeline has no answer either
        setup0.pipe(TEXTS[0], top_k=vocab_size + 1)
    # The whole vocabulary is a valid request.
    answer = setup0.answer([TEXTS[0]], FillMaskParams(top_k=vocab_size))[0]
    assert_matches_pipeline(answer, setup0.pipe(TEXTS[0], top_k=vocab_size))


def test_repository_with_only_spiece_model(make_repo):
    # Many hub repositories have no tokenizer.json: both sides convert spiece.model.
    slow = Setup(*make_repo("masked-lm", fast_tokenizer=False))
    texts = TEXTS + MULTI_MASK_TEXTS
    for text, answer in zip(texts, slow.answer(texts, FillMaskParams(top_k=3)), strict=True):
        assert_matches_pipeline(answer, slow.pipe(text, top_k=3), path=repr(text))
