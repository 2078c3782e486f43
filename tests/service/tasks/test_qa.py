"""QuestionAnsweringTask against transformers 4.57's question-answering pipeline on tiny random models.

Our pre- and post-processing run around transformers' own PyTorch model (`torch_outputs`), so any
difference from the pipeline comes from the task code. Random weights give arbitrary answers; several
seeds make them land in different places.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
from compare import assert_matches_pipeline

from model.tokenizer import load_tokenizer
from service.errors import InvalidInput
from service.tasks.qa import QAItem, QAParams, QuestionAnsweringTask
from tests.service.reference import torch_outputs

# With TINY's 4 shared layers a random model's start/end logits barely vary along the sequence (std
# ~1e-3: attention averages the tokens together), so its answers are decided by near-ties. One-layer
# models give well-separated scores, which make the 1e-4 score tolerance meaningful. Both are tested.
SHALLOW = dict(num_hidden_layers=1, num_hidden_groups=1, inner_group_num=1)
MODELS = {"tiny-0": (0, {}), "shallow-0": (0, SHALLOW), "shallow-1": (1, SHALLOW), "shallow-2": (2, SHALLOW)}
MODEL_MAX = 160  # builders.TINY max_position_embeddings, also the tokenizer's model_max_length

SHORT = [
    ("Where was Albert Einstein born?", "Albert Einstein was born in Ulm, Germany, in 1879."),
    ("Who worked in Paris?", "Marie Curie worked in Paris and won two Nobel prizes."),
    ("What does it cost?", "It costs $3.50, or 3,50 € in Zürich (about 12%)."),
]

UNICODE = [
    (
        "Où est né François Müller ?",
        "François Müller est né à Zürich; il a mangé une crème brûlée au café naïve.",
    ),
    ("Qué es una piñata?", "El señor José compró una piñata para el niño. ¡Año nuevo en São Paulo!"),
    ("What is mixed?", "日本語のテキスト and 中文 mixed with English, déjà vu 🙂 at the façade."),
    # Decomposed accents (e + combining acute) and a ligature: the normalizer changes their length.
    ("Who is the fiance\u0301e?", "The fiance\u0301e of the garc\u0327on lives in ﬁne Zu\u0308rich."),
]

SPACES = (
    "Where is the capital?",
    "Paris   is the\n\ncapital  of\tFrance.\n\n   Berlin is   the capital of Germany.\r\n  Rome  \n",
)

LONG_QUESTION = "Where does the president of the company go tomorrow morning?"

_VOCABULARY = (
    "the capital of france is paris and the river runs through the city while the team plays a match "
    "in the season john mary and peter work at the university hospital near the station in berlin "
    "tomorrow morning the president of the company will visit tokyo madrid and rome by train"
)


def long_context(seed: int, n_words: int) -> str:
    """Sentences from the tokenizer's training words, so that they cost about one token per word."""
    rng = random.Random(seed)
    words = _VOCABULARY.split()
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentence = rng.choices(words, k=rng.randint(5, 14))
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(1, 2000)))
        sentences.append(" ".join(sentence).capitalize() + rng.choice([".", "!", "?"]))
    return " ".join(sentences)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model is all overhead: on a busy 2-core machine torch's thread pool makes it 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qa(make_repo):
    """qa(name) -> (task, torch model, pipeline) for the tiny QA repository MODELS[name]."""
    cache = {}

    def get(name: str = "tiny-0"):
        if name not in cache:
            seed, config = MODELS[name]
            directory, model = make_repo("question-answering", seed=seed, **config)
            pipe = transformers.pipeline("question-answering", model=str(directory), tokenizer=str(directory))
            cache[name] = (QuestionAnsweringTask(load_tokenizer(directory), MODEL_MAX), model, pipe)
        return cache[name]

    return get


def run_task(task, model, items: list[tuple[str, str]], **params):
    prepared = task.prepare([QAItem(q, c) for q, c in items], QAParams(**params))
    return task.finish(prepared, torch_outputs(model, prepared.model_inputs, "qa")), prepared


def check(qa, name: str, items: list[tuple[str, str]], **params):
    """Each item alone and all together must match the pipeline; offsets must index the context."""
    task, model, pipe = qa(name)
    ours, prepared = run_task(task, model, items, **params)
    assert len(ours) == len(items)
    for (question, context), answer in zip(items, ours, strict=True):
        assert_matches_pipeline(answer, pipe(question=question, context=context, **params))
        for a in answer if isinstance(answer, list) else [answer]:
            assert context[a["start"] : a["end"]] == a["answer"]
    if len(items) > 1:
        ref = pipe(question=[q for q, _ in items], context=[c for _, c in items], **params)
        assert_matches_pipeline(ours, ref)
    return ours, prepared


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("name", MODELS)
def test_short_contexts(qa, name):
    check(qa, name, SHORT)


@pytest.mark.parametrize("name", MODELS)
def test_short_contexts_top_k(qa, name):
    ours, _ = check(qa, name, SHORT, top_k=3)
    assert all(isinstance(a, list) and len(a) == 3 for a in ours)


@pytest.mark.parametrize("name", MODELS)
def test_top_k_larger_than_the_candidates(qa, name):
    # More answers asked than there are spans: the pipeline's zero-score leftovers must come out alike.
    check(qa, name, SHORT[:2], top_k=200)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("params", [dict(max_seq_len=48, doc_stride=16), dict(max_seq_len=40, doc_stride=0)])
def test_long_context_several_windows(qa, name, params):
    _, prepared = check(qa, name, [(LONG_QUESTION, long_context(1, 120))], **params)
    assert len(prepared.model_inputs) > 3
    assert all(len(mi) <= params["max_seq_len"] for mi in prepared.model_inputs)


@pytest.mark.parametrize("name", MODELS)
def test_long_context_top_k_merges_answers_across_windows(qa, name):
    # Overlapping windows propose the same text more than once: the pipeline sums those scores.
    check(qa, name, [(LONG_QUESTION, long_context(2, 150))], max_seq_len=48, doc_stride=24, top_k=5)


@pytest.mark.parametrize("name", MODELS)
def test_defaults_on_a_context_longer_than_the_model(qa, name):
    _, prepared = check(qa, name, [(LONG_QUESTION, long_context(3, 300)), SHORT[0]])
    # Defaults: max_seq_len = min(160, 384), doc_stride = min(160 // 2, 128).
    assert max(len(mi) for mi in prepared.model_inputs) == MODEL_MAX
    assert len(prepared.model_inputs) > 3


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("max_answer_len", [1, 2, 4, 30])
def test_max_answer_len(qa, name, max_answer_len):
    check(qa, name, SHORT[:2], max_answer_len=max_answer_len, top_k=3)


@pytest.mark.parametrize("max_question_len", [1, 3, 64])
def test_max_question_len_does_not_cut_the_question(qa, max_question_len):
    # The pipeline's fast-tokenizer path ignores it; the answers must still match.
    items = [(LONG_QUESTION, SHORT[0][1]), (LONG_QUESTION, long_context(4, 80))]
    check(qa, "shallow-1", items, max_question_len=max_question_len, max_seq_len=64)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("handle_impossible_answer", [True, False])
def test_handle_impossible_answer(qa, name, top_k, handle_impossible_answer):
    items = [*SHORT, (LONG_QUESTION, long_context(5, 100))]
    check(qa, name, items, top_k=top_k, handle_impossible_answer=handle_impossible_answer, max_seq_len=64)


@pytest.mark.parametrize("name", ["tiny-0", "shallow-1"])
def test_null_answer_among_all_answers(qa, name):
    # With every answer asked for, the null answer must be there, scored as the pipeline scores it.
    ours, _ = check(qa, name, SHORT, top_k=500, handle_impossible_answer=True)
    assert all(any(a["answer"] == "" and a["end"] == 0 for a in answers) for answers in ours)


@pytest.mark.parametrize("name", MODELS)
def test_null_answer_over_tiny_windows(qa, name):
    # Windows of two context tokens: fewer spans than top_k asks for (the pipeline's argsort branch), and
    # the null score is the lowest over all windows, which a multi-window item must reproduce.
    items = [("Who?", "Paris is nice and Berlin is big."), ("Who is it?", "Marie Curie worked in Paris.")]
    ours, prepared = check(
        qa, name, items, max_seq_len=12, doc_stride=1, top_k=60, handle_impossible_answer=True
    )
    assert len(prepared.model_inputs) > 2 * len(items)
    assert all(any(a["answer"] == "" and a["end"] == 0 for a in answers) for answers in ours)


def test_impossible_answer_can_win(qa):
    # One-token contexts leave two softmax candidates: [CLS] and that token. Some models prefer [CLS],
    # which exercises the pipeline's {"start": 0, "end": 0, "answer": ""} at top_k=1.
    contexts = ["Paris", "Berlin", "the", "1879", "Paris is nice."]
    wins = 0
    for name in MODELS:
        task, model, pipe = qa(name)
        for question, _ in SHORT:
            for context in contexts:
                ref = pipe(question=question, context=context, handle_impossible_answer=True)
                ours, _ = run_task(task, model, [(question, context)], handle_impossible_answer=True)
                assert_matches_pipeline(ours[0], ref)
                wins += ref["answer"] == ""
    assert 0 < wins < len(MODELS) * len(SHORT) * len(contexts)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("align_to_words", [True, False])
@pytest.mark.parametrize("top_k", [1, 4])
def test_align_to_words(qa, name, align_to_words, top_k):
    check(qa, name, [*SHORT, *UNICODE, SPACES], align_to_words=align_to_words, top_k=top_k)


@pytest.mark.parametrize("name", MODELS)
def test_unicode_and_accents(qa, name):
    ours, _ = check(qa, name, UNICODE, top_k=5)
    assert any(not a["answer"].isascii() for answers in ours for a in answers)


@pytest.mark.parametrize("name", MODELS)
def test_unicode_in_long_contexts(qa, name):
    context = "  ".join(c for _, c in UNICODE) + "\n" + long_context(6, 60) + " " + UNICODE[0][1]
    _, prepared = check(qa, name, [(UNICODE[0][0], context)], max_seq_len=72, doc_stride=20, top_k=3)
    assert len(prepared.model_inputs) > 3


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("align_to_words", [True, False])
def test_multiple_spaces_and_newlines(qa, name, align_to_words):
    check(qa, name, [SPACES], top_k=6, align_to_words=align_to_words)


def test_many_items_with_mixed_lengths_in_one_call(qa):
    items = [*SHORT, (LONG_QUESTION, long_context(7, 200)), *UNICODE, SPACES, SHORT[0]]
    ours, _ = check(qa, "shallow-2", items, max_seq_len=64, doc_stride=20, top_k=2)
    assert len(ours) == len(items)


# ---------------------------------------------------------------- model inputs


@pytest.mark.parametrize(
    "params", [dict(), dict(max_seq_len=48, doc_stride=16), dict(max_seq_len=30, doc_stride=0)]
)
def test_windows_match_the_pipeline_preprocess(qa, params):
    task, _, pipe = qa()
    question, context = UNICODE[0][0], UNICODE[0][1] + " " + long_context(8, 200)
    prepared = task.prepare([QAItem(question, context)], QAParams(**params))
    features = list(pipe.preprocess({"question": question, "context": context}, **params))
    assert len(prepared.model_inputs) == len(features) > 1
    for mi, window, feature in zip(prepared.model_inputs, prepared.context.windows, features, strict=True):
        assert mi.input_ids.dtype == np.int32 and mi.token_type_ids.dtype == np.int32
        np.testing.assert_array_equal(mi.input_ids, feature["input_ids"][0].numpy())
        np.testing.assert_array_equal(mi.token_type_ids, feature["token_type_ids"][0].numpy())
        np.testing.assert_array_equal(window.answerable, 1 - feature["p_mask"][0].numpy().astype(np.int64))


def test_large_doc_stride_is_fine_when_the_context_fits(qa):
    # The tokenizer only rejects the stride when it has to cut the context into windows.
    check(qa, "shallow-0", SHORT, max_seq_len=64, doc_stride=60)


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "question, context, field, received",
    [
        ("", "Paris is in France.", "question", "empty"),
        ("  \n\t", "Paris is in France.", "question", "whitespace"),
        ("Where?", "", "context", "empty"),
        ("Where?", " \n ", "context", "whitespace"),
    ],
)
def test_empty_or_blank_text(qa, question, context, field, received):
    task = qa()[0]
    with pytest.raises(InvalidInput, match=rf"inputs\[1\]\.{field}.*{received}"):
        task.prepare([QAItem(*SHORT[0]), QAItem(question, context)], QAParams())


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(top_k=0), r"top_k must be >= 1, got 0"),
        (dict(top_k=-3), r"top_k must be >= 1, got -3"),
        (dict(max_answer_len=0), r"max_answer_len must be >= 1, got 0"),
        (dict(max_seq_len=MODEL_MAX + 1), rf"max_seq_len must be <= {MODEL_MAX}.*got {MODEL_MAX + 1}"),
        (dict(max_seq_len=4), r"max_seq_len must be >= 5, got 4"),
        (dict(max_seq_len=48, doc_stride=49), r"doc_stride must be <= max_seq_len \(48\), got 49"),
        (dict(doc_stride=-1), r"doc_stride must be >= 0, got -1"),
    ],
)
def test_out_of_range_parameters(qa, params, match):
    task = qa()[0]
    with pytest.raises(InvalidInput, match=match):
        task.prepare([QAItem(*SHORT[0])], QAParams(**params))


@pytest.mark.parametrize(
    "params", [dict(top_k=0), dict(max_answer_len=0), dict(max_seq_len=48, doc_stride=49)]
)
def test_the_pipeline_rejects_those_parameters_too(qa, params):
    pipe = qa()[2]
    with pytest.raises(ValueError):
        pipe(question=LONG_QUESTION, context=long_context(0, 100), **params)


def test_question_too_long_for_max_seq_len(qa):
    task, _, pipe = qa()
    question = " ".join([LONG_QUESTION] * 6)
    context = long_context(9, 100)
    n_question = len(task.tokenizer.encode(question)[0].ids) - 2
    max_seq_len = n_question + 3  # no room left for a single context token
    with pytest.raises(
        InvalidInput, match=rf"question is too long: it takes {n_question} tokens.*={max_seq_len}"
    ):
        task.prepare([QAItem(question, context)], QAParams(max_seq_len=max_seq_len, doc_stride=0))
    # transformers fails there with a tokenizer error instead of an answer.
    with pytest.raises(Exception, match="Truncation error"):
        pipe(question=question, context=context, max_seq_len=max_seq_len, doc_stride=0)
    # One token of room is enough for both.
    check(qa, "shallow-0", [(question, context)], max_seq_len=max_seq_len + 1, doc_stride=0)


def test_doc_stride_too_large_for_the_room_left_by_the_question(qa):
    # transformers' tokenizer panics there ("stride must be strictly less than max_len").
    task = qa()[0]
    context = long_context(10, 100)
    n_question = len(task.tokenizer.encode(LONG_QUESTION)[0].ids) - 2
    room = 48 - 3 - n_question
    with pytest.raises(InvalidInput, match=rf"doc_stride must be < {room} .*got {room}"):
        task.prepare([QAItem(LONG_QUESTION, context)], QAParams(max_seq_len=48, doc_stride=room))
    check(qa, "shallow-0", [(LONG_QUESTION, context)], max_seq_len=48, doc_stride=room - 1)
