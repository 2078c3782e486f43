"""Per-endpoint task logic (pre- and post-processing exactly as the transformers pipelines)."""

from __future__ import annotations

from model import AlbertConfig, AlbertTokenizer


def build_task(endpoint: str, tokenizer: AlbertTokenizer, max_length: int, config: AlbertConfig):
    """The task object serving `endpoint` for a model with this tokenizer and config."""
    if endpoint == "classify":
        from .classify import ClassificationTask

        return ClassificationTask(tokenizer, max_length, list(config.id2label), config.problem_type)
    if endpoint == "fill-mask":
        from .fill_mask import FillMaskTask

        return FillMaskTask(tokenizer, max_length)
    if endpoint == "qa":
        from .qa import QuestionAnsweringTask

        return QuestionAnsweringTask(tokenizer, max_length)
    if endpoint == "ner":
        from .ner import TokenClassificationTask

        return TokenClassificationTask(tokenizer, max_length, list(config.id2label))
    raise ValueError(f"unknown endpoint {endpoint!r}")
