"""What a task is: its routes and request checks, pre-processing into model inputs, and post-processing of
the model's outputs. Each task module declares a `ModelTask` (see the registry in `__init__`).

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

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
from pydantic import ConfigDict, Field

from ..errors import InvalidInput, PayloadTooLarge, ValidationFailed


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


# --- The registry's entries: what a task module declares ----------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """A request body after its checks: the task's input items, its parameters, and whether the caller sent a
    single input (answered unwrapped) rather than a list."""

    items: list
    params: Any
    single: bool
    reply: dict = field(default_factory=dict)  # what only the answer's encoding needs (e.g. encoding_format)


@dataclass(frozen=True)
class Endpoint:
    """One HTTP route of a task: `POST path` with `request` bodies, decoded by `decode(body, settings)`.

    The answer is the task's answers (unwrapped for a single input), or `encode(answers, decoded, extras,
    model_name)` where the endpoint shapes it itself (`extras`: the task's Prepared.extras, e.g. token
    counts). `hub_answer(answers, decoded)` is the answer in the Hugging Face Inference API's shape, for
    `POST /models/{name}`; by default the endpoint's own."""

    path: str
    summary: str
    request: type
    response: Any
    decode: Callable[[Any, Any], Decoded]
    hub_answer: Callable[[list, Decoded], Any] | None = None
    encode: Callable[[list, Decoded, dict, str], Any] | None = None


@dataclass(frozen=True)
class ModelTask:
    """What a model serving this task needs: a head from its checkpoint and a compiled program to run it, and
    the task object that turns requests into model inputs and outputs into answers.

    name          the model entry's `task` (and the task's main endpoint name)
    head          the `model.from_pretrained` task whose head the program runs
    architectures the checkpoint architectures (config.json) that hold that head; the first ones also make
                  this the default task of a checkpoint with that architecture (see `default_for`)
    program       the engine's compiled program kind: "classify", "tokens" or "fill-mask"
    build         build(tokenizer, max_length, config) -> the Task object; raises ValueError when the
                  checkpoint cannot serve this task (the reason is the model's failure)
    endpoints     its routes, the first being the one `POST /models/{name}` answers as
    hub_endpoint  picks, from an Inference API body, which endpoint answers it (tasks with one route: the
                  first)
    """

    name: str
    head: str | None
    architectures: tuple[str, ...]
    program: str
    build: Callable[..., Any]
    endpoints: tuple[Endpoint, ...]
    default_for: tuple[str, ...] = ()
    read_checkpoint: Callable[..., Any] | None = None
    hub_endpoint: Callable[[Any], Endpoint] | None = None

    def endpoint_for_hub(self, body: Any) -> Endpoint:
        return self.hub_endpoint(body) if self.hub_endpoint is not None else self.endpoints[0]


# --- Checks every task's decoding shares ------------------------------------------------------------------

# C0 controls other than tab, newline and carriage return, DEL, and lone UTF-16 surrogates (which JSON
# escapes can smuggle in, and which cannot be encoded as UTF-8).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def check_text(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidInput(f"{field} must not be empty or whitespace-only (got {len(value)} characters)")
    bad = _FORBIDDEN.search(value)
    if bad:
        raise InvalidInput(
            f"{field} contains the control character or invalid code point U+{ord(bad.group()):04X} "
            f"at position {bad.start()}"
        )
    return value


def as_list(inputs: Any, max_items: int, field: str = "inputs") -> tuple[list, bool]:
    """(the inputs as a list, whether a single input was sent); a list is bounded by `max_items`."""
    if not isinstance(inputs, list):
        return [inputs], True
    if not inputs:
        raise InvalidInput(f"{field} must not be an empty list")
    if len(inputs) > max_items:
        raise PayloadTooLarge(f"{field} has {len(inputs)} items; the limit is {max_items}")
    return inputs, False


def check_client_batch(count: int, settings, field: str = "inputs") -> None:
    """text-embeddings-inference's --max-client-batch-size: a batch over it is a 422 (its message)."""
    limit = getattr(settings, "max_client_batch_size", None)
    if limit is not None and count > limit:
        raise ValidationFailed(
            f"batch size {count} > maximum allowed batch size {limit} ({field}; --max-client-batch-size)"
        )


def truncate_or_default(truncate: bool | None, settings) -> bool:
    """A request's `truncate`, or the server's --auto-truncate when the request does not say (TEI's rule)."""
    return bool(truncate) if truncate is not None else bool(getattr(settings, "auto_truncate", False))


def item_prefix(index: int, count: int) -> str:
    """How a task's message names one input of several ("input 2: "); nothing for a lone input."""
    return f"input {index}: " if count > 1 else ""


def where(index: int, single: bool, field: str = "inputs") -> str:
    return field if single else f"{field}[{index}]"


def check_top_k(top_k: int | None, limit: int, field: str = "parameters.top_k") -> None:
    if top_k is not None and top_k > limit:
        raise ValidationFailed(f"{field} must be at most {limit}, got {top_k}")


# TEI's spelling in its OpenAPI document ("Left"/"Right") and its default's ("right") are both accepted.
TruncationDirection = Literal["right", "left", "Right", "Left"]

# Unknown fields are refused, so a misspelt parameter is a 422 rather than silently ignored.
STRICT = ConfigDict(extra="forbid")


def model_field():
    return Field(
        None,
        description="The model to answer (GET /models lists them); by default the task's default model.",
    )
