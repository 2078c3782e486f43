"""The NER task against transformers' token-classification pipeline on the same tiny checkpoints.

Our pre-processing feeds transformers' PyTorch model (`torch_outputs`) and our post-processing turns
its logits into the answer, which must equal what `pipeline("token-classification")` answers.

The default tiny model (4 shared layers, random weights) collapses every token onto nearly the same
hidden state, so it labels a whole text alike: good for the B- rule (seed 7 says B-MISC everywhere),
useless for grouping. One or two layers keep tokens apart and give mixed labels, O included.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from dataclasses import dataclass

import pytest
from compare import assert_matches_pipeline

from model.tokenizer import load_tokenizer
from service.errors import InvalidInput
from service.tasks.ner import AGGREGATION_STRATEGIES, NERParams, TokenClassificationTask
from tests.service.reference import torch_outputs

SHALLOW = dict(num_hidden_groups=1, inner_group_num=1)
REPOS = {
    "1-layer-seed0": dict(seed=0, num_hidden_layers=1, **SHALLOW),  # I-LOC / I-MISC
    "1-layer-seed1": dict(seed=1, num_hidden_layers=1, **SHALLOW),  # mostly B-LOC, some O
    "2-layer-seed2": dict(seed=2, num_hidden_layers=2, **SHALLOW),  # PER, ORG and O mixed
    "default-seed7": dict(seed=7),  # B-MISC on every token: no two tokens group
    "spiece-only": dict(seed=2, num_hidden_layers=2, fast_tokenizer=False, **SHALLOW),
}
MIXED = ("1-layer-seed0", "1-layer-seed1", "2-layer-seed2")
GROUPED = ("simple", "first", "average", "max")

SENTENCE = "John Smith works for Microsoft in Paris; Maria Müller met George at the Berlin museum."
UNICODE = "François et José visitèrent Zürich, São Paulo et München — café crème, naïve façade, 日本語 🙂!"
SPACES = "Anna   lives  in\tRome,\n\n  near   the  river  .  Peter  Smith"
# About 470 tokens: several windows of the model's 160 positions.
LONG = " ".join(
    f"{name} met {other} in {city} on monday {i}, and {org} hired the engineer from {city}."
    for i, (name, other, city, org) in enumerate(
        [
            ("John", "Mary", "Paris", "Google"),
            ("Anna", "Peter", "Berlin", "Siemens"),
            ("Laura", "José", "Zürich", "Nestle"),
            ("Thomas", "Emma", "Tokyo", "Toyota"),
            ("David", "Sarah", "Madrid", "Airbus"),
            ("Michael", "Alice", "Rome", "Spotify"),
        ]
        * 3
    )
)


@dataclass
class Setup:
    task: TokenClassificationTask
    model: object  # the transformers PyTorch model
    pipeline: object
    directory: object


@pytest.fixture(scope="module")
def get_setup(make_repo):
    """get_setup(name) -> Setup for one of REPOS, built once per module (pipelines take a while to load)."""
    from transformers import pipeline

    setups: dict[str, Setup] = {}

    def get(name: str) -> Setup:
        if name not in setups:
            directory, model = make_repo("token-classification", **REPOS[name])
            config = json.loads((directory / "config.json").read_text())
            tokenizer = load_tokenizer(directory)
            labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
            # As the service does: the tokenizer's limit, bounded by the model's positions.
            max_length = min(tokenizer.model_max_length, config["max_position_embeddings"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = pipeline(
                    "token-classification", model=str(directory), tokenizer=str(directory), device="cpu"
                )
            setups[name] = Setup(
                TokenClassificationTask(tokenizer, max_length, labels), model, ref, directory
            )
        return setups[name]

    return get


@pytest.fixture(params=MIXED)
def mixed(request, get_setup) -> Setup:
    return get_setup(request.param)


@pytest.fixture
def setup(get_setup) -> Setup:
    return get_setup("2-layer-seed2")


def ours(setup: Setup, texts: list[str], params: NERParams):
    prepared = setup.task.prepare(texts, params)
    return setup.task.finish(prepared, torch_outputs(setup.model, prepared.model_inputs, "ner"))


def reference(setup: Setup, inputs, params: NERParams):
    kwargs = dict(aggregation_strategy=params.aggregation_strategy, ignore_labels=list(params.ignore_labels))
    if params.stride is not None:
        kwargs["stride"] = params.stride
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Tokenizer does not support real words, using fallback heuristic"
        return setup.pipeline(inputs, **kwargs)


def check(setup: Setup, text: str, params: NERParams) -> list[dict]:
    (answer,) = ours(setup, [text], params)
    assert_matches_pipeline(answer, reference(setup, text, params))
    return answer


# -- the five strategies -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
@pytest.mark.parametrize("name", REPOS)
def test_strategies_match_pipeline(get_setup, name, strategy):
    setup = get_setup(name)
    for text in (SENTENCE, UNICODE):
        check(setup, text, NERParams(aggregation_strategy=strategy))


def test_models_give_varied_entities(get_setup):
    # Guards the tests above against models that label everything alike.
    labels, grouped = set(), False
    for name in MIXED:
        setup = get_setup(name)
        (tokens,) = ours(setup, [SENTENCE], NERParams(aggregation_strategy="none", ignore_labels=()))
        (groups,) = ours(setup, [SENTENCE], NERParams(aggregation_strategy="simple", ignore_labels=()))
        assert len({token["entity"] for token in tokens}) >= 2, name
        labels |= {token["entity"] for token in tokens}
        grouped |= 1 < len(groups) < len(tokens)
    assert grouped
    assert "O" in labels and {"B-PER", "I-PER"} & labels and {"B-LOC", "I-LOC"} & labels


def test_answer_shape_and_plain_types(setup):
    (tokens,) = ours(setup, [SENTENCE], NERParams(aggregation_strategy="none", ignore_labels=()))
    (groups,) = ours(setup, [SENTENCE], NERParams(aggregation_strategy="first", ignore_labels=()))
    assert tokens and groups
    for token in tokens:
        assert list(token) == ["entity", "score", "index", "word", "start", "end"]
        assert [type(token[k]) for k in token] == [str, float, int, str, int, int]
    for group in groups:
        assert list(group) == ["entity_group", "score", "word", "start", "end"]
        assert [type(group[k]) for k in group] == [str, float, str, int, int]


def test_strategy_is_case_insensitive_as_in_pipeline(setup):
    (upper,) = ours(setup, [SENTENCE], NERParams(aggregation_strategy="AVERAGE"))
    assert_matches_pipeline(upper, reference(setup, SENTENCE, NERParams(aggregation_strategy="average")))


# -- ignore_labels -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_ignore_nothing(mixed, strategy):
    answer = check(mixed, SENTENCE, NERParams(aggregation_strategy=strategy, ignore_labels=()))
    if strategy == "none":  # every non-special token is there
        prepared = mixed.task.prepare([SENTENCE], NERParams())
        assert len(answer) == len(prepared.model_inputs[0]) - 2


@pytest.mark.parametrize(
    "strategy, ignore",
    [
        ("none", ("I-LOC", "B-PER", "O")),
        ("none", ("PER",)),  # with "none" only full labels match
        ("simple", ("LOC", "ORG")),
        ("first", ("PER", "O")),
        ("average", ("MISC",)),
        ("max", ("LOC", "PER")),
    ],
)
def test_custom_ignore_labels(mixed, strategy, ignore):
    check(mixed, SENTENCE, NERParams(aggregation_strategy=strategy, ignore_labels=ignore))


# -- long texts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, stride, ignore",
    [
        ("simple", 0, ()),  # windows side by side, no overlap
        ("simple", 48, ("O",)),
        ("first", 48, ()),
        ("first", 100, ("O",)),
        ("average", 48, ()),
        ("average", 0, ("O",)),
        ("max", 48, ()),
        ("max", 100, ("O",)),
    ],
)
def test_stride_windows_match_pipeline(mixed, strategy, stride, ignore):
    params = NERParams(aggregation_strategy=strategy, ignore_labels=ignore, stride=stride)
    prepared = mixed.task.prepare([LONG], params)
    assert len(prepared.model_inputs) >= 3
    answer = check(mixed, LONG, params)
    if not ignore:
        assert answer[-1]["end"] > len(LONG) - 5  # the whole text was seen, not only the first window


def test_stride_windows_are_the_tokenizers(setup):
    from transformers import AutoTokenizer

    stride = 32
    prepared = setup.task.prepare([LONG], NERParams(stride=stride))
    expected = AutoTokenizer.from_pretrained(str(setup.directory))(
        LONG, truncation=True, return_overflowing_tokens=True, stride=stride
    )
    assert [mi.input_ids.tolist() for mi in prepared.model_inputs] == expected["input_ids"]
    assert [mi.token_type_ids.tolist() for mi in prepared.model_inputs] == expected["token_type_ids"]
    for mi in prepared.model_inputs:
        assert mi.input_ids.dtype == mi.token_type_ids.dtype == "int32"
        assert len(mi) <= 160


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_long_text_without_stride_is_truncated_as_pipeline(mixed, strategy):
    # The pipeline itself always truncates to tokenizer.model_max_length, so it is the reference as is.
    params = NERParams(aggregation_strategy=strategy, ignore_labels=())
    prepared = mixed.task.prepare([LONG], params)
    assert [len(mi) for mi in prepared.model_inputs] == [160]
    answer = check(mixed, LONG, params)
    assert answer[-1]["end"] < len(LONG) // 2


def test_text_that_fits_with_stride_is_one_window(setup):
    params = NERParams(aggregation_strategy="max", stride=64)
    prepared = setup.task.prepare([SENTENCE], params)
    assert len(prepared.model_inputs) == 1
    check(setup, SENTENCE, params)


# -- offsets and odd text ------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Lower-case, accents stripped, no spaces (the model's normalisation, roughly)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c) and not c.isspace()).lower()


def _spells_word(text: str, entity: dict) -> bool:
    return _fold(text[entity["start"] : entity["end"]]) == _fold(entity["word"].replace("▁", " "))


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_unicode_offsets_index_the_original_string(mixed, strategy):
    params = NERParams(aggregation_strategy=strategy, ignore_labels=())
    answer = check(mixed, UNICODE, params)
    # Character offsets (not bytes) into the caller's string: the slice spells the word wherever it
    # does in the pipeline's answer (a lone "▁" piece shares the next token's offsets, so not always).
    ref = reference(mixed, UNICODE, params)
    spelled = [_spells_word(UNICODE, entity) for entity in answer]
    assert spelled == [_spells_word(UNICODE, entity) for entity in ref]
    assert sum(spelled) >= 0.8 * len(spelled)
    assert any("🙂" in entity["word"] for entity in answer)  # <unk> is shown as the text it stands for


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_multiple_spaces_tabs_and_newlines(mixed, strategy):
    check(mixed, SPACES, NERParams(aggregation_strategy=strategy, ignore_labels=()))
    check(mixed, SPACES, NERParams(aggregation_strategy=strategy))


def test_special_token_text_is_skipped_as_pipeline(setup):
    text = "Paris [MASK] is a city [SEP] in France."
    for strategy in AGGREGATION_STRATEGIES:
        check(setup, text, NERParams(aggregation_strategy=strategy, ignore_labels=()))


# -- several items -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        NERParams(),
        NERParams(aggregation_strategy="none"),
        NERParams(aggregation_strategy="average", stride=40),
    ],
)
def test_list_of_items(setup, params):
    texts = [SENTENCE, LONG, UNICODE, SPACES]
    answers = ours(setup, texts, params)
    refs = reference(setup, texts, params)
    assert len(answers) == len(refs) == len(texts)
    for answer, ref in zip(answers, refs, strict=True):
        assert_matches_pipeline(answer, ref)


# -- invalid input -------------------------------------------------------------------------------


def test_unknown_strategy(setup):
    with pytest.raises(InvalidInput) as error:
        setup.task.prepare([SENTENCE], NERParams(aggregation_strategy="longest"))
    for name in ("'longest'", *AGGREGATION_STRATEGIES):
        assert name in error.value.message


def test_stride_with_none_strategy(setup):
    with pytest.raises(InvalidInput) as error:
        setup.task.prepare([SENTENCE], NERParams(aggregation_strategy="none", stride=16))
    assert "none" in error.value.message and "16" in error.value.message
    with pytest.raises(ValueError, match="stride"):  # the pipeline refuses it too
        reference(setup, SENTENCE, NERParams(aggregation_strategy="none", stride=16))


@pytest.mark.parametrize("stride", [158, 159, 160, 1000, -1])
def test_stride_not_below_window_length(setup, stride):
    # 160 positions minus [CLS] and [SEP]: 158 tokens of text per window, and the overlap must be shorter.
    with pytest.raises(InvalidInput) as error:
        setup.task.prepare([LONG], NERParams(stride=stride))
    assert str(stride) in error.value.message
    if stride >= 0:
        assert "158" in error.value.message
    # The pipeline cannot serve these either (ValueError from it or the tokenizer, or a tokenizer panic).
    with pytest.raises(BaseException):  # noqa: B017
        reference(setup, LONG, NERParams(stride=stride))


def test_largest_stride_is_served(setup):
    # 157 overlapping tokens: each window moves on by one token, so the text is cut to 161 tokens.
    offsets = setup.task.tokenizer.encode(LONG)[0].offsets  # [CLS] is offsets[0]
    text = LONG[: offsets[161][1]]
    params = NERParams(aggregation_strategy="first", stride=157)
    assert len(setup.task.prepare([text], params).model_inputs) >= 3
    check(setup, text, params)


@pytest.mark.parametrize("text", ["", " ", "  \t\n  "])
def test_empty_or_whitespace_text(setup, text):
    with pytest.raises(InvalidInput) as error:
        setup.task.prepare([SENTENCE, text], NERParams())
    assert "input 1" in error.value.message and "empty" in error.value.message
