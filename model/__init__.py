"""Flax ALBERT: the backbone, its task heads, checkpoint loading and the tokenizer."""

from .config import PRESETS, AlbertConfig
from .errors import CheckpointError, ConfigError, SourceNotFoundError, UnsafePickleError
from .modules import (
    TASKS,
    AlbertBase,
    AlbertForMaskedLM,
    AlbertForMultipleChoice,
    AlbertForPreTraining,
    AlbertForQuestionAnswering,
    AlbertForSequenceClassification,
    AlbertForTokenClassification,
    AlbertModel,
)
from .pretrained import PretrainedAlbert, from_pretrained, load_tokenizer
from .tokenizer import AlbertTokenizer

__all__ = [
    "PRESETS",
    "TASKS",
    "AlbertBase",
    "AlbertConfig",
    "AlbertForMaskedLM",
    "AlbertForMultipleChoice",
    "AlbertForPreTraining",
    "AlbertForQuestionAnswering",
    "AlbertForSequenceClassification",
    "AlbertForTokenClassification",
    "AlbertModel",
    "AlbertTokenizer",
    "CheckpointError",
    "ConfigError",
    "PretrainedAlbert",
    "SourceNotFoundError",
    "UnsafePickleError",
    "from_pretrained",
    "load_tokenizer",
]
