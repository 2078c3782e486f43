"""embed: sentence embeddings, as sentence-transformers 5.x's `SentenceTransformer(path).encode(texts)`.

The whole story of the task, in four parts:

1. `read_embedding_config(directory)` reads a checkpoint in sentence-transformers layout (`modules.json`:
   a Transformer module, one Pooling of any mode(s), then Dense, Normalize or Dropout modules;
   `config_sentence_transformers.json`: prompts) into an `EmbeddingConfig`, or gives a plain ALBERT
   checkpoint the pooling its model entry asks for (mean by default).
2. The head, in JAX, runs inside the compiled program on *packed* rows (see service/engine/): `pool`
   reduces the backbone's last hidden state [R, L, H] to one vector per sequence slot [R, K, P] with
   sentence-transformers' own formulas, `apply_head` runs the Dense layers and the Normalize module
   (their weights are arguments of the program, not constants). `embedding_fn` is the whole jitted
   function for the engine; only the [R, K, D] vectors leave the device.
3. `EmbedTask` (the Task protocol of base.py): prompts, tokenization and the 413 for over-long inputs
   (unless `truncate`, then cut on the side `truncation_direction` says, as text-embeddings-inference),
   and `finish` applying `dimensions` and `normalize`.
4. The request schemas and answers of `POST /embed` (TEI), `POST /v1/embeddings` (OpenAI) and
   `POST /similarity` (the Inference API's sentence-similarity), and `cosine_similarities`.

What the engine passes to the head, per packed batch (R rows of L tokens, K = sequences_per_row(L) slots):
`input_ids`, `token_type_ids`, `position_ids`, `segment_ids` [R, L] and `first_tokens` [R, K] exactly as
`Packer.pack` lays them out, plus `prompt_lengths` [R, K] int32 (`prompt_lengths_for(batch, sequences)`):
how many leading tokens of each slot's sequence are its prompt, counted as sentence-transformers counts
them ([CLS] included), 0 for no prompt and for empty slots. The answer of slot (r, k) is sequence
`batch.slots.index((r, k))`'s embedding.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput, PayloadTooLarge
from .base import (
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    TruncationDirection,
    as_list,
    check_text,
    item_prefix,
    model_field,
    where,
)

log = logging.getLogger(__name__)

Array = jax.Array

# Pooling modes sentence-transformers 5.x accepts, in the order its legacy `pooling_mode_*` flags
# concatenate them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Modes that read one token per sequence: with only these, the backbone's last layer runs on those tokens.
_SINGLE_TOKEN_MODES = ("cls", "lasttoken")

# Dense activation functions, by the class name sentence-transformers saves (`fullname(module)`) or the
# shorter `torch.nn.X` spelling it also imports. Each is applied with torch's default arguments.
ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": jnp.tanh,
    "ReLU": jax.nn.relu,
    "GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "Sigmoid": jax.nn.sigmoid,
    "SiLU": jax.nn.silu,
    "LeakyReLU": lambda x: jax.nn.leaky_relu(x, 0.01),
}
_ACTIVATION_PATHS = {
    **{f"torch.nn.modules.activation.{name}": name for name in ACTIVATIONS if name != "Identity"},
    "torch.nn.modules.linear.Identity": "Identity",
    **{f"torch.nn.{name}": name for name in ACTIVATIONS},
}
# sentence-transformers' default prompts of every SentenceTransformer (empty unless the model sets them).
_DEFAULT_PROMPTS = {"query": "", "document": ""}
_TRANSFORMER_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's eps


# --- 1. Configuration ------------------------------------------------------------------------------------


class EmbeddingConfigError(ValueError):
    """A sentence-transformers file asks for something this service cannot run; names the file and field."""

    def __init__(self, message: str, *, file: str | Path, field: str | None = None):
        super().__init__(message)
        self.file = str(file)
        self.field = field


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """A sentence-transformers Dense module: activation(x @ weight.T + bias)."""

    in_features: int
    out_features: int
    activation: str  # a key of ACTIVATIONS
    weight: np.ndarray  # float32 [out, in], as torch's nn.Linear holds it
    bias: np.ndarray | None  # float32 [out]
    path: Path


@dataclass(frozen=True)
class NormalizeStep:
    """The Normalize module: x / max(||x||_2, 1e-12)."""


HeadStep = DenseLayer | NormalizeStep


@dataclass(frozen=True, eq=False)
class EmbeddingConfig:
    """Everything after the backbone, and what tokenization needs to know."""

    backbone_dir: Path  # the directory holding the ALBERT checkpoint (config.json, weights, tokenizer)
    pooling_modes: tuple[str, ...]  # concatenated in this order
    include_prompt: bool = True
    steps: tuple[HeadStep, ...] = ()  # Dense / Normalize modules after pooling, in order
    max_seq_length: int | None = None  # None: the tokenizer's model_max_length (capped by the model)
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None
    sentence_transformers: bool = False  # read from modules.json (False: a plain checkpoint)

    @property
    def dense_layers(self) -> tuple[DenseLayer, ...]:
        return tuple(step for step in self.steps if isinstance(step, DenseLayer))

    @property
    def normalized(self) -> bool:
        """Whether the model's own Normalize module is the last step (vectors come out unit length)."""
        return bool(self.steps) and isinstance(self.steps[-1], NormalizeStep)

    def pooled_dimension(self, hidden_size: int) -> int:
        return hidden_size * len(self.pooling_modes)

    def dimension(self, hidden_size: int) -> int:
        """The size of the embeddings: the last Dense layer's, or the pooled vector's."""
        dense = self.dense_layers
        return dense[-1].out_features if dense else self.pooled_dimension(hidden_size)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EmbeddingConfigError(f"{path}: not valid JSON ({exc})", file=path) from exc


def _json_object(path: Path) -> dict:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise EmbeddingConfigError(f"{path}: expected a JSON object, got {type(value).__name__}", file=path)
    return value


def _check_modes(modes: Any, path: Path, field_name: str) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    if not isinstance(modes, (list, tuple)) or not modes or not all(isinstance(m, str) for m in modes):
        raise EmbeddingConfigError(
            f"{path}: {field_name} must be a pooling mode or a list of them, got {modes!r}",
            file=path,
            field=field_name,
        )
    for mode in modes:
        if mode not in POOLING_MODES:
            raise EmbeddingConfigError(
                f"{path}: {field_name} {mode!r} is not supported (supported: {', '.join(POOLING_MODES)})",
                file=path,
                field=field_name,
            )
    return tuple(modes)


def _read_pooling(path: Path, hidden_size: int | None) -> tuple[tuple[str, ...], bool]:
    config_path = path / "config.json"
    config = _json_object(config_path)
    if "pooling_mode" in config:  # sentence-transformers >= 5.x (the legacy flags, if any, are ignored)
        modes = _check_modes(config["pooling_mode"], config_path, "pooling_mode")
    else:
        modes = tuple(mode for flag, mode in _LEGACY_POOLING_FLAGS.items() if config.get(flag, False))
        modes = modes or ("mean",)
    include_prompt = config.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise EmbeddingConfigError(
            f"{config_path}: include_prompt must be true or false, got {include_prompt!r}",
            file=config_path,
            field="include_prompt",
        )
    for name in ("embedding_dimension", "word_embedding_dimension"):
        if name in config and hidden_size is not None and config[name] != hidden_size:
            raise EmbeddingConfigError(
                f"{config_path}: {name} is {config[name]!r} but the model's hidden_size is {hidden_size}",
                file=config_path,
                field=name,
            )
    return modes, include_prompt


def _activation(name: Any, config_path: Path) -> str:
    if name is None:
        return "Identity"
    if not isinstance(name, str):
        raise EmbeddingConfigError(
            f"{config_path}: activation_function must be a class path, got {name!r}",
            file=config_path,
            field="activation_function",
        )
    if name in _ACTIVATION_PATHS:
        return _ACTIVATION_PATHS[name]
    if not name.startswith("torch."):
        # sentence-transformers only imports torch.* activations without trust_remote_code, and falls back
        # to its default (Tanh) for any other; so does this.
        log.warning(
            "%s: activation_function %r is not trusted; using Tanh as sentence-transformers does",
            config_path,
            name,
        )
        return "Tanh"
    raise EmbeddingConfigError(
        f"{config_path}: activation_function {name!r} is not supported "
        f"(supported: {', '.join(sorted(_ACTIVATION_PATHS))})",
        file=config_path,
        field="activation_function",
    )


def _read_dense(path: Path, in_features_expected: int | None) -> DenseLayer:
    from model.errors import CheckpointError
    from model.weights import read_checkpoint

    config_path = path / "config.json"
    config = _json_object(config_path)
    for name in ("in_features", "out_features"):
        if not isinstance(config.get(name), int) or isinstance(config.get(name), bool) or config[name] < 1:
            raise EmbeddingConfigError(
                f"{config_path}: {name} must be a positive integer, got {config.get(name)!r}",
                file=config_path,
                field=name,
            )
    for name in ("module_input_name", "module_output_name"):
        if config.get(name, "sentence_embedding") not in ("sentence_embedding", None):
            raise EmbeddingConfigError(
                f"{config_path}: {name} {config[name]!r} is not supported (only sentence_embedding)",
                file=config_path,
                field=name,
            )
    in_features, out_features = config["in_features"], config["out_features"]
    if in_features_expected is not None and in_features != in_features_expected:
        raise EmbeddingConfigError(
            f"{config_path}: in_features is {in_features} but the vector before it has {in_features_expected}",
            file=config_path,
            field="in_features",
        )
    use_bias = config.get("bias", True)
    if not isinstance(use_bias, bool):
        raise EmbeddingConfigError(
            f"{config_path}: bias must be true or false, got {use_bias!r}", file=config_path, field="bias"
        )
    activation = _activation(
        config.get("activation_function", "torch.nn.modules.activation.Tanh"), config_path
    )
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as exc:
        raise EmbeddingConfigError(str(exc), file=exc.file or path, field=exc.key) from exc
    tensors = checkpoint.tensors
    weights_file = checkpoint.description or str(path)

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise EmbeddingConfigError(
                f"{weights_file}: no tensor {name!r} (it holds {', '.join(sorted(tensors)) or 'nothing'})",
                file=weights_file,
                field=name,
            )
        value = np.asarray(tensors[name], dtype=np.float32)
        if value.shape != shape:
            raise EmbeddingConfigError(
                f"{weights_file}: {name} has shape {list(value.shape)}, expected {list(shape)} "
                f"(in_features {in_features}, out_features {out_features})",
                file=weights_file,
                field=name,
            )
        return value

    weight = tensor("linear.weight", (out_features, in_features))
    bias = tensor("linear.bias", (out_features,)) if use_bias else None
    return DenseLayer(in_features, out_features, activation, weight, bias, path)


def _read_transformer(path: Path, modules_json: Path) -> tuple[int | None, bool]:
    """max_seq_length and do_lower_case of the Transformer module at `path`."""
    if not (path / "config.json").is_file():
        raise EmbeddingConfigError(
            f"{modules_json}: the Transformer module's directory {path} has no config.json",
            file=modules_json,
            field="path",
        )
    config_path = next((path / n for n in _TRANSFORMER_CONFIG_FILES if (path / n).is_file()), None)
    if config_path is None:
        return None, False
    config = _json_object(config_path)
    task = config.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise EmbeddingConfigError(
            f"{config_path}: transformer_task {task!r} is not supported (only feature-extraction)",
            file=config_path,
            field="transformer_task",
        )
    output = config.get("module_output_name", "token_embeddings")
    if output not in ("token_embeddings", None):
        raise EmbeddingConfigError(
            f"{config_path}: module_output_name {output!r} is not supported (only token_embeddings)",
            file=config_path,
            field="module_output_name",
        )
    text = (config.get("modality_config") or {}).get("text") or {}
    if text.get("method_output_name", "last_hidden_state") != "last_hidden_state":
        raise EmbeddingConfigError(
            f"{config_path}: modality_config.text.method_output_name {text['method_output_name']!r} is not "
            "supported (only last_hidden_state)",
            file=config_path,
            field="modality_config",
        )
    max_seq_length = config.get("max_seq_length")
    for key in ("processor_kwargs", "tokenizer_args"):  # an explicit model_max_length wins, as in ST
        kwargs = config.get(key) or {}
        if isinstance(kwargs, dict) and "model_max_length" in kwargs:
            max_seq_length = kwargs["model_max_length"]
    if max_seq_length is not None and (
        not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 1
    ):
        raise EmbeddingConfigError(
            f"{config_path}: max_seq_length must be a positive integer, got {max_seq_length!r}",
            file=config_path,
            field="max_seq_length",
        )
    do_lower_case = config.get("do_lower_case", False)
    if not isinstance(do_lower_case, bool):
        raise EmbeddingConfigError(
            f"{config_path}: do_lower_case must be true or false, got {do_lower_case!r}",
            file=config_path,
            field="do_lower_case",
        )
    return max_seq_length, do_lower_case


def _hidden_size(backbone_dir: Path) -> int | None:
    try:
        value = json.loads((backbone_dir / "config.json").read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None  # from_pretrained reports a bad config.json itself
    return value if isinstance(value, int) else None


def _read_prompts(directory: Path) -> tuple[dict[str, str], str | None, str | None]:
    prompts = dict(_DEFAULT_PROMPTS)
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return prompts, None, None
    config = _json_object(path)
    model_type = config.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise EmbeddingConfigError(
            f"{path}: model_type {model_type!r} is not supported (only SentenceTransformer)",
            file=path,
            field="model_type",
        )
    saved = config.get("prompts") or {}
    if not isinstance(saved, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in saved.items()
    ):
        raise EmbeddingConfigError(
            f"{path}: prompts must map names to prompt texts, got {saved!r}", file=path, field="prompts"
        )
    prompts.update(saved)
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise EmbeddingConfigError(
            f"{path}: default_prompt_name {default!r} is not one of the prompts ({', '.join(prompts)})",
            file=path,
            field="default_prompt_name",
        )
    similarity = config.get("similarity_fn_name")
    return prompts, default, similarity if isinstance(similarity, str) else None


def _module_kind(entry: Any, index: int, path: Path) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise EmbeddingConfigError(
            f"{path}: module {index} must be an object with a string 'type', got {entry!r}",
            file=path,
            field=f"[{index}].type",
        )
    kind = entry["type"].rsplit(".", 1)[-1]
    if kind not in ("Transformer", "Pooling", "Dense", "Normalize", "Dropout"):
        raise EmbeddingConfigError(
            f"{path}: module {index} has type {entry['type']!r}, which is not supported "
            "(supported: Transformer, Pooling, Dense, Normalize, Dropout)",
            file=path,
            field=f"[{index}].type",
        )
    if kind in ("Transformer", "Pooling", "Dense") and not isinstance(entry.get("path", ""), str):
        raise EmbeddingConfigError(
            f"{path}: module {index} path must be a string, got {entry.get('path')!r}",
            file=path,
            field=f"[{index}].path",
        )
    return kind


def read_embedding_config(directory: str | Path, *, pooling_default: str = "mean") -> EmbeddingConfig:
    """Read a sentence-transformers checkpoint directory, or describe a plain ALBERT one.

    A directory with `modules.json` must list a Transformer module first, then one Pooling module, then any
    Dense, Normalize and Dropout (a no-op at inference) modules. Without `modules.json` the checkpoint is
    pooled with `pooling_default` (one mode, or several joined by "+"/","), with no Dense and no Normalize.
    Raises EmbeddingConfigError (a ValueError) naming the file and field of anything unsupported.
    """
    directory = Path(directory)
    modules_json = directory / "modules.json"
    if not modules_json.is_file():
        modes = _check_modes(
            [m.strip() for m in pooling_default.replace("+", ",").split(",")], directory, "pooling"
        )
        prompts, default, similarity = _read_prompts(directory)
        return EmbeddingConfig(
            backbone_dir=directory,
            pooling_modes=modes,
            prompts=prompts,
            default_prompt_name=default,
            similarity_fn_name=similarity,
        )
    entries = _read_json(modules_json)
    if not isinstance(entries, list) or not entries:
        raise EmbeddingConfigError(f"{modules_json}: expected a non-empty list of modules", file=modules_json)
    if all(isinstance(e, dict) and isinstance(e.get("idx"), int) for e in entries):
        entries = sorted(entries, key=lambda e: e["idx"])
    kinds = [_module_kind(entry, i, modules_json) for i, entry in enumerate(entries)]
    if kinds[0] != "Transformer":
        raise EmbeddingConfigError(
            f"{modules_json}: the first module must be a Transformer, got {entries[0]['type']!r}",
            file=modules_json,
            field="[0].type",
        )
    pooling_at = [i for i, kind in enumerate(kinds) if kind == "Pooling"]
    if len(pooling_at) != 1 or kinds.count("Transformer") != 1:
        raise EmbeddingConfigError(
            f"{modules_json}: expected one Transformer and one Pooling module, got "
            f"{kinds.count('Transformer')} and {len(pooling_at)}",
            file=modules_json,
            field="type",
        )
    for i, kind in enumerate(kinds[1 : pooling_at[0]], start=1):
        raise EmbeddingConfigError(
            f"{modules_json}: module {i} ({kind}) before Pooling works on token embeddings, which is not "
            "supported",
            file=modules_json,
            field=f"[{i}].type",
        )

    backbone_dir = directory / entries[0].get("path", "")
    max_seq_length, do_lower_case = _read_transformer(backbone_dir, modules_json)
    hidden_size = _hidden_size(backbone_dir)
    modes, include_prompt = _read_pooling(directory / entries[pooling_at[0]].get("path", ""), hidden_size)
    width = hidden_size * len(modes) if hidden_size is not None else None
    steps: list[HeadStep] = []
    for entry, kind in zip(entries[pooling_at[0] + 1 :], kinds[pooling_at[0] + 1 :], strict=True):
        if kind == "Dense":
            layer = _read_dense(directory / entry.get("path", ""), width)
            steps.append(layer)
            width = layer.out_features
        elif kind == "Normalize":
            steps.append(NormalizeStep())
    prompts, default, similarity = _read_prompts(directory)
    return EmbeddingConfig(
        backbone_dir=backbone_dir,
        pooling_modes=modes,
        include_prompt=include_prompt,
        steps=tuple(steps),
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        prompts=prompts,
        default_prompt_name=default,
        similarity_fn_name=similarity,
        sentence_transformers=True,
    )


# --- 2. The head, in JAX ---------------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST  # pooling sums and Dense matmuls in full float32 on every backend


def _slot_masks(
    segment_ids: Array, position_ids: Array, slots: int, prompt_lengths: Array | None, include_prompt: bool
) -> tuple[Array, Array]:
    """(member, pooled), both bool [R, K, L]: the tokens of each slot's sequence, and those pooled (without
    the prompt when `include_prompt` is false)."""
    k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
    member = segment_ids[:, None, :] == k[None, :, None]
    if include_prompt or prompt_lengths is None:
        return member, member
    return member, member & (position_ids[:, None, :] >= prompt_lengths[:, :, None])


def token_indices(
    mode: str,
    segment_ids: Array,
    first_tokens: Array,
    prompt_lengths: Array | None = None,
    *,
    include_prompt: bool = True,
) -> Array:
    """Row indices [R, K] of the token that `cls` or `lasttoken` pooling reads in each slot.

    cls: the sequence's first pooled token (with the prompt excluded, the first after it, as
    sentence-transformers' argmax over its mask); lasttoken: the sequence's last token."""
    slots = first_tokens.shape[1]
    k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, None, :] == k[None, :, None], axis=-1).astype(jnp.int32)  # [R, K]
    last = first_tokens + jnp.maximum(lengths - 1, 0)
    if mode == "lasttoken":
        return last
    if mode != "cls":
        raise ValueError(f"{mode!r} does not read a single token")
    if include_prompt or prompt_lengths is None:
        return first_tokens
    return jnp.minimum(first_tokens + prompt_lengths, last)


def _gather(hidden: Array, indices: Array) -> Array:
    return jnp.take_along_axis(hidden, indices[..., None], axis=1)  # [R, K, H]


def pool(
    hidden: Array,
    segment_ids: Array,
    position_ids: Array,
    first_tokens: Array,
    prompt_lengths: Array | None = None,
    *,
    config: EmbeddingConfig,
) -> Array:
    """Pool packed rows: hidden [R, L, H] -> [R, K, H * len(config.pooling_modes)] float32.

    segment_ids [R, L] (0 = padding, k + 1 = the row's k-th sequence), position_ids [R, L] (restarting at 0
    for each sequence), first_tokens [R, K] (offset of each slot's sequence), prompt_lengths [R, K] (leading
    prompt tokens per slot; only read when the Pooling module has include_prompt false). The formulas are
    sentence-transformers' `Pooling._forward_padded`, per sequence; empty slots come out as zeros.
    """
    hidden = hidden.astype(jnp.float32)
    slots = first_tokens.shape[1]
    member, pooled = _slot_masks(segment_ids, position_ids, slots, prompt_lengths, config.include_prompt)
    weights = pooled.astype(jnp.float32)  # [R, K, L]
    counts = jnp.sum(weights, axis=-1, keepdims=True)  # [R, K, 1]
    vectors = []
    mean_sum = None
    for mode in config.pooling_modes:
        if mode in _SINGLE_TOKEN_MODES:
            index = token_indices(
                mode, segment_ids, first_tokens, prompt_lengths, include_prompt=config.include_prompt
            )
            vectors.append(_gather(hidden, index))
        elif mode == "max":
            masked = jnp.where(pooled[..., None], hidden[:, None, :, :], -jnp.inf)  # [R, K, L, H], fused
            vectors.append(jnp.max(masked, axis=2))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if mean_sum is None:
                mean_sum = jnp.einsum("rkl,rlh->rkh", weights, hidden, precision=_HIGHEST)
            denominator = jnp.maximum(counts, 1e-9)
            vectors.append(mean_sum / (denominator if mode == "mean" else jnp.sqrt(denominator)))
        elif mode == "weightedmean":
            weighted = weights * (position_ids[:, None, :] + 1).astype(jnp.float32)  # positions 1..n
            total = jnp.einsum("rkl,rlh->rkh", weighted, hidden, precision=_HIGHEST)
            vectors.append(total / jnp.maximum(jnp.sum(weighted, axis=-1, keepdims=True), 1e-9))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    out = jnp.concatenate(vectors, axis=-1)
    used = jnp.any(member, axis=-1, keepdims=True)  # [R, K, 1]
    return jnp.where(used, out, 0.0)


def head_params(config: EmbeddingConfig) -> list[dict[str, np.ndarray]]:
    """The Dense layers' parameters, one {"kernel" [in, out], "bias" [out]} per layer, float32 (a layer
    without bias gets zeros, which adds nothing)."""
    return [
        {
            "kernel": np.ascontiguousarray(layer.weight.T, dtype=np.float32),
            "bias": (layer.bias if layer.bias is not None else np.zeros(layer.out_features)).astype(
                np.float32
            ),
        }
        for layer in config.dense_layers
    ]


def apply_head(params: list[dict[str, Array]], pooled: Array, *, config: EmbeddingConfig) -> Array:
    """The modules after pooling, in order: Dense (activation(x @ kernel + bias)) and Normalize. [..., P] ->
    [..., D]; `params` as head_params returns them."""
    x = pooled.astype(jnp.float32)
    dense = iter(params)
    for step in config.steps:
        if isinstance(step, DenseLayer):
            layer = next(dense)
            x = ACTIVATIONS[step.activation](
                jnp.matmul(x, layer["kernel"], precision=_HIGHEST) + layer["bias"]
            )
        else:
            norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
            x = x / jnp.maximum(norm, NORMALIZE_EPS)
    return x


def embedding_params(model_params: dict, config: EmbeddingConfig) -> dict:
    """The one parameter tree `embedding_fn` takes: the backbone's (as from_pretrained loaded them) and the
    head's."""
    return {
        "model": model_params,
        "head": [jax.tree_util.tree_map(jnp.asarray, p) for p in head_params(config)],
    }


def embedding_fn(module, config: EmbeddingConfig):
    """The function for the engine to jit, one per bucket shape:

        fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens, prompt_lengths)
            -> {"embedding": float32 [R, K, D]}

    `params` = embedding_params(model.params, config); every other argument is int32, [R, L] or [R, K] as
    Packer.pack and prompt_lengths_for build them. `module` is any model of model.TASKS with an `albert`
    backbone (task "base" for a sentence-transformers checkpoint). With only cls/lasttoken pooling, the
    backbone's last layer runs only on the tokens read (as classification does).
    """
    single_token = all(mode in _SINGLE_TOKEN_MODES for mode in config.pooling_modes)

    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens, prompt_lengths):
        if single_token:
            indices = [
                token_indices(
                    m, segment_ids, first_tokens, prompt_lengths, include_prompt=config.include_prompt
                )
                for m in config.pooling_modes
            ]
            slots = first_tokens.shape[1]

            def backbone(m):
                return m.albert(
                    input_ids,
                    None,
                    token_type_ids,
                    position_ids,
                    segment_ids,
                    output_positions=jnp.concatenate(indices, axis=1),
                )  # [R, K * modes, H]

            picked = module.apply({"params": params["model"]}, method=backbone).astype(jnp.float32)
            pooled = jnp.concatenate(
                [picked[:, i * slots : (i + 1) * slots] for i in range(len(indices))], axis=-1
            )
            k = jnp.arange(1, slots + 1, dtype=segment_ids.dtype)
            used = jnp.any(segment_ids[:, None, :] == k[None, :, None], axis=-1, keepdims=True)
            pooled = jnp.where(used, pooled, 0.0)
        else:

            def backbone(m):
                return m.albert(input_ids, None, token_type_ids, position_ids, segment_ids)  # [R, L, H]

            hidden = module.apply({"params": params["model"]}, method=backbone)
            pooled = pool(hidden, segment_ids, position_ids, first_tokens, prompt_lengths, config=config)
        return {"embedding": apply_head(params["head"], pooled, config=config)}

    return fn


def prompt_lengths_for(batch, sequences: list[ModelInput]) -> np.ndarray:
    """int32 [R, K]: each slot's prompt length (0 where none), for a PackedBatch of `sequences`."""
    lengths = np.zeros(batch.first_tokens.shape, np.int32)
    for sequence, (r, k) in zip(sequences, batch.slots, strict=True):
        lengths[r, k] = getattr(sequence, "prompt_length", 0)
    return lengths


# --- 3. The task -----------------------------------------------------------------------------------------


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


# --- 4. Requests and answers -----------------------------------------------------------------------------

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
    truncate: StrictBool = Field(
        False, description="Cut inputs over the model's limit; false: such an input is a 413."
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

    def params(self) -> EmbedParams:
        return EmbedParams(
            normalize=self.normalize,
            truncate=self.truncate,
            truncation_direction=self.truncation_direction.lower(),
            prompt_name=self.prompt_name,
        )


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

    def params(self) -> EmbedParams:
        return EmbedParams(normalize=True, truncate=False, dimensions=self.dimensions)


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
    truncate: StrictBool = Field(False, description="Cut sentences over the limit; false: a 413.")
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

    def params(self) -> EmbedParams:
        p = self.parameters or SimilarityParameters()
        return EmbedParams(
            normalize=False,
            truncate=p.truncate,
            truncation_direction=p.truncation_direction.lower(),
            prompt_name=p.prompt_name,
        )


# --- 5. The registry entry -------------------------------------------------------------------------------


def _checked_texts(inputs: Any, settings, field: str) -> list:
    """The inputs as a list within max_list_items, each text checked (token id lists are checked by the task)."""
    items, single = as_list(inputs, settings.max_list_items, field)
    return [check_text(x, where(i, single, field)) if isinstance(x, str) else x for i, x in enumerate(items)]


def decode_embed(body: EmbedRequest, settings) -> Decoded:
    return Decoded(_checked_texts(body.inputs, settings, "inputs"), body.params(), False)


def encode_embed(answers: list, decoded: Decoded, extras: dict, model: str) -> list:
    return answers  # TEI answers one vector per input, a single input included: [[...]]


def decode_openai(body: OpenAIEmbeddingsRequest, settings) -> Decoded:
    reply = {"encoding_format": body.encoding_format}
    # A list of token ids is one input; a lone string too.
    items = body.items()
    inputs = body.input if isinstance(body.input, str) else items
    return Decoded(_checked_texts(inputs, settings, "input"), body.params(), False, reply)


def encode_openai(answers: list, decoded: Decoded, extras: dict, model: str) -> dict:
    return openai_response(
        answers,
        model=model,
        prompt_tokens=extras.get("prompt_tokens", 0),
        encoding_format=decoded.reply["encoding_format"],
    )


def decode_similarity(body: SimilarityRequest, settings) -> Decoded:
    as_list(body.inputs.sentences, settings.max_list_items, "inputs.sentences")
    check_text(body.inputs.source_sentence, "inputs.source_sentence")
    for i, text in enumerate(body.inputs.sentences):
        check_text(text, f"inputs.sentences[{i}]")
    return Decoded(body.items(), body.params(), False)


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
