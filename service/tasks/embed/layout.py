"""The sentence-transformers layout: what a checkpoint directory asks the embedding family to run.

`read_embedding_config(directory)` reads a checkpoint in sentence-transformers layout (`modules.json`: a
Transformer module, one Pooling of any mode(s), then Dense, Normalize or Dropout modules;
`sentence_bert_config.json`: max_seq_length, do_lower_case; `config_sentence_transformers.json`: prompts)
into an `EmbeddingConfig`, or gives a plain ALBERT checkpoint the pooling its model entry asks for (mean by
default). Anything it cannot run is an `EmbeddingConfigError` naming the file and field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

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
# Dense activation functions (pooling.ACTIVATIONS applies them), by the class name sentence-transformers
# saves (`fullname(module)`) or the shorter `torch.nn.X` spelling it also imports.
ACTIVATION_NAMES = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "LeakyReLU")
_ACTIVATION_PATHS = {
    **{f"torch.nn.modules.activation.{name}": name for name in ACTIVATION_NAMES if name != "Identity"},
    "torch.nn.modules.linear.Identity": "Identity",
    **{f"torch.nn.{name}": name for name in ACTIVATION_NAMES},
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
    activation: str  # one of ACTIVATION_NAMES
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


def _read_transformer(
    path: Path,
    modules_json: Path,
    *,
    transformer_task: str = "feature-extraction",
    method_output: str = "last_hidden_state",
) -> tuple[int | None, bool]:
    """max_seq_length and do_lower_case of the Transformer module at `path` (an MLMTransformer's: with
    transformer_task "fill-mask" and method_output "logits")."""
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
    task = config.get("transformer_task", transformer_task)
    if task != transformer_task:
        raise EmbeddingConfigError(
            f"{config_path}: transformer_task {task!r} is not supported (only {transformer_task})",
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
    if text.get("method_output_name", method_output) != method_output:
        raise EmbeddingConfigError(
            f"{config_path}: modality_config.text.method_output_name {text['method_output_name']!r} is not "
            f"supported (only {method_output})",
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


def _read_prompts(
    directory: Path, *, model_type: str = "SentenceTransformer"
) -> tuple[dict[str, str], str | None, str | None]:
    """(prompts, default prompt name, similarity function) of config_sentence_transformers.json, whose
    model_type must be `model_type` (SparseEncoder for sparse.py)."""
    prompts = dict(_DEFAULT_PROMPTS)
    path = directory / "config_sentence_transformers.json"
    if not path.is_file():
        return prompts, None, None
    config = _json_object(path)
    saved_type = config.get("model_type", model_type)
    if saved_type != model_type:
        raise EmbeddingConfigError(
            f"{path}: model_type {saved_type!r} is not supported here (only {model_type})",
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


def _module_kind_name(entry: Any, index: int, path: Path) -> str:
    """A modules.json entry's class name (its `type`'s last part)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise EmbeddingConfigError(
            f"{path}: module {index} must be an object with a string 'type', got {entry!r}",
            file=path,
            field=f"[{index}].type",
        )
    return entry["type"].rsplit(".", 1)[-1]


def _module_kind(entry: Any, index: int, path: Path) -> str:
    kind = _module_kind_name(entry, index, path)
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
