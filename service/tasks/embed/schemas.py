"""The embedding family's HTTP requests and answers: text-embeddings-inference's `POST /embed`, OpenAI's
`POST /v1/embeddings` and the Inference API's sentence-similarity (`POST /similarity`).

Only shapes and field checks live here; what each field means for the model is the tasks' (dense.py).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..base import TruncationDirection, model_field

_STRICT = ConfigDict(extra="forbid")


class EmbedRequest(BaseModel):
    """text-embeddings-inference's `POST /embed` (also what huggingface_hub's feature_extraction sends)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "What is Deep Learning?"},
                {"inputs": ["first text", "second text"], "normalize": False, "truncate": True},
            ]
        },
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.", min_length=1)
    normalize: StrictBool = Field(True, description="L2-normalize each embedding.")
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Keep the first n values of each embedding (then normalize), as TEI's."
    )
    truncate: StrictBool | None = Field(
        None,
        description="Cut inputs over the model's limit; false: such an input is a 413; by default the "
        "server's --auto-truncate (true unless set otherwise).",
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="Which end to cut when truncating: right (the end) or left (the beginning)."
    )
    prompt_name: str | None = Field(
        None,
        description="A prompt of the model (config_sentence_transformers.json) to prepend; default: "
        "the model's default prompt, if any.",
    )
    model: str | None = model_field()

    def items(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI's `POST /v1/embeddings` body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": "The food was delicious.", "model": "albert"},
                {"input": ["one", "two"], "model": "albert", "encoding_format": "base64", "dimensions": 64},
            ]
        },
    )
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A text, a list of texts, or token ids (a list, or a list of lists) used as given.",
        min_length=1,
    )
    model: str | None = Field(
        None,
        description="The model to answer (GET /models lists them), echoed in the answer; by default the "
        "task's default model.",
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="Keep the first n values of each embedding, re-normalized."
    )
    user: str | None = Field(None, description="Ignored.")

    def items(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(x, int) for x in self.input):
            return [list(self.input)]
        return list(self.input)


def encode_base64(vector) -> str:
    """What the openai client decodes: np.frombuffer(base64.b64decode(s), dtype="float32")."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def openai_response(
    vectors: list, *, model: str, prompt_tokens: int, encoding_format: str = "float"
) -> dict[str, Any]:
    """The OpenAI embeddings answer for `vectors` (in input order)."""
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_base64(vector)
            if encoding_format == "base64"
            else [float(x) for x in np.asarray(vector, dtype=np.float32)],
        }
        for index, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)},
    }


class SimilarityInputs(BaseModel):
    model_config = _STRICT
    source_sentence: str = Field(description="The sentence the others are compared with.")
    sentences: list[str] = Field(description="The sentences to compare.", min_length=1)


class SimilarityParameters(BaseModel):
    model_config = _STRICT
    prompt_name: str | None = Field(None, description="A prompt of the model to prepend to every sentence.")
    truncate: StrictBool | None = Field(
        None,
        description="Cut sentences over the limit; false: a 413; by default the server's --auto-truncate.",
    )
    truncation_direction: TruncationDirection = Field("right", description="Which end to cut.")


class SimilarityRequest(BaseModel):
    """The Inference API's sentence-similarity: one cosine similarity per sentence."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": {
                        "source_sentence": "That is a happy person",
                        "sentences": ["That is a happy dog", "Today is a sunny day"],
                    }
                }
            ]
        },
    )
    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None
    model: str | None = model_field()

    def items(self) -> list[str]:
        """The source sentence first, then the sentences: embed them all, then
        cosine_similarities(vectors[0], vectors[1:])."""
        return [self.inputs.source_sentence, *self.inputs.sentences]
