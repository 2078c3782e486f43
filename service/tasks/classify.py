"""classify: sequence classification, as transformers 4.57's `TextClassificationPipeline`.

Answers have the pipeline's `top_k=None`/`top_k=k` form: a list of {"label", "score"}, best first
(never the legacy single dict). Long inputs are truncated to the model's maximum length, longest
segment first, as the pipeline does when called with `truncation=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput, PayloadTooLarge
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
    item_prefix,
    model_field,
    where,
)

FUNCTIONS = ("softmax", "sigmoid", "none")


@dataclass(frozen=True)
class ClassifyItem:
    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class ClassifyParams:
    top_k: int | None = None  # None = all labels, best first
    function_to_apply: str | None = None  # softmax | sigmoid | none; None = the pipeline's default
    truncate: bool = True  # False (TEI's /predict with truncate false): an input over the limit is a 413


@dataclass
class _Context:
    function: str
    top_k: int | None


# The pipeline's own numpy formulas, so that float32 logits give the same float32 scores.
def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted_exp = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    return shifted_exp / shifted_exp.sum(axis=-1, keepdims=True)


class ClassificationTask:
    name = "classify"

    def __init__(
        self,
        tokenizer: AlbertTokenizer,
        model_max_length: int,
        labels: list[str],
        problem_type: str | None,
    ):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.labels = labels  # labels[i] = config.id2label[i]
        self.default_function = self._default_function(problem_type, len(labels))

    @staticmethod
    def _default_function(problem_type: str | None, num_labels: int) -> str:
        # As `TextClassificationPipeline.postprocess`. Its last resort, a `function_to_apply` attribute
        # of the config, is only reached by a model with no label at all, which cannot be served.
        if problem_type == "regression":
            return "none"
        if problem_type == "multi_label_classification" or num_labels == 1:
            return "sigmoid"
        if problem_type == "single_label_classification" or num_labels > 1:
            return "softmax"
        return "none"

    def prepare(self, items: list[ClassifyItem], params: ClassifyParams) -> Prepared:
        if params.top_k is not None and params.top_k < 1:
            raise InvalidInput(f"top_k must be at least 1 (or null for all labels), got {params.top_k}")
        function = self.default_function
        if params.function_to_apply is not None:
            # The pipeline looks the name up as ClassificationFunction[name.upper()].
            function = params.function_to_apply.upper().lower()
            if function not in FUNCTIONS:
                raise InvalidInput(
                    f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {params.function_to_apply!r}"
                )
        model_inputs = [self._encode(item, i, len(items), params.truncate) for i, item in enumerate(items)]
        return Prepared(model_inputs=model_inputs, context=_Context(function=function, top_k=params.top_k))

    def _encode(self, item: ClassifyItem, index: int, count: int, truncate: bool = True) -> ModelInput:
        if not item.text.strip():
            raise InvalidInput(f"{item_prefix(index, count)}text is empty or only whitespace")
        if item.text_pair is not None and not item.text_pair.strip():
            raise InvalidInput(f"{item_prefix(index, count)}text_pair is empty or only whitespace")
        if truncate:
            encoding = self.tokenizer.encode(item.text, item.text_pair, max_length=self.model_max_length)[0]
        else:
            encoding = self.tokenizer.encode(item.text, item.text_pair)[0]
            if len(encoding.ids) > self.model_max_length:
                raise PayloadTooLarge(
                    f"{item_prefix(index, count)}the input has {len(encoding.ids)} tokens, more than the limit "
                    f"of {self.model_max_length} (send truncate=true to cut it to the limit)"
                )
        return ModelInput(
            input_ids=np.asarray(encoding.ids, dtype=np.int32),  # [L]
            token_type_ids=np.asarray(encoding.type_ids, dtype=np.int32),  # [L]
        )

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list:
        context: _Context = prepared.context
        answers = []
        for output in outputs:
            logits = output["logits"]  # [C]
            if context.function == "softmax":
                scores = _softmax(logits)  # [C]
            elif context.function == "sigmoid":
                scores = _sigmoid(logits)  # [C]
            else:
                scores = logits
            ranked = [{"label": self.labels[i], "score": float(score)} for i, score in enumerate(scores)]
            # A stable sort, as the pipeline's: equal scores keep label order.
            ranked.sort(key=lambda entry: entry["score"], reverse=True)
            answers.append(ranked if context.top_k is None else ranked[: context.top_k])
        return answers


# --- The HTTP request and answer ------------------------------------------------------------------------


class TextPair(BaseModel):
    model_config = STRICT
    text: str = Field(description="The text to classify.")
    text_pair: str | None = Field(None, description="An optional second text (sentence-pair classification).")


class ClassifyParameters(BaseModel):
    model_config = STRICT
    top_k: StrictInt | None = Field(
        None,
        ge=1,
        description="How many labels to return, best first; null (the default) returns all labels.",
    )
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None,
        description="Applied to the logits; by default sigmoid for one label or multi-label models, softmax "
        "otherwise, none for regression (as the pipeline).",
    )


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "I loved this film, the acting was superb."},
                {"inputs": ["Great value.", "Terrible service."], "parameters": {"top_k": 1}},
                {"inputs": {"text": "A man is playing a guitar.", "text_pair": "Someone makes music."}},
            ]
        },
    )
    inputs: str | TextPair | list[str | TextPair] = Field(
        description="A text, a text pair, or a list of them."
    )
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)
    model: str | None = model_field()


class LabelScore(BaseModel):
    label: str
    score: float


ClassifyResponse = list[LabelScore] | list[list[LabelScore]]


def decode(body: ClassifyRequest, settings) -> Decoded:
    inputs, single = as_list(body.inputs, settings.max_list_items)
    items = []
    for i, value in enumerate(inputs):
        at = where(i, single)
        if isinstance(value, TextPair):
            pair = None if value.text_pair is None else check_text(value.text_pair, f"{at}.text_pair")
            items.append(ClassifyItem(check_text(value.text, f"{at}.text"), pair))
        else:
            items.append(ClassifyItem(check_text(value, at)))
    check_top_k(body.parameters.top_k, settings.max_top_k)
    params = ClassifyParams(top_k=body.parameters.top_k, function_to_apply=body.parameters.function_to_apply)
    return Decoded(items, params, single)


def hub_answer(answers: list, decoded: Decoded) -> list:
    # The Inference API answers a single input's label list wrapped in one more list ([[{label, score}]]);
    # InferenceClient.text_classification reads element 0.
    return answers


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> ClassificationTask:
    return ClassificationTask(tokenizer, max_length, list(config.id2label), config.problem_type)


TASK = ModelTask(
    name="classify",
    head="sequence-classification",
    architectures=("AlbertForSequenceClassification",),
    default_for=("AlbertForSequenceClassification",),
    program="classify",
    build=build,
    endpoints=(
        Endpoint(
            path="/classify",
            summary="Text classification (sentence or sentence pair), as the text-classification pipeline.",
            request=ClassifyRequest,
            response=ClassifyResponse,
            decode=decode,
            hub_answer=hub_answer,
        ),
    ),
)
