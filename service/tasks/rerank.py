"""rerank: score texts against a query with a cross-encoder, as text-embeddings-inference's `/rerank`.

A cross-encoder is a sequence classifier with exactly one label. Each (query, text) is encoded as a text
pair, `[CLS] query [SEP] text [SEP]`, and run through the classify program (per pair {"logits": [1]});
the score is sigmoid(logit) in float32 (TEI's `1 / (1 + exp(-x))`), or the logit itself with
`raw_scores`. The answer is `[{"index", "score"(, "text")}]` sorted best first; equal scores come out as
TEI orders them (a stable ascending sort, reversed: the later index first).

Length, as TEI's tokenizer worker: without `truncate`, a pair longer than the model's maximum is a 413
naming the limit and the length; with `truncate`, the pair is cut to the maximum with the tokenizers
library's "longest_first" strategy (TEI's `TruncationStrategy::LongestFirst`: tokens come off the longer
of query and text, one at a time, so both keep about the same length when both are long), from the end
(`truncation_direction` "right", the default) or from the start ("left").

Stricter than TEI: an empty or whitespace-only query or text is a 422 (TEI only refuses a pair where both
are empty), as on the other endpoints, and so is an empty `texts` list (TEI answers that with its
validation error, a 413).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from tokenizers import Encoding, Tokenizer

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput, PayloadTooLarge, ServiceError
from .base import (
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    TruncationDirection,
    as_list,
    check_client_batch,
    check_text,
    truncate_or_default,
)

DEFAULT_MAX_TEXTS = 64  # the service's max_list_items default; pass the setting


# --- request schema (service/api/schemas.py style) -----------------------------------------------------


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "What is Deep Learning?",
                    "texts": ["Deep Learning is a branch of machine learning.", "Paris is in France."],
                },
                {
                    "query": "capital of France",
                    "texts": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "return_text": True,
                    "raw_scores": True,
                    "truncate": True,
                },
            ]
        },
    )
    query: str = Field(description="The query every text is scored against.")
    texts: list[str] = Field(description="The texts to rank.")
    raw_scores: StrictBool = Field(False, description="Return the model's logit instead of its sigmoid.")
    return_text: StrictBool = Field(False, description="Include each text in its entry.")
    truncate: StrictBool | None = Field(
        None,
        description="Cut pairs longer than the model's maximum; false: a too-long pair is a 413; null or "
        "absent: the server's --auto-truncate (true unless set otherwise).",
    )
    # TEI's OpenAPI document spells the values "Left"/"Right" and defaults to "right": both are accepted.
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end of the pair loses tokens when truncating."
    )
    model: str | None = Field(None, description="Which served model to use (default: the endpoint's).")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


RerankResponse = list[Rank]


# --- the task ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RerankItem:
    query: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class RerankParams:
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False
    truncation_direction: str = "right"  # "right" | "left" (any case)


@dataclass
class _Context:
    items: list[RerankItem]
    raw_scores: bool
    return_text: bool


def _sigmoid(logit: np.ndarray) -> np.ndarray:
    # TEI's f32 `1.0 / (1.0 + (-x).exp())`.
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-logit))


class RerankTask:
    name = "rerank"

    def __init__(
        self,
        tokenizer: AlbertTokenizer,
        model_max_length: int,
        num_labels: int,
        *,
        max_texts: int = DEFAULT_MAX_TEXTS,
    ):
        if num_labels != 1:
            raise ValueError(
                f"rerank needs a cross-encoder: a sequence classifier with exactly one label; this model has "
                f"{num_labels} labels"
            )
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.max_texts = max_texts
        self._left: tuple[Tokenizer, threading.Lock] | None = None
        self._left_lock = threading.Lock()

    # --- pre-processing

    def prepare(self, items: list[RerankItem], params: RerankParams) -> Prepared:
        direction = params.truncation_direction.lower()
        if direction not in ("left", "right"):
            raise InvalidInput(
                f"truncation_direction must be left or right, got {params.truncation_direction!r}"
            )
        model_inputs = []
        for item in items:
            if not item.query.strip():
                raise InvalidInput("query must not be empty or whitespace-only")
            if not item.texts:
                raise InvalidInput("texts must not be empty")
            if len(item.texts) > self.max_texts:
                raise PayloadTooLarge(f"texts has {len(item.texts)} items; the limit is {self.max_texts}")
            for index, text in enumerate(item.texts):
                if not text.strip():
                    raise InvalidInput(f"texts[{index}] must not be empty or whitespace-only")
                model_inputs.append(self._encode(item.query, text, index, params.truncate, direction))
        context = _Context(items=list(items), raw_scores=params.raw_scores, return_text=params.return_text)
        return Prepared(model_inputs=model_inputs, context=context)

    def _encode(self, query: str, text: str, index: int, truncate: bool, direction: str) -> ModelInput:
        if not truncate:
            encoding = self.tokenizer.encode(query, text)[0]
            if len(encoding.ids) > self.model_max_length:
                raise PayloadTooLarge(
                    f"texts[{index}]: the query and text are {len(encoding.ids)} tokens with the special "
                    f"tokens; the limit is {self.model_max_length} (set truncate to cut them)"
                )
        elif direction == "right":
            encoding = self.tokenizer.encode(query, text, max_length=self.model_max_length)[0]
        else:
            encoding = self._encode_left(query, text)
        return ModelInput(
            input_ids=np.asarray(encoding.ids, dtype=np.int32),  # [L]
            token_type_ids=np.asarray(encoding.type_ids, dtype=np.int32),  # [L]
        )

    def _encode_left(self, query: str, text: str) -> Encoding:
        # The shared tokenizer truncates from the right only; left truncation gets its own copy of the
        # backend (truncation is state of a tokenizers.Tokenizer), as AlbertTokenizer does per setting.
        with self._left_lock:
            if self._left is None:
                backend = self.tokenizer.backend
                copy = Tokenizer.from_str(backend.to_str())
                copy.encode_special_tokens = backend.encode_special_tokens
                copy.enable_truncation(
                    self.model_max_length, stride=0, strategy="longest_first", direction="left"
                )
                self._left = (copy, threading.Lock())
        copy, lock = self._left
        with lock:
            return copy.encode(query, text)

    # --- post-processing

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list[list[dict]]:
        context: _Context = prepared.context
        expected = sum(len(item.texts) for item in context.items)
        if len(outputs) != expected:
            raise ValueError(f"expected {expected} outputs, got {len(outputs)}")
        answers = []
        start = 0
        for item in context.items:
            logits = np.stack(
                [outputs[start + i]["logits"].reshape(-1)[0] for i in range(len(item.texts))]
            ).astype(np.float32, copy=False)  # [T]
            start += len(item.texts)
            scores = logits if context.raw_scores else _sigmoid(logits)  # [T] float32
            if np.isnan(scores).any():
                raise ServiceError("score is NaN")
            # TEI: sort_by(score) (stable, ascending), then reverse.
            order = sorted(range(len(scores)), key=lambda i: scores[i])[::-1]
            ranks = []
            for i in order:
                rank = {"index": i, "score": float(scores[i])}
                if context.return_text:
                    rank["text"] = item.texts[i]
                ranks.append(rank)
            answers.append(ranks)
        return answers


# --- the registry entry ----------------------------------------------------------------------------------


def decode(body: RerankRequest, settings) -> Decoded:
    query = check_text(body.query, "query")
    texts, _ = as_list(body.texts, settings.max_list_items, field="texts")
    check_client_batch(len(texts), settings, "texts")
    texts = [check_text(text, f"texts[{i}]") for i, text in enumerate(texts)]
    params = RerankParams(
        raw_scores=body.raw_scores,
        return_text=body.return_text,
        truncate=truncate_or_default(body.truncate, settings),
        truncation_direction=body.truncation_direction.lower(),
    )
    return Decoded([RerankItem(query, tuple(texts))], params, True)


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> RerankTask:
    # Raises ValueError unless the classifier has exactly one label: the model fails at start-up.
    return RerankTask(tokenizer, max_length, len(config.id2label))


TASK = ModelTask(
    name="rerank",
    head="sequence-classification",
    architectures=("AlbertForSequenceClassification",),
    program="classify",
    build=build,
    endpoints=(
        Endpoint(
            path="/rerank",
            summary="Rerank texts against a query with a cross-encoder (one-label classifier), as "
            "text-embeddings-inference's /rerank.",
            request=RerankRequest,
            response=RerankResponse,
            decode=decode,
        ),
    ),
)
