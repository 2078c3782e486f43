"""ALBERT configuration: a frozen dataclass read from a Hugging Face `config.json` and validated."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Activation names accepted in `hidden_act`, as transformers' ACT2FN spells them (see layers.ACTIVATIONS).
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_python",
    "quick_gelu",
    "relu",
    "relu6",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "mish",
    "linear",
)
POSITION_EMBEDDING_TYPES = ("absolute", "relative_key", "relative_key_query")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass(frozen=True)
class AlbertConfig:
    """The fields of transformers' AlbertConfig that shape the model.

    Defaults are transformers' AlbertConfig defaults (xxlarge-sized), so a config.json that omits a field
    means what it means to transformers. Use `from_dict`/`from_json` rather than the constructor so that
    values are validated.
    """

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    classifier_dropout_prob: float | None = 0.1
    position_embedding_type: str = "absolute"
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    # Head-related fields from transformers' PretrainedConfig.
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    architectures: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def group_of_layer(self, layer: int) -> int:
        """Index of the shared layer group that layer `layer` applies (transformers' exact formula)."""
        return int(layer / (self.num_hidden_layers / self.num_hidden_groups))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> AlbertConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "id2label"}
        kwargs: dict[str, Any] = {k: values[k] for k in known if k in values and values[k] is not None}
        if "classifier_dropout_prob" in values:  # None is meaningful here (token classification falls back)
            kwargs["classifier_dropout_prob"] = values["classifier_dropout_prob"]
        kwargs["id2label"] = _labels(values, source)
        if "architectures" in kwargs:
            kwargs["architectures"] = tuple(kwargs["architectures"])
        kwargs["extra"] = {
            k: v for k, v in values.items() if k not in known and k not in ("id2label", "label2id")
        }
        config = cls(**kwargs)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> AlbertConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
        model_type = values.get("model_type")
        if model_type not in (None, "albert"):
            raise ConfigError(f"{path}: model_type is {model_type!r}, expected 'albert'")
        return cls.from_dict(values, source=str(path))

    def validate(self, source: str = "config") -> None:
        def fail(message: str) -> None:
            raise ConfigError(f"{source}: {message}")

        for name in (
            "vocab_size",
            "embedding_size",
            "hidden_size",
            "num_hidden_layers",
            "num_hidden_groups",
            "num_attention_heads",
            "intermediate_size",
            "inner_group_num",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_hidden_groups > self.num_hidden_layers:
            fail(
                f"num_hidden_groups ({self.num_hidden_groups}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers}): some groups would never be applied"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            fail(
                f"hidden_act {self.hidden_act!r} is not supported; expected one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            fail(
                f"position_embedding_type {self.position_embedding_type!r} is not supported; "
                f"expected one of {', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        if self.problem_type not in PROBLEM_TYPES:
            fail(f"problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            fail(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                fail(f"{name} must be in [0, 1), got {value!r}")


def _labels(values: dict[str, Any], source: str) -> tuple[str, ...]:
    """id2label as a tuple in id order; JSON keys are strings ("0", "1", ...)."""
    id2label = values.get("id2label")
    if id2label is None:
        num_labels = values.get("num_labels", 2)
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: id2label must map integer ids to names, got {id2label!r}") from exc
    if sorted(by_id) != list(range(len(by_id))):
        raise ConfigError(f"{source}: id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return tuple(by_id[i] for i in range(len(by_id)))


# Shapes of the public checkpoints (hub ids under the `albert/` organisation), for tests and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "albert-base-v2": dict(
        vocab_size=30000,
        embedding_size=128,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu_new",
        max_position_embeddings=512,
    ),
    "albert-large-v2": dict(
        vocab_size=30000,
        embedding_size=128,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu_new",
    ),
    "albert-xlarge-v2": dict(
        vocab_size=30000,
        embedding_size=128,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        hidden_act="gelu_new",
    ),
    "albert-xxlarge-v2": dict(vocab_size=30000, embedding_size=128, hidden_size=4096, num_attention_heads=64),
}
