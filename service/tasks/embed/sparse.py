"""sparse-embed: SPLADE, as sentence-transformers 5's `SparseEncoder(path).encode(texts)`, answered as TEI's
`POST /embed_sparse`: each text's non-zero `{index, value}` pairs, by index.

The checkpoint is a SparseEncoder layout (`modules.json`: `MLMTransformer`, then `SpladePooling`), read by
`read_sparse_config` with layout.py's readers. The whole head runs inside the compiled program
(`splade_fn`): the masked-LM logits of every token, `log1p(relu(.))` (twice for `log1p_relu`), max or sum
pooled per sequence, then the largest `MAX_TERMS` values and their indices; so only those leave the device,
never the vocabulary-sized activations. Tokenization, prompts and truncation are the embed task's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from model.tokenizer import AlbertTokenizer

from ..base import (
    Decoded,
    Endpoint,
    ModelTask,
    Prepared,
    TruncationDirection,
    model_field,
    truncate_or_default,
)
from .dense import EmbedParams, EmbedTask, _checked_texts
from .layout import (
    EmbeddingConfigError,
    _json_object,
    _module_kind_name,
    _read_json,
    _read_prompts,
    _read_transformer,
)

log = logging.getLogger(__name__)

# The most non-zero terms answered per text: the largest ones (a SPLADE document has a few hundred).
MAX_TERMS = 2048


@dataclass(frozen=True)
class SparseConfig:
    """What SpladePooling says, and what tokenization needs (the fields EmbedTask reads)."""

    backbone_dir: Path
    pooling_strategy: str = "max"  # "max" | "sum"
    activation_function: str = "relu"  # "relu" | "log1p_relu"
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True

    def dimension(self, hidden_size: int) -> int:  # EmbedTask's; the vocabulary size is the task's
        return hidden_size


def is_sparse_layout(directory: Path) -> bool:
    """Whether `directory` holds a SparseEncoder layout (modules.json with a SpladePooling module)."""
    try:
        entries = _read_json(directory / "modules.json")
    except (EmbeddingConfigError, OSError):
        return False
    return isinstance(entries, list) and any(
        isinstance(e, dict) and str(e.get("type", "")).rsplit(".", 1)[-1] == "SpladePooling" for e in entries
    )


def read_sparse_config(directory: str | Path) -> SparseConfig:
    """Read a SparseEncoder checkpoint: MLMTransformer then SpladePooling (nothing else). Raises
    EmbeddingConfigError (a ValueError) naming the file and field of anything unsupported."""
    directory = Path(directory)
    modules_json = directory / "modules.json"
    entries = _read_json(modules_json)
    if not isinstance(entries, list) or not entries:
        raise EmbeddingConfigError(f"{modules_json}: expected a non-empty list of modules", file=modules_json)
    if all(isinstance(e, dict) and isinstance(e.get("idx"), int) for e in entries):
        entries = sorted(entries, key=lambda e: e["idx"])
    kinds = [_module_kind_name(entry, i, modules_json) for i, entry in enumerate(entries)]
    for i, entry in enumerate(entries):
        if not isinstance(entry.get("path", ""), str):
            raise EmbeddingConfigError(
                f"{modules_json}: module {i} path must be a string, got {entry.get('path')!r}",
                file=modules_json,
                field=f"[{i}].path",
            )
    # sentence-transformers 5 saved an MLMTransformer; later 5.x a Transformer with transformer_task fill-mask.
    if kinds not in (["MLMTransformer", "SpladePooling"], ["Transformer", "SpladePooling"]):
        raise EmbeddingConfigError(
            f"{modules_json}: a SPLADE model is an MLMTransformer (or fill-mask Transformer) then a "
            "SpladePooling module, got "
            f"{', '.join(kinds)}",
            file=modules_json,
            field="type",
        )
    backbone_dir = directory / entries[0].get("path", "")
    max_seq_length, do_lower_case = _read_transformer(
        backbone_dir, modules_json, transformer_task="fill-mask", method_output="logits"
    )
    pooling_path = directory / entries[1].get("path", "") / "config.json"
    pooling = _json_object(pooling_path) if pooling_path.is_file() else {}
    strategy = pooling.get("pooling_strategy", "max")
    activation = pooling.get("activation_function", "relu")
    if strategy not in ("max", "sum"):
        raise EmbeddingConfigError(
            f"{pooling_path}: pooling_strategy must be max or sum, got {strategy!r}",
            file=pooling_path,
            field="pooling_strategy",
        )
    if activation not in ("relu", "log1p_relu"):
        raise EmbeddingConfigError(
            f"{pooling_path}: activation_function must be relu or log1p_relu, got {activation!r}",
            file=pooling_path,
            field="activation_function",
        )
    prompts, default, _ = _read_prompts(directory, model_type="SparseEncoder")
    return SparseConfig(
        backbone_dir=backbone_dir,
        pooling_strategy=strategy,
        activation_function=activation,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        prompts=prompts,
        default_prompt_name=default,
    )


def sparse_signature(config: SparseConfig) -> tuple:
    return (config.pooling_strategy, config.activation_function, MAX_TERMS)


def splade_fn(module, config: SparseConfig):
    """The function for the engine to jit, one per bucket shape:

        fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens)
            -> {"values", "indices": [R, K, T], "count": [R, K]}

    `params` = the masked-LM model's; T = min(vocabulary, MAX_TERMS), largest first; `count` is each
    sequence's number of non-zero terms. Slot k of row r holds the tokens whose segment id is k + 1."""

    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens):
        rows, slots = first_tokens.shape

        def run(m):
            hidden = m.albert(input_ids, None, token_type_ids, position_ids, segment_ids)  # [R, L, H]
            return m.vocab_logits(m.predictions.transform(hidden))  # [R, L, V] float32

        logits = module.apply({"params": params}, method=run)
        vocab = logits.shape[-1]
        scores = jnp.log1p(jax.nn.relu(logits))
        if config.activation_function == "log1p_relu":
            scores = jnp.log1p(scores)
        # One segment per (row, slot); padding (segment id 0) goes to a last, dropped segment.
        row = jnp.arange(rows, dtype=segment_ids.dtype)[:, None]
        ids = jnp.where(segment_ids > 0, row * slots + segment_ids - 1, rows * slots).reshape(-1)
        flat = scores.reshape(-1, vocab)
        if config.pooling_strategy == "max":
            pooled = jax.ops.segment_max(flat, ids, num_segments=rows * slots + 1)[:-1]
            pooled = jnp.maximum(pooled, 0.0)  # an empty slot's -inf; scores are never negative
        else:
            pooled = jax.ops.segment_sum(flat, ids, num_segments=rows * slots + 1)[:-1]
        terms = min(vocab, MAX_TERMS)
        values, indices = jax.lax.top_k(pooled, terms)  # [R * K, T]
        return {
            "values": values.reshape(rows, slots, terms),
            "indices": indices.reshape(rows, slots, terms),
            "count": jnp.sum(pooled > 0, axis=-1).reshape(rows, slots),
        }

    return fn


class SparseEmbedTask(EmbedTask):
    """Texts -> their non-zero SPLADE terms, `[{"index", "value"}]` by index."""

    name = "sparse-embed"

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list[list[dict]]:
        answers = []
        for output in outputs:
            if int(output["count"]) > len(output["values"]):
                log.warning(
                    "a text has %d non-zero SPLADE terms; the largest %d are answered",
                    int(output["count"]),
                    len(output["values"]),
                )
            count = min(int(output["count"]), len(output["values"]))
            indices = np.asarray(output["indices"][:count])
            values = np.asarray(output["values"][:count], dtype=np.float32)
            order = np.argsort(indices, kind="stable")
            answers.append(
                [{"index": int(indices[i]), "value": float(values[i])} for i in order if values[i] > 0]
            )
        return answers


class EmbedSparseRequest(BaseModel):
    """text-embeddings-inference's `POST /embed_sparse`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": "What is Deep Learning?"}]}
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the model's limit; false: a 413; default: --auto-truncate."
    )
    truncation_direction: TruncationDirection = Field("right", description="Which end to cut.")
    prompt_name: str | None = Field(None, description="A prompt of the model to prepend.")
    model: str | None = model_field()


class SparseValue(BaseModel):
    index: int
    value: float


def decode_sparse(body: EmbedSparseRequest, settings) -> Decoded:
    params = EmbedParams(
        normalize=False,
        truncate=truncate_or_default(body.truncate, settings),
        truncation_direction=body.truncation_direction.lower(),
        prompt_name=body.prompt_name,
    )
    return Decoded(_checked_texts(body.inputs, settings, "inputs"), params, False)


def encode_sparse(answers: list, decoded: Decoded, extras: dict, model: str) -> list:
    return answers  # one list per input, a single input included (TEI's [[...]])


def read_checkpoint(directory: Path, spec) -> SparseConfig:
    try:
        return read_sparse_config(directory)
    except EmbeddingConfigError as exc:
        raise ValueError(str(exc)) from None


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra: Any) -> SparseEmbedTask:
    if extra is None or not isinstance(extra, SparseConfig):
        raise ValueError(
            "sparse-embed needs a SparseEncoder checkpoint (modules.json: MLMTransformer, SpladePooling)"
        )
    task = SparseEmbedTask(tokenizer, extra, max_length, config.hidden_size)  # type: ignore[arg-type]
    task.dimension = config.vocab_size
    return task


TASK = ModelTask(
    name="sparse-embed",
    head="masked-lm",
    architectures=("sentence-transformers-sparse",),
    default_for=("sentence-transformers-sparse",),
    program="sparse",
    read_checkpoint=read_checkpoint,
    build=build,
    endpoints=(
        Endpoint(
            path="/embed_sparse",
            summary="SPLADE sparse embeddings as sentence-transformers' SparseEncoder.encode, in "
            "text-embeddings-inference's /embed_sparse shape: the non-zero {index, value} pairs, by index.",
            request=EmbedSparseRequest,
            response=list[list[SparseValue]],
            decode=decode_sparse,
            encode=encode_sparse,
        ),
    ),
)
