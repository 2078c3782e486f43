"""Every endpoint and parameter over HTTP (httpx against the app), compared with the transformers pipelines.

This runs the real serving path: tokenization, packing into compiled buckets, the JAX forward pass and
post-processing. Labels, tokens, spans and offsets must be equal; scores within 1e-4.
"""

from __future__ import annotations

import warnings

import pytest
from compare import assert_matches_pipeline

SENTENCE = "John Smith works for Microsoft in Paris, and Maria Müller met George at the Berlin museum."
UNICODE = "François et José visitèrent Zürich, São Paulo et München — café crème, naïve façade, 日本語 🙂!"
LONG = " ".join(
    f"In {year} the engineer {name} travelled from {city} to the capital to teach at the university."
    for year, name, city in zip(
        range(1901, 1931),
        ["Anna", "Peter", "Maria", "George", "Linda", "Thomas"] * 5,
        ["Rome", "Tokyo", "Madrid"] * 10,
        strict=True,
    )
)
CONTEXT = (
    "Albert Einstein was born in Ulm, in Germany, in 1879. He worked in Berlin and later in Princeton, "
    "where he taught at the university until his death in 1955. Marie Curie worked in Paris."
)


def reference(pipe, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(*args, **kwargs)


def post(client, path: str, body: dict):
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- /classify -----------------------------------------------------------------------------------------

CLASSIFY_CASES = {
    "default-all-labels": ({"inputs": SENTENCE}, lambda p: reference(p, SENTENCE, top_k=None)),
    "top_k=1": ({"inputs": SENTENCE, "parameters": {"top_k": 1}}, lambda p: reference(p, SENTENCE, top_k=1)),
    "top_k=2": ({"inputs": UNICODE, "parameters": {"top_k": 2}}, lambda p: reference(p, UNICODE, top_k=2)),
    "top_k>labels": (
        {"inputs": SENTENCE, "parameters": {"top_k": 10}},
        lambda p: reference(p, SENTENCE, top_k=10),
    ),
    "sigmoid": (
        {"inputs": SENTENCE, "parameters": {"function_to_apply": "sigmoid"}},
        lambda p: reference(p, SENTENCE, top_k=None, function_to_apply="sigmoid"),
    ),
    "none": (
        {"inputs": SENTENCE, "parameters": {"function_to_apply": "none"}},
        lambda p: reference(p, SENTENCE, top_k=None, function_to_apply="none"),
    ),
    "softmax": (
        {"inputs": UNICODE, "parameters": {"function_to_apply": "softmax"}},
        lambda p: reference(p, UNICODE, top_k=None, function_to_apply="softmax"),
    ),
    "pair": (
        {"inputs": {"text": "Where is Paris?", "text_pair": "Paris is in France."}},
        lambda p: reference(p, {"text": "Where is Paris?", "text_pair": "Paris is in France."}, top_k=None),
    ),
    "list": (
        {"inputs": ["good film", {"text": "a", "text_pair": "b c"}, UNICODE], "parameters": {"top_k": 2}},
        lambda p: [
            reference(p, "good film", top_k=2),
            reference(p, {"text": "a", "text_pair": "b c"}, top_k=2),
            reference(p, UNICODE, top_k=2),
        ],
    ),
    "long-truncated": ({"inputs": LONG}, lambda p: reference(p, LONG, top_k=None, truncation=True)),
}


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify(client, pipelines, case):
    body, expected = CLASSIFY_CASES[case]
    assert_matches_pipeline(post(client, "/classify", body), expected(pipelines["classify"]))


# --- /fill-mask ----------------------------------------------------------------------------------------

FILL_MASK_CASES = {
    "default": ("The capital of France is [MASK].", {}),
    "top_k=1": ("John Smith works for [MASK] in Paris.", {"top_k": 1}),
    "top_k=12": ("The [MASK] is beautiful today.", {"top_k": 12}),
    "targets": ("The city of [MASK] is large.", {"targets": ["paris", "london", "tokyo"]}),
    "target-out-of-vocabulary": ("I like [MASK].", {"targets": ["zyxwvut", "paris"], "top_k": 2}),
    "single-target-string": ("I like [MASK].", {"targets": "paris"}),
    "two-masks": ("[MASK] is the capital of [MASK].", {"top_k": 3}),
    "three-masks-glued": ("Paris[MASK] is[MASK]the capital of [MASK]!", {"top_k": 2}),
    "unicode": ("François visited Zürich and [MASK] café crème.", {}),
}


@pytest.mark.parametrize("case", list(FILL_MASK_CASES))
def test_fill_mask(client, pipelines, case):
    text, parameters = FILL_MASK_CASES[case]
    ours = post(client, "/fill-mask", {"inputs": text, "parameters": parameters})
    assert_matches_pipeline(ours, reference(pipelines["fill-mask"], text, **parameters))


def test_fill_mask_list(client, pipelines):
    texts = ["A [MASK] day.", "[MASK] and [MASK] went to Paris.", UNICODE + " [MASK]"]
    ours = post(client, "/fill-mask", {"inputs": texts, "parameters": {"top_k": 3}})
    assert_matches_pipeline(ours, [reference(pipelines["fill-mask"], t, top_k=3) for t in texts])


def test_fill_mask_many_masks(client, pipelines):
    text = " ".join(["[MASK]"] * 40) + " end."
    ours = post(client, "/fill-mask", {"inputs": text, "parameters": {"top_k": 2}})
    assert_matches_pipeline(ours, reference(pipelines["fill-mask"], text, top_k=2))


# --- /qa -----------------------------------------------------------------------------------------------

QA_CASES = {
    "default": ("Where was Einstein born?", CONTEXT, {}),
    "top_k=3": ("Where did Einstein work?", CONTEXT, {"top_k": 3}),
    "max_answer_len=3": ("When did he die?", CONTEXT, {"max_answer_len": 3, "top_k": 2}),
    "impossible": ("Who is the president?", CONTEXT, {"handle_impossible_answer": True, "top_k": 2}),
    "no-align": ("Where did Curie work?", CONTEXT, {"align_to_words": False, "top_k": 2}),
    "max_question_len": ("Where was Einstein born?", CONTEXT, {"max_question_len": 4}),
    "windows-48-16": ("Who travelled to Tokyo?", LONG, {"max_seq_len": 48, "doc_stride": 16, "top_k": 3}),
    "windows-defaults": ("Who taught at the university?", LONG, {"top_k": 2}),
    "unicode": ("Qui a visité Zürich?", UNICODE, {"top_k": 2}),
    "spaces": ("where  is  it?", "The  museum \n\n is   in\tBerlin ,  near  the  river .", {}),
}


@pytest.mark.parametrize("case", list(QA_CASES))
def test_qa(client, pipelines, case):
    question, context, parameters = QA_CASES[case]
    ours = post(
        client, "/qa", {"inputs": {"question": question, "context": context}, "parameters": parameters}
    )
    expected = reference(pipelines["qa"], question=question, context=context, **parameters)
    assert_matches_pipeline(ours, expected)
    for answer in ours if isinstance(ours, list) else [ours]:
        assert context[answer["start"] : answer["end"]] == answer["answer"]


def test_qa_list(client, pipelines):
    items = [("Where was Einstein born?", CONTEXT), ("Who travelled to Rome?", LONG)]
    body = {"inputs": [{"question": q, "context": c} for q, c in items], "parameters": {"top_k": 2}}
    ours = post(client, "/qa", body)
    assert_matches_pipeline(
        ours, [reference(pipelines["qa"], question=q, context=c, top_k=2) for q, c in items]
    )


# --- /ner ----------------------------------------------------------------------------------------------

NER_CASES = {
    f"{strategy}-{name}": (text, {"aggregation_strategy": strategy})
    for strategy in ("none", "simple", "first", "average", "max")
    for name, text in (("sentence", SENTENCE), ("unicode", UNICODE))
}
NER_CASES.update(
    {
        "default": (SENTENCE, {}),
        "ignore-nothing": (SENTENCE, {"ignore_labels": []}),
        "ignore-custom": (
            UNICODE,
            {"ignore_labels": ["O", "B-PER", "I-PER"], "aggregation_strategy": "first"},
        ),
        "stride-simple": (LONG, {"stride": 16}),
        "stride-max": (LONG, {"stride": 32, "aggregation_strategy": "max"}),
        "stride-average": (LONG, {"stride": 8, "aggregation_strategy": "average"}),
        "long-truncated": (LONG, {"aggregation_strategy": "first"}),
    }
)


@pytest.mark.parametrize("case", list(NER_CASES))
def test_ner(client, pipelines, case):
    text, parameters = NER_CASES[case]
    ours = post(client, "/ner", {"inputs": text, "parameters": parameters})
    kwargs = dict(parameters)
    kwargs.setdefault("aggregation_strategy", "simple")
    assert_matches_pipeline(ours, reference(pipelines["ner"], text, **kwargs))


def test_ner_list(client, pipelines):
    texts = [SENTENCE, "Anna lives in Rome.", UNICODE]
    ours = post(client, "/ner", {"inputs": texts, "parameters": {"aggregation_strategy": "average"}})
    assert_matches_pipeline(
        ours, [reference(pipelines["ner"], t, aggregation_strategy="average") for t in texts]
    )


def test_ner_entities_are_not_all_trivial(client):
    # Guards the comparison above: a model that tags nothing would make it vacuous.
    answer = post(client, "/ner", {"inputs": SENTENCE, "parameters": {"aggregation_strategy": "none"}})
    assert len({entity["entity"] for entity in answer}) >= 2
