"""embed: sentence embeddings, as sentence-transformers 5.x's `SentenceTransformer(path).encode(texts)`.

The task's story: the checkpoint is read by layout.py (`read_embedding_config`), its head runs inside the
compiled program (pooling.py's `embedding_fn`), and `EmbedTask` here does the rest: prompts, tokenization
and the 413 for over-long inputs (unless `truncate`, then cut on the side `truncation_direction` says, as
text-embeddings-inference), and `finish` applying `dimensions` and `normalize`. Its routes are `POST /embed`
(TEI), `POST /v1/embeddings` (OpenAI) and `POST /similarity` (the Inference API's sentence-similarity);
their request schemas are in schemas.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.tokenizer import AlbertTokenizer

from ...errors import InvalidInput, PayloadTooLarge
from ..base import (
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    as_list,
    check_client_batch,
    check_text,
    item_prefix,
    truncate_or_default,
    where,
)
from .layout import EmbeddingConfig, EmbeddingConfigError, read_embedding_config
from .pooling import NORMALIZE_EPS
from .schemas import (
    EmbedRequest,
    OpenAIEmbeddingsRequest,
    SimilarityParameters,
    SimilarityRequest,
    openai_response,
)


@dataclass
class EmbedInput(ModelInput):
    """A ModelInput that also says how many of its leading tokens are the prompt ([CLS] included, as
    sentence-transformers counts them); the engine packs these into `prompt_lengths`."""

    prompt_length: int = 0


@dataclass(frozen=True)
class EmbedParams:
    normalize: bool = True  # L2-normalize the answer (TEI's default)
    truncate: bool = False  # False: an input over the limit is a 413
    truncation_direction: str = "right"  # "right" cuts the end, "left" the beginning (specials kept)
    prompt_name: str | None = None  # None: the model's default prompt, if any
    dimensions: int | None = None  # keep the first n values (then normalize, if normalize)


@dataclass
class _Context:
    normalize: bool
    dimensions: int | None


def _has_lowercase(tokenizer: AlbertTokenizer) -> bool:
    """As sentence-transformers' check: a Lowercase normalizer, alone or in a top-level Sequence."""
    try:
        normalizer = json.loads(tokenizer.backend.to_str()).get("normalizer") or {}
    except (ValueError, AttributeError):
        return False
    if normalizer.get("type") == "Lowercase":
        return True
    return normalizer.get("type") == "Sequence" and any(
        n.get("type") == "Lowercase" for n in normalizer.get("normalizers", [])
    )


class EmbedTask:
    """Texts (or token id lists) -> one embedding each, as `SentenceTransformer.encode`."""

    name = "embed"

    def __init__(
        self, tokenizer: AlbertTokenizer, config: EmbeddingConfig, model_max_length: int, hidden_size: int
    ):
        """model_max_length: the longest sequence the model and its compiled grid take (its
        max_position_embeddings); hidden_size: the backbone's."""
        self.tokenizer = tokenizer
        self.config = config
        limit = config.max_seq_length if config.max_seq_length is not None else tokenizer.model_max_length
        self.max_length = int(min(limit, model_max_length))
        self.dimension = config.dimension(hidden_size)
        # sentence-transformers adds a Lowercase normalizer for do_lower_case unless there is one already.
        self._lowercase = config.do_lower_case and not _has_lowercase(tokenizer)
        self._specials = tokenizer.num_special_tokens_to_add(False)
        self._special_ids = set(tokenizer.all_special_ids)
        self._prompt_lengths: dict[str, int] = {}
        self._prompt_content: dict[str, int] = {}  # the prompt's own tokens, without special tokens

    # -- prompts --

    def prompt_for(self, prompt_name: str | None) -> str:
        name = prompt_name if prompt_name is not None else self.config.default_prompt_name
        if name is None:
            return ""
        if name not in self.config.prompts:
            known = ", ".join(repr(n) for n in self.config.prompts) or "none"
            raise InvalidInput(f"prompt_name {name!r} is not one of the model's prompts ({known})")
        return self.config.prompts[name]

    def prompt_length(self, prompt: str) -> int:
        """sentence-transformers' `_get_prompt_length`: the prompt tokenized alone (truncated to the limit),
        without a trailing special token."""
        if not prompt:
            return 0
        if prompt not in self._prompt_lengths:
            ids, _ = self._encode_text(prompt, truncate=True, direction="right", where="")
            n = len(ids) - (1 if ids and ids[-1] in self._special_ids else 0)
            if len(self._prompt_lengths) > 64:
                self._prompt_lengths.clear()
                self._prompt_content.clear()
            self._prompt_lengths[prompt] = n
            self._prompt_content[prompt] = len(ids) - self._specials
        return self._prompt_lengths[prompt]

    # -- tokenization --

    def _too_long(self, where: str, count: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"{where}the input has {count} tokens, more than the limit of {self.max_length} "
            "(send truncate=true to cut it to the limit)"
        )

    def _encode_text(self, text: str, *, truncate: bool, direction: str, where: str) -> tuple[list[int], int]:
        """(ids with special tokens, truncated to the limit if `truncate`; tokens cut)."""
        if self._lowercase:
            text = text.lower()
        backend = self.tokenizer.backend
        encoding = backend.encode(text, add_special_tokens=False)
        content = len(encoding.ids)
        room = max(self.max_length - self._specials, 0)
        if content > room:
            if not truncate:
                raise self._too_long(where, content + self._specials)
            encoding.truncate(room, direction=direction)
        return list(backend.post_process(encoding, None, add_special_tokens=True).ids), max(content - room, 0)

    def _encode(self, item: Any, prompt: str, params: EmbedParams, where: str) -> EmbedInput:
        if isinstance(item, str):
            if not item.strip():
                raise InvalidInput(f"{where}text is empty or only whitespace")
            ids, cut = self._encode_text(
                prompt + item, truncate=params.truncate, direction=params.truncation_direction, where=where
            )
            prompt_length = self.prompt_length(prompt)
            if prompt_length and cut and params.truncation_direction == "left":
                # Cutting from the left removes prompt tokens first; the leading special tokens stay.
                lead = prompt_length - self._prompt_content[prompt]
                prompt_length = max(prompt_length - cut, lead)
        else:
            ids = self._check_ids(item, where)
            prompt_length = 0
            if len(ids) > self.max_length:
                if not params.truncate:
                    raise self._too_long(where, len(ids))
                ids = (
                    ids[-self.max_length :]
                    if params.truncation_direction == "left"
                    else ids[: self.max_length]
                )
        if prompt_length and not self.config.include_prompt and prompt_length >= len(ids):
            raise InvalidInput(
                f"{where}nothing but the prompt is left to pool ({len(ids)} tokens, of which the prompt "
                f"takes {prompt_length}); send a shorter prompt or a longer limit"
            )
        return EmbedInput(
            input_ids=np.asarray(ids, dtype=np.int32),
            token_type_ids=np.zeros(len(ids), dtype=np.int32),
            prompt_length=prompt_length,
        )

    def _check_ids(self, item: Any, where: str) -> list[int]:
        if not isinstance(item, (list, tuple)) or not item:
            raise InvalidInput(f"{where}expected a text or a non-empty list of token ids")
        vocab = self.tokenizer.vocab_size
        for token in item:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise InvalidInput(f"{where}token id {token!r} is not in the vocabulary (0 to {vocab - 1})")
        return [int(t) for t in item]

    # -- the Task protocol --

    def prepare(self, items: list[str | list[int]], params: EmbedParams) -> Prepared:
        if not items:
            raise InvalidInput("no input to embed")
        direction = params.truncation_direction.lower()
        if direction not in ("right", "left"):
            raise InvalidInput(
                f"truncation_direction must be 'right' or 'left', got {params.truncation_direction!r}"
            )
        if direction != params.truncation_direction:
            params = EmbedParams(**{**params.__dict__, "truncation_direction": direction})
        if params.dimensions is not None and not 1 <= params.dimensions <= self.dimension:
            raise InvalidInput(
                f"dimensions must be between 1 and {self.dimension} (the model's embedding size), "
                f"got {params.dimensions}"
            )
        prompt = self.prompt_for(params.prompt_name)
        model_inputs = [
            self._encode(item, prompt, params, item_prefix(i, len(items))) for i, item in enumerate(items)
        ]
        return Prepared(
            model_inputs=model_inputs,
            context=_Context(normalize=params.normalize, dimensions=params.dimensions),
            extras={"prompt_tokens": sum(len(m) for m in model_inputs)},
        )

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list[list[float]]:
        context: _Context = prepared.context
        return [
            finish_vector(
                output["embedding"], normalize=context.normalize, dimensions=context.dimensions
            ).tolist()
            for output in outputs
        ]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize(p=2) over the last axis, in float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norm = np.sqrt(np.sum(vectors * vectors, axis=-1, keepdims=True, dtype=np.float32))
    return (vectors / np.maximum(norm, np.float32(NORMALIZE_EPS))).astype(np.float32)


def finish_vector(vector: np.ndarray, *, normalize: bool, dimensions: int | None = None) -> np.ndarray:
    """An embedding as answered: the first `dimensions` values (sentence-transformers' truncate_dim), then
    L2-normalized if `normalize`. float32 [D']."""
    vector = np.asarray(vector, dtype=np.float32)
    if dimensions is not None:
        vector = vector[:dimensions]
    return l2_normalize(vector) if normalize else vector


def cosine_similarities(source_vec, vecs) -> list[float]:
    """Cosine similarity of `source_vec` [D] with each of `vecs` [N, D], as sentence_transformers.util.cos_sim
    (both sides normalized with eps 1e-12, then a dot product), in float32."""
    source = l2_normalize(np.asarray(source_vec, dtype=np.float32).reshape(1, -1))
    others = l2_normalize(np.asarray(vecs, dtype=np.float32).reshape(len(vecs), -1))
    return [float(x) for x in (others @ source[0]).astype(np.float32)]


# --- The registry entry: routes, their decoding and answers ------------------------------------------------


def _checked_texts(inputs: Any, settings, field: str) -> list:
    """The inputs as a list within max_list_items, each text checked (token id lists are checked by the task)."""
    items, single = as_list(inputs, settings.max_list_items, field)
    check_client_batch(len(items), settings, field)
    return [check_text(x, where(i, single, field)) if isinstance(x, str) else x for i, x in enumerate(items)]


def decode_embed(body: EmbedRequest, settings) -> Decoded:
    params = EmbedParams(
        normalize=body.normalize,
        truncate=truncate_or_default(body.truncate, settings),
        truncation_direction=body.truncation_direction.lower(),
        prompt_name=body.prompt_name,
        dimensions=body.dimensions,
    )
    return Decoded(_checked_texts(body.inputs, settings, "inputs"), params, False)


def encode_embed(answers: list, decoded: Decoded, extras: dict, model: str) -> list:
    return answers  # TEI answers one vector per input, a single input included: [[...]]


def decode_openai(body: OpenAIEmbeddingsRequest, settings) -> Decoded:
    reply = {"encoding_format": body.encoding_format}
    # A list of token ids is one input; a lone string too.
    items = body.items()
    inputs = body.input if isinstance(body.input, str) else items
    # TEI's /v1/embeddings has no truncate field: --auto-truncate decides.
    params = EmbedParams(
        normalize=True, truncate=truncate_or_default(None, settings), dimensions=body.dimensions
    )
    return Decoded(_checked_texts(inputs, settings, "input"), params, False, reply)


def encode_openai(answers: list, decoded: Decoded, extras: dict, model: str) -> dict:
    return openai_response(
        answers,
        model=model,
        prompt_tokens=extras.get("prompt_tokens", 0),
        encoding_format=decoded.reply["encoding_format"],
    )


def decode_similarity(body: SimilarityRequest, settings) -> Decoded:
    as_list(body.inputs.sentences, settings.max_list_items, "inputs.sentences")
    check_client_batch(len(body.inputs.sentences), settings, "inputs.sentences")
    check_text(body.inputs.source_sentence, "inputs.source_sentence")
    for i, text in enumerate(body.inputs.sentences):
        check_text(text, f"inputs.sentences[{i}]")
    p = body.parameters or SimilarityParameters()
    params = EmbedParams(
        normalize=False,
        truncate=truncate_or_default(p.truncate, settings),
        truncation_direction=p.truncation_direction.lower(),
        prompt_name=p.prompt_name,
    )
    return Decoded(body.items(), params, False)


def encode_similarity(answers: list, decoded: Decoded, extras: dict, model: str) -> list[float]:
    return cosine_similarities(answers[0], answers[1:])


def read_checkpoint(directory: Path, spec) -> EmbeddingConfig:
    try:
        return read_embedding_config(directory, pooling_default=spec.pooling)
    except EmbeddingConfigError as exc:
        raise ValueError(str(exc)) from None


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra: EmbeddingConfig) -> EmbedTask:
    return EmbedTask(tokenizer, extra, max_length, config.hidden_size)


EMBED = Endpoint(
    path="/embed",
    summary="Sentence embeddings as sentence-transformers' encode, in text-embeddings-inference's /embed shape.",
    request=EmbedRequest,
    response=list[list[float]],
    decode=decode_embed,
    encode=encode_embed,
)
SIMILARITY = Endpoint(
    path="/similarity",
    summary="Sentence similarity (the Inference API's task): the cosine of the source with each sentence.",
    request=SimilarityRequest,
    response=list[float],
    decode=decode_similarity,
    encode=encode_similarity,
)
OPENAI = Endpoint(
    path="/v1/embeddings",
    summary="OpenAI's embeddings API (the openai client's embeddings.create); `model` names the model.",
    request=OpenAIEmbeddingsRequest,
    response=dict,
    decode=decode_openai,
    encode=encode_openai,
)


def _hub_endpoint(body: Any) -> Endpoint:
    # InferenceClient.sentence_similarity and feature_extraction post to the same URL; the inputs tell them
    # apart ({"source_sentence", "sentences"} for similarity).
    inputs = body.get("inputs") if isinstance(body, dict) else None
    return SIMILARITY if isinstance(inputs, dict) else EMBED


TASK = ModelTask(
    name="embed",
    head=None,
    architectures=(
        "sentence-transformers",
        "AlbertModel",
        "AlbertForMaskedLM",
        "AlbertForPreTraining",
        "AlbertForSequenceClassification",
        "AlbertForTokenClassification",
        "AlbertForQuestionAnswering",
        "AlbertForMultipleChoice",
    ),
    default_for=("sentence-transformers", "AlbertModel"),
    program="embed",
    read_checkpoint=read_checkpoint,
    build=build,
    endpoints=(EMBED, OPENAI, SIMILARITY),
    hub_endpoint=_hub_endpoint,
)
