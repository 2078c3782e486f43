"""fill-mask: predict the token behind each mask, as transformers 4.57's `FillMaskPipeline`.

The engine returns the softmax over the whole vocabulary at the mask positions only; `targets`
pick columns of those probabilities (not renormalized), and each answer re-decodes the input with
the candidate put in place of its mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput, ValidationFailed
from .base import (
    STRICT,
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    as_list,
    check_text,
    check_top_k,
    item_prefix,
    model_field,
    where,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillMaskParams:
    top_k: int = 5
    targets: tuple[str, ...] | None = None


@dataclass
class _Context:
    top_k: int
    target_ids: np.ndarray | None  # int [T], distinct ids; None = the whole vocabulary


def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of probs [N], largest first; argpartition keeps this O(N) for a big vocabulary."""
    best = np.argpartition(-probs, k - 1)[:k] if k < len(probs) else np.arange(len(probs))  # [k]
    return best[np.argsort(-probs[best], kind="stable")]


class FillMaskTask:
    name = "fill-mask"

    def __init__(self, tokenizer: AlbertTokenizer, model_max_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length

    def prepare(self, items: list[str], params: FillMaskParams) -> Prepared:
        if params.top_k < 1:
            raise InvalidInput(f"top_k must be at least 1, got {params.top_k}")
        if params.top_k > self.tokenizer.vocab_size:
            # The pipeline's torch.topk fails here; the vocabulary is the limit a client can act on.
            raise InvalidInput(
                f"top_k must be at most the vocabulary size {self.tokenizer.vocab_size}, got {params.top_k}"
            )
        target_ids = None if params.targets is None else self._target_ids(params.targets)
        # As the pipeline: never more answers per mask than there are targets.
        top_k = params.top_k if target_ids is None else min(params.top_k, len(target_ids))

        model_inputs = [self._encode(text, i, len(items)) for i, text in enumerate(items)]
        return Prepared(model_inputs=model_inputs, context=_Context(top_k=top_k, target_ids=target_ids))

    def _encode(self, text: str, index: int, count: int) -> ModelInput:
        mask = self.tokenizer.mask_token
        if not text.strip():
            raise InvalidInput(
                f"{item_prefix(index, count)}the text is empty; it must contain at least one {mask}"
            )
        mask_id = self.tokenizer.mask_token_id
        # With max_length the tokenizer hands back what truncation removed as further windows, so a
        # mask cut off is seen without encoding twice.
        kept, *cut = self.tokenizer.encode(text, max_length=self.model_max_length)
        input_ids = np.asarray(kept.ids, dtype=np.int32)  # [L]
        mask_positions = np.flatnonzero(input_ids == mask_id).astype(np.int32)  # [M]
        cut_masks = sum(window.ids.count(mask_id) for window in cut)
        if cut_masks:
            raise InvalidInput(
                f"{item_prefix(index, count)}the text is longer than the model's maximum of {self.model_max_length} "
                f"tokens, and truncating it would cut off {cut_masks} of its "
                f"{cut_masks + len(mask_positions)} {mask} tokens"
            )
        if len(mask_positions) == 0:
            raise InvalidInput(f"{item_prefix(index, count)}no mask token ({mask}) found in the text")
        return ModelInput(
            input_ids=input_ids,
            token_type_ids=np.asarray(kept.type_ids, dtype=np.int32),  # [L]
            mask_positions=mask_positions,
        )

    def _target_ids(self, targets: tuple[str, ...]) -> np.ndarray:
        """As `FillMaskPipeline.get_target_ids`: vocabulary entries, else the target's first sub-token."""
        ids = set()
        for target in targets:
            # The pipeline's get_vocab().get(target), without building the dict.
            id_ = self.tokenizer.token_to_id(target)
            if id_ is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False)[0].ids
                if not pieces:
                    logger.warning("fill-mask target %r gives no token; ignoring it", target)
                    continue
                id_ = pieces[0]
                logger.warning(
                    "fill-mask target %r is not in the vocabulary; using its first sub-token %r",
                    target,
                    self.tokenizer.id_to_token(id_),
                )
            ids.add(id_)
        if not ids:
            raise InvalidInput(
                f"targets must name at least one token of the vocabulary, got {list(targets)!r}"
            )
        return np.array(sorted(ids), dtype=np.int64)  # [T]

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list:
        context: _Context = prepared.context
        answers = []
        for model_input, output in zip(prepared.model_inputs, outputs, strict=True):
            probs = output["probs"]  # [M, V]
            if context.target_ids is not None:
                probs = probs[:, context.target_ids]  # [M, T]
            per_mask = [self._candidates(model_input, i, row, context) for i, row in enumerate(probs)]
            # As the pipeline: a single mask answers with its list alone.
            answers.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return answers

    def _candidates(
        self, model_input: ModelInput, mask_index: int, probs: np.ndarray, context: _Context
    ) -> list:
        """The top_k candidates for one mask, best first. probs: [V] or [T]."""
        best = _top_k(probs, context.top_k)
        single_mask = len(model_input.mask_positions) == 1
        position = model_input.mask_positions[mask_index]
        pad_id = self.tokenizer.pad_token_id
        rows = []
        for column in best:
            token = int(column if context.target_ids is None else context.target_ids[column])
            tokens = model_input.input_ids.copy()
            tokens[position] = token
            # The pipeline drops padding, even a predicted one; with several masks it keeps special
            # tokens so that the other masks stay visible (and [CLS]/[SEP] with them).
            tokens = tokens[tokens != pad_id]
            rows.append(
                {
                    "score": float(probs[column]),
                    "token": token,
                    "token_str": self.tokenizer.decode([token]),
                    "sequence": self.tokenizer.decode(tokens, skip_special_tokens=single_mask),
                }
            )
        return rows


# --- The HTTP request and answer ------------------------------------------------------------------------


class FillMaskParameters(BaseModel):
    model_config = STRICT
    top_k: StrictInt = Field(5, ge=1, description="How many candidates per mask.")
    targets: str | list[str] | None = Field(
        None,
        description="Only score these words (a word not in the vocabulary is scored by its first sub-token).",
    )


class FillMaskRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "The capital of France is [MASK]."},
                {"inputs": "Paris is the [MASK] of [MASK].", "parameters": {"top_k": 3}},
                {"inputs": "I feel [MASK] today.", "parameters": {"targets": ["happy", "sad"]}},
            ]
        },
    )
    inputs: str | list[str] = Field(description="Text with one or more mask tokens, or a list of such texts.")
    parameters: FillMaskParameters = Field(default_factory=FillMaskParameters)
    model: str | None = model_field()


class MaskCandidate(BaseModel):
    score: float
    token: int
    token_str: str
    sequence: str


# One text: a list of candidates, or one list per mask when it has several masks.
FillMaskAnswer = list[MaskCandidate] | list[list[MaskCandidate]]
FillMaskResponse = FillMaskAnswer | list[FillMaskAnswer]


def decode(body: FillMaskRequest, settings) -> Decoded:
    inputs, single = as_list(body.inputs, settings.max_list_items)
    items = [check_text(text, where(i, single)) for i, text in enumerate(inputs)]
    check_top_k(body.parameters.top_k, settings.max_top_k)
    targets = body.parameters.targets
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None:
        if len(targets) > settings.max_targets:
            raise ValidationFailed(
                f"parameters.targets has {len(targets)} items; the limit is {settings.max_targets}"
            )
        for i, target in enumerate(targets):
            check_text(target, f"parameters.targets[{i}]")
    params = FillMaskParams(top_k=body.parameters.top_k, targets=None if targets is None else tuple(targets))
    return Decoded(items, params, single)


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> FillMaskTask:
    return FillMaskTask(tokenizer, max_length)


TASK = ModelTask(
    name="fill-mask",
    head="masked-lm",
    architectures=("AlbertForMaskedLM", "AlbertForPreTraining"),
    default_for=("AlbertForMaskedLM", "AlbertForPreTraining"),
    program="fill-mask",
    build=build,
    endpoints=(
        Endpoint(
            path="/fill-mask",
            summary="Masked-token prediction, as the fill-mask pipeline (one list per mask with several masks).",
            request=FillMaskRequest,
            response=FillMaskResponse,
            decode=decode,
        ),
    ),
)
