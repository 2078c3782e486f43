"""Extractive question answering, answering exactly as transformers 4.57's `question-answering` pipeline.

The story, in the pipeline's order (`transformers/pipelines/question_answering.py`, fast-tokenizer path):

1. prepare: the pair (question, context) is tokenized question first with `only_second` truncation to
   `max_seq_len`; a context that does not fit overflows into further windows overlapping by `doc_stride`
   tokens. Each window is one `ModelInput`. Only context tokens and `[CLS]` (the null answer) may be
   part of an answer (`p_mask`).
2. finish, per window: start and end logits outside the answerable tokens are set to -10000, each is
   softmaxed over the window, `start[i] * end[j]` scores every span `i <= j < i + max_answer_len`, and
   the best candidates are kept (`select_starts_ends` / `decode_spans`, copied with their numpy calls so
   that ties and float32 rounding fall the same way).
3. finish, per item: candidate spans become character offsets into the caller's context (the whole word
   around each token with `align_to_words`); answers with the same text (case-insensitively) from any
   window have their scores summed; the null answer joins when `handle_impossible_answer`; the best
   `top_k` come back, a bare dict when there is only one.

`max_question_len` only matters to the pipeline's slow-tokenizer path (`squad_convert_examples_to_features`);
ALBERT always runs with a fast tokenizer there, so the question is never cut and the parameter has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from tokenizers import Encoding

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput
from .base import (
    STRICT,
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    as_list,
    check_text,
    check_top_k,
    model_field,
    where,
)

# The pipeline's defaults: max_seq_len = min(model max, 384), doc_stride = min(max_seq_len // 2, 128).
DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_DOC_STRIDE = 128
# select_starts_ends starts from this "no null answer seen yet" score.
_NO_NULL_SCORE = 1000000
CONTEXT_SEQUENCE = 1  # question first: the context is the pair's second sequence


@dataclass(frozen=True)
class QAItem:
    question: str
    context: str


@dataclass(frozen=True)
class QAParams:
    """The pipeline's parameters; None means the pipeline's own default (which depends on the model)."""

    top_k: int = 1
    doc_stride: int | None = None
    max_answer_len: int = 15
    max_seq_len: int | None = None
    max_question_len: int = 64  # no effect with a fast tokenizer, as in the pipeline (see module doc)
    handle_impossible_answer: bool = False
    align_to_words: bool = True


@dataclass(frozen=True)
class _Window:
    """What post-processing needs of one model input."""

    item: int  # index into the request's items
    encoding: Encoding  # the tokenizer's window: offsets and word ids into the original strings
    answerable: np.ndarray  # int64 [L]: 1 for context tokens and [CLS], 0 for question and [SEP]


@dataclass(frozen=True)
class _Plan:
    items: list[QAItem]
    windows: list[_Window]  # one per model input, same order
    params: QAParams  # with max_seq_len and doc_stride resolved


class QuestionAnsweringTask:
    name = "qa"

    def __init__(self, tokenizer: AlbertTokenizer, model_max_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self._special_tokens = tokenizer.num_special_tokens_to_add(pair=True)  # [CLS] q [SEP] c [SEP]

    # ------------------------------------------------------------------ pre-processing

    def resolve(self, params: QAParams) -> QAParams:
        """Validate the parameters and fill in the defaults that depend on the model."""
        if params.top_k < 1:
            raise InvalidInput(f"top_k must be >= 1, got {params.top_k}")
        if params.max_answer_len < 1:
            raise InvalidInput(f"max_answer_len must be >= 1, got {params.max_answer_len}")
        max_seq_len = params.max_seq_len
        if max_seq_len is None:
            max_seq_len = min(self.model_max_length, DEFAULT_MAX_SEQ_LEN)
        if max_seq_len > self.model_max_length:
            raise InvalidInput(
                f"max_seq_len must be <= {self.model_max_length} (the model's maximum sequence length), "
                f"got {max_seq_len}"
            )
        # Room for [CLS] q [SEP] c [SEP] with at least one token each.
        if max_seq_len < self._special_tokens + 2:
            raise InvalidInput(f"max_seq_len must be >= {self._special_tokens + 2}, got {max_seq_len}")
        doc_stride = params.doc_stride
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, DEFAULT_DOC_STRIDE)
        if doc_stride < 0:
            raise InvalidInput(f"doc_stride must be >= 0, got {doc_stride}")
        if doc_stride > max_seq_len:
            raise InvalidInput(f"doc_stride must be <= max_seq_len ({max_seq_len}), got {doc_stride}")
        return replace(params, max_seq_len=max_seq_len, doc_stride=doc_stride)

    def prepare(self, items: list[QAItem], params: QAParams) -> Prepared:
        params = self.resolve(params)
        model_inputs: list[ModelInput] = []
        windows: list[_Window] = []
        for index, item in enumerate(items):
            where = f"inputs[{index}]" if len(items) > 1 else "inputs"  # how the caller names this item
            for encoding in self._windows(item, params, where):
                model_inputs.append(
                    ModelInput(
                        input_ids=np.asarray(encoding.ids, dtype=np.int32),  # [L]
                        token_type_ids=np.asarray(encoding.type_ids, dtype=np.int32),  # [L]
                    )
                )
                windows.append(_Window(index, encoding, self._answerable(encoding)))
        return Prepared(model_inputs=model_inputs, context=_Plan(list(items), windows, params))

    def _windows(self, item: QAItem, params: QAParams, where: str) -> list[Encoding]:
        for field_name in ("question", "context"):
            text = getattr(item, field_name)
            if not text.strip():
                received = "an empty string" if not text else f"only whitespace ({len(text)} characters)"
                raise InvalidInput(f"{where}.{field_name} must contain non-whitespace text, got {received}")
        max_seq_len, doc_stride = params.max_seq_len, params.doc_stride
        whole = self.tokenizer.encode(item.question, item.context)[0]
        if len(whole.ids) <= max_seq_len:
            return [whole]  # what truncation gives too: it leaves a pair that fits untouched
        # Checked here because the tokenizer fails on these inputs: transformers raises a tokenizer error
        # ("sequence to truncate too short") or a Rust panic ("stride must be strictly less than").
        question_tokens = whole.sequence_ids.count(0)
        room = max_seq_len - self._special_tokens - question_tokens  # context tokens per window
        if room <= 0:
            raise InvalidInput(
                f"{where}.question is too long: it takes {question_tokens} tokens, which with "
                f"{self._special_tokens} special tokens leaves no room for the context within "
                f"max_seq_len={max_seq_len}"
            )
        if doc_stride >= room:
            raise InvalidInput(
                f"doc_stride must be < {room} for {where} (the context tokens that fit in each window: "
                f"max_seq_len={max_seq_len} - {question_tokens} question tokens - {self._special_tokens} "
                f"special tokens), got {doc_stride}"
            )
        return self.tokenizer.encode(
            item.question, item.context, max_length=max_seq_len, truncation="only_second", stride=doc_stride
        )

    def _answerable(self, encoding: Encoding) -> np.ndarray:
        # p_mask of the pipeline, inverted: context tokens, plus every [CLS] (kept for the null answer).
        sequence_ids = np.asarray([-1 if s is None else s for s in encoding.sequence_ids])  # [L]
        ids = np.asarray(encoding.ids)  # [L]
        return ((sequence_ids == CONTEXT_SEQUENCE) | (ids == self.tokenizer.cls_token_id)).astype(np.int64)

    # ------------------------------------------------------------------ post-processing

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list:
        plan: _Plan = prepared.context
        per_item: list[list[tuple[_Window, dict[str, np.ndarray]]]] = [[] for _ in plan.items]
        for window, output in zip(plan.windows, outputs, strict=True):
            per_item[window.item].append((window, output))
        return [
            self._answer(item, pairs, plan.params) for item, pairs in zip(plan.items, per_item, strict=True)
        ]

    def _answer(self, item: QAItem, windows: list[tuple[_Window, dict]], params: QAParams):
        min_null_score = _NO_NULL_SCORE
        answers: list[dict] = []
        by_text: dict[str, dict] = {}  # lower-cased answer -> the first answer with that text
        # align_to_words may map several candidates onto the same word: ask for more to keep top_k.
        pre_top_k = params.top_k * 2 + 10 if params.align_to_words else params.top_k
        for window, output in windows:
            starts, ends, scores, min_null_score = select_starts_ends(
                np.asarray(output["start_logits"], dtype=np.float32),
                np.asarray(output["end_logits"], dtype=np.float32),
                window.answerable,
                min_null_score,
                pre_top_k,
                params.handle_impossible_answer,
                params.max_answer_len,
            )
            for s, e, score in zip(starts, ends, scores, strict=True):
                start, end = char_span(window.encoding, s, e, params.align_to_words)
                text = item.context[start:end]
                # The same text from another span or window: the pipeline adds up the scores
                # (matching case-insensitively) and keeps the first one's offsets.
                same = by_text.get(text.lower())
                if same is not None:
                    same["score"] += score.item()
                else:
                    answer = {"score": score.item(), "start": start, "end": end, "answer": text}
                    answers.append(answer)
                    by_text[text.lower()] = answer
        if params.handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda a: a["score"], reverse=True)[: params.top_k]
        return answers[0] if len(answers) == 1 else answers


def char_span(encoding: Encoding, s, e, align_to_words: bool) -> tuple[int, int]:
    """Character offsets in the context of the token span s..e: the pipeline's `get_indices`."""
    if align_to_words:
        try:
            # A token may sit in the middle of a word: widen to the words holding the first and last token.
            start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=CONTEXT_SEQUENCE)[0]
            end = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=CONTEXT_SEQUENCE)[1]
            return start, end
        except Exception:
            pass  # no word for a token ([CLS]): the pipeline falls back to the token offsets
    return encoding.offsets[s][0], encoding.offsets[e][1]


def select_starts_ends(
    start_logits: np.ndarray,  # float32 [L]
    end_logits: np.ndarray,  # float32 [L]
    answerable: np.ndarray,  # int64 [L]
    min_null_score: float,
    top_k: int,
    handle_impossible_answer: bool,
    max_answer_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The pipeline's `select_starts_ends` for one unpadded window (a batch of one, as it runs)."""
    undesired_tokens = answerable[None]  # [1, L]: despite the name, 1 = may be in the answer
    undesired_tokens_mask = undesired_tokens == 0
    # Tokens that cannot be in the answer must not take part in the softmax.
    start = np.where(undesired_tokens_mask, -10000.0, start_logits[None])  # [1, L] float32
    end = np.where(undesired_tokens_mask, -10000.0, end_logits[None])  # [1, L] float32

    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()

    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())

    # [CLS] is never part of a span answer.
    start[0, 0] = end[0, 0] = 0.0

    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired_tokens)
    return starts, ends, scores, min_null_score


def decode_spans(
    start: np.ndarray,  # float32 [1, L]
    end: np.ndarray,  # float32 [1, L]
    topk: int,
    max_answer_len: int,
    undesired_tokens: np.ndarray,  # int64 [1, L]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pipeline's `decode_spans`, line for line: the same numpy calls pick the same tied candidates."""
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))  # [1, L, L]
    # Zero out spans that end before they start or are longer than max_answer_len.
    candidates = np.tril(np.triu(outer), max_answer_len - 1)  # [1, L, L]

    scores_flat = candidates.flatten()  # [L * L]
    if topk == 1:
        idx_sort = [np.argmax(scores_flat)]
    elif len(scores_flat) < topk:
        idx_sort = np.argsort(-scores_flat)
    else:
        idx = np.argpartition(-scores_flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-scores_flat[idx])]

    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    # nonzero() of the 2-D mask also yields its row indices (all 0), so index 0 always passes, as in the
    # pipeline; it is [CLS], answerable anyway.
    desired_spans = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts = starts[desired_spans]
    ends = ends[desired_spans]
    scores = candidates[0, starts, ends]
    return starts, ends, scores


# --- The HTTP request and answer ------------------------------------------------------------------------


class QAInput(BaseModel):
    model_config = STRICT
    question: str
    context: str


class QAParameters(BaseModel):
    model_config = STRICT
    top_k: StrictInt = Field(1, ge=1, description="How many answers; above 1 the answer is a list.")
    doc_stride: StrictInt | None = Field(
        None,
        ge=1,
        description="Overlap between context windows, in tokens (default min(128, max_seq_len // 2)).",
    )
    max_answer_len: StrictInt = Field(15, ge=1, description="Longest answer, in tokens.")
    max_seq_len: StrictInt | None = Field(
        None, ge=1, description="Window length, question included (default min(384, the model's maximum))."
    )
    max_question_len: StrictInt = Field(64, ge=1, description="Longest question, in tokens.")
    handle_impossible_answer: StrictBool = Field(False, description="Allow the empty answer.")
    align_to_words: StrictBool = Field(True, description="Widen answers to whole words.")


class QARequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": {
                        "question": "Where was Albert Einstein born?",
                        "context": "Albert Einstein was born in Ulm, in the Kingdom of Württemberg, in 1879.",
                    }
                },
                {
                    "inputs": {
                        "question": "Who wrote it?",
                        "context": "The book was written by Mary Shelley.",
                    },
                    "parameters": {"top_k": 3, "handle_impossible_answer": True},
                },
            ]
        },
    )
    inputs: QAInput | list[QAInput] = Field(description="A question with its context, or a list of them.")
    parameters: QAParameters = Field(default_factory=QAParameters)
    model: str | None = model_field()


class QAAnswer(BaseModel):
    score: float
    start: int
    end: int
    answer: str


QAResponse = QAAnswer | list[QAAnswer] | list[QAAnswer | list[QAAnswer]]


def decode(body: QARequest, settings) -> Decoded:
    inputs, single = as_list(body.inputs, settings.max_list_items)
    items = []
    for i, value in enumerate(inputs):
        at = where(i, single)
        items.append(
            QAItem(check_text(value.question, f"{at}.question"), check_text(value.context, f"{at}.context"))
        )
    p = body.parameters
    check_top_k(p.top_k, settings.max_top_k)
    params = QAParams(
        top_k=p.top_k,
        doc_stride=p.doc_stride,
        max_answer_len=p.max_answer_len,
        max_seq_len=p.max_seq_len,
        max_question_len=p.max_question_len,
        handle_impossible_answer=p.handle_impossible_answer,
        align_to_words=p.align_to_words,
    )
    return Decoded(items, params, single)


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> QuestionAnsweringTask:
    return QuestionAnsweringTask(tokenizer, max_length)


TASK = ModelTask(
    name="qa",
    head="question-answering",
    architectures=("AlbertForQuestionAnswering",),
    default_for=("AlbertForQuestionAnswering",),
    program="tokens",
    build=build,
    endpoints=(
        Endpoint(
            path="/qa",
            summary="Extractive question answering over contexts of any length, as the question-answering "
            "pipeline.",
            request=QARequest,
            response=QAResponse,
            decode=decode,
        ),
    ),
)
