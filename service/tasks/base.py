"""What a task is: pre-processing into model inputs, and post-processing of the model's outputs.

A task knows nothing of HTTP or of batching. The engine runs every `ModelInput` of every request
(for /qa and /ner the windows of a long input are separate `ModelInput`s) and hands back, for
each one, a dict of numpy arrays:

    classify   {"logits": [C]}
    ner        {"logits": [L, C]}                      L = len(input_ids)
    qa         {"start_logits": [L], "end_logits": [L]}
    fill-mask  {"probs": [M, V]}                       softmax over the vocabulary, float32,
                                                       at the M `mask_positions`, in order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np


@dataclass
class ModelInput:
    """One token sequence for the model: [CLS] ... [SEP] (... [SEP])."""

    input_ids: np.ndarray  # int32 [L]
    token_type_ids: np.ndarray  # int32 [L]
    mask_positions: np.ndarray | None = None  # int32 [M], fill-mask only: indices into input_ids

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Prepared:
    """A request after pre-processing: its model inputs plus whatever post-processing needs."""

    model_inputs: list[ModelInput]
    context: Any = None  # task-specific: offsets, encodings, parameters...
    extras: dict = field(default_factory=dict)


ParamsT = TypeVar("ParamsT")
ItemT = TypeVar("ItemT")


class Task(Protocol, Generic[ItemT, ParamsT]):
    """`prepare` takes the list of input items of one request; `finish` returns one answer per item."""

    name: str

    def prepare(self, items: list[ItemT], params: ParamsT) -> Prepared: ...

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list[Any]: ...
