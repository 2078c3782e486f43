"""Request and response models of the four task endpoints (Hugging Face Inference API task shapes).

Every parameter's meaning and default follows the transformers 4.57 pipelines (see CONTRACT.md). Unknown
fields are refused, so a misspelt parameter is a 422 rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

_STRICT = ConfigDict(extra="forbid")


# --- /classify ------------------------------------------------------------------------------------------


class TextPair(BaseModel):
    model_config = _STRICT
    text: str = Field(description="The text to classify.")
    text_pair: str | None = Field(None, description="An optional second text (sentence-pair classification).")


class ClassifyParameters(BaseModel):
    model_config = _STRICT
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


class LabelScore(BaseModel):
    label: str
    score: float


ClassifyResponse = list[LabelScore] | list[list[LabelScore]]


# --- /fill-mask ----------------------------------------------------------------------------------------


class FillMaskParameters(BaseModel):
    model_config = _STRICT
    top_k: StrictInt = Field(5, ge=1, description="How many candidates per mask.")
    targets: str | list[str] | None = Field(
        None,
        description="Only score these words (a word not in the vocabulary is scored by its first sub-token).",
    )


class FillMaskRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "The capital of France is [MASK]."},
                {"inputs": "Paris is the [MASK] of [MASK].", "parameters": {"top_k": 3}},
                {"inputs": "I feel [MASK] today.", "parameters": {"targets": ["happy", "sad"]}},
            ]
        },
    )
    inputs: str | list[str] = Field(description="Text with one or more mask tokens, or a list of such texts.")
    parameters: FillMaskParameters = Field(default_factory=FillMaskParameters)


class MaskCandidate(BaseModel):
    score: float
    token: int
    token_str: str
    sequence: str


# One text: a list of candidates, or one list per mask when it has several masks.
FillMaskAnswer = list[MaskCandidate] | list[list[MaskCandidate]]
FillMaskResponse = FillMaskAnswer | list[FillMaskAnswer]


# --- /qa ------------------------------------------------------------------------------------------------


class QAInput(BaseModel):
    model_config = _STRICT
    question: str
    context: str


class QAParameters(BaseModel):
    model_config = _STRICT
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


class QAAnswer(BaseModel):
    score: float
    start: int
    end: int
    answer: str


QAResponse = QAAnswer | list[QAAnswer] | list[QAAnswer | list[QAAnswer]]


# --- /ner -----------------------------------------------------------------------------------------------


class NERParameters(BaseModel):
    model_config = _STRICT
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="How tokens are grouped into entities."
    )
    ignore_labels: list[str] | None = Field(None, description='Labels to leave out (default ["O"]).')
    stride: StrictInt | None = Field(
        None,
        ge=0,
        description="Overlap between windows over a long text; without it, long texts are truncated.",
    )


class NERRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "My name is Sarah and I live in London."},
                {"inputs": "Angela Merkel visited Paris.", "parameters": {"aggregation_strategy": "first"}},
            ]
        },
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.")
    parameters: NERParameters = Field(default_factory=NERParameters)


class Entity(BaseModel):
    entity_group: str
    score: float
    word: str
    start: int | None
    end: int | None


class TokenEntity(BaseModel):
    entity: str
    score: float
    index: int
    word: str
    start: int | None
    end: int | None


NERAnswer = list[Entity] | list[TokenEntity]
NERResponse = NERAnswer | list[NERAnswer]


# --- errors and operations ---------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, with the limit and the value received.")
    error_type: str = Field(description="The kind of error (validation_error, payload_too_large, ...).")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: bool
    draining: bool
    endpoints: dict[str, dict]
    pending: str | None = None
