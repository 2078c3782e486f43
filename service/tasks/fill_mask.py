"""fill-mask: predict the token behind each mask, as transformers 4.57's `FillMaskPipeline`.

The engine returns the softmax over the whole vocabulary at the mask positions only; `targets`
pick columns of those probabilities (not renormalized), and each answer re-decodes the input with
the candidate put in place of its mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput
from .base import ModelInput, Prepared

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillMaskParams:
    top_k: int = 5
    targets: tuple[str, ...] | None = None


@dataclass
class _Context:
    top_k: int
    target_ids: np.ndarray | None  # int [T], distinct ids; None = the whole vocabulary


def _where(index: int, count: int) -> str:
    return f"input {index}: " if count > 1 else ""


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
                f"{_where(index, count)}the text is empty; it must contain at least one {mask}"
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
                f"{_where(index, count)}the text is longer than the model's maximum of {self.model_max_length} "
                f"tokens, and truncating it would cut off {cut_masks} of its "
                f"{cut_masks + len(mask_positions)} {mask} tokens"
            )
        if len(mask_positions) == 0:
            raise InvalidInput(f"{_where(index, count)}no mask token ({mask}) found in the text")
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
