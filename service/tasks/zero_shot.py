"""zero-shot: NLI-based zero-shot classification, as transformers 4.57's `ZeroShotClassificationPipeline`.

Each (sequence, candidate label) becomes one premise/hypothesis pair, the hypothesis being
`hypothesis_template.format(label)`, encoded as a text pair truncated `only_first` (the hypothesis is
never cut). The engine runs every pair through the sequence-classification program (the classify
program: per pair {"logits": [C]}); `finish` takes, per sequence, the logits of its pairs in label order:

- single label (`multi_label` false and more than one candidate): softmax of the entailment logits
  across the candidates;
- `multi_label`, or a single candidate: per candidate, softmax over (contradiction, entailment), the
  entailment probability kept.

The entailment id is the first label whose name starts with "entail" (any case), contradiction is id 0
unless entailment is 0 (then the last id), as the pipeline's `entailment_id` and `postprocess`. Where the
pipeline falls back to id -1 for a model without an entailment label (and answers nonsense), this task
refuses the model at construction.

Differences from the pipeline, all on inputs the pipeline cannot serve or serves badly:
- empty or whitespace-only sequences are refused (422), as the other endpoints do; the pipeline only
  refuses "";
- a template whose hypothesis cannot fit even with the sequence cut to nothing is a 413 naming both
  lengths (the pipeline retries without truncation and the model fails on the over-long input);
- a malformed template ("{label}", "{0} {1}", "{") is a 422 instead of a Python KeyError/IndexError;
- if a logit is so large that the pipeline's unshifted `np.exp` overflows (|logit| > 88 in float32, so
  the pipeline answers NaN), the softmax is taken with the maximum subtracted instead; for every other
  input the pipeline's own expressions run unchanged, so float32 scores are bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from model.tokenizer import AlbertTokenizer

from ..errors import InvalidInput, PayloadTooLarge
from .base import Decoded, Endpoint, ModelInput, ModelTask, Prepared, as_list, check_text, item_prefix, where

DEFAULT_TEMPLATE = "This example is {}."
DEFAULT_MAX_CANDIDATE_LABELS = 100


# --- request schema (service/api/schemas.py style) -----------------------------------------------------

_STRICT = ConfigDict(extra="forbid")


class ZeroShotParameters(BaseModel):
    model_config = _STRICT
    candidate_labels: list[str] | str = Field(
        description="The labels to choose from: a list, or one string of comma-separated labels."
    )
    hypothesis_template: str = Field(
        DEFAULT_TEMPLATE,
        description='Turns each label into an NLI hypothesis; must contain "{}" where the label goes.',
    )
    multi_label: StrictBool = Field(
        False,
        description="Score each label independently (entailment vs. contradiction) instead of one softmax "
        "across the labels.",
    )


class ZeroShotRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": "I have a problem with my iphone that needs to be resolved asap!!",
                    "parameters": {"candidate_labels": ["urgent", "not urgent", "phone", "tablet"]},
                },
                {
                    "inputs": ["The match ended 2-1.", "Parliament passed the bill."],
                    "parameters": {
                        "candidate_labels": "sports, politics, economy",
                        "hypothesis_template": "This text is about {}.",
                        "multi_label": True,
                    },
                },
            ]
        },
    )
    inputs: str | list[str] = Field(description="A text or a list of texts to classify.")
    parameters: ZeroShotParameters
    model: str | None = Field(None, description="Which served model to use (default: the endpoint's).")


class ZeroShotAnswer(BaseModel):
    sequence: str
    labels: list[str]
    scores: list[float]


ZeroShotResponse = ZeroShotAnswer | list[ZeroShotAnswer]


# --- the task ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotParams:
    candidate_labels: tuple[str, ...] | list[str] | str
    hypothesis_template: str = DEFAULT_TEMPLATE
    multi_label: bool = False


@dataclass
class _Context:
    sequences: list[str]
    labels: list[str]  # the parsed candidate labels, in request order
    multi_label: bool


def parse_candidate_labels(labels: tuple[str, ...] | list[str] | str) -> list[str]:
    """As the pipeline's `_parse_labels`: a string is split on commas, stripped, empties dropped; a list
    is taken as it is (duplicates and all)."""
    if isinstance(labels, str):
        return [label.strip() for label in labels.split(",") if label.strip()]
    return list(labels)


def find_entailment_id(labels: list[str] | tuple[str, ...], label2id: Mapping[str, int] | None = None) -> int:
    """The pipeline's `entailment_id`: the first label2id entry whose name starts with "entail"
    (lower-cased), or -1. Without label2id, id2label's order (labels[i] is id i) stands for it."""
    entries = label2id.items() if label2id is not None else ((label, i) for i, label in enumerate(labels))
    for label, index in entries:
        if label.lower().startswith("entail"):
            return int(index)
    return -1


class ZeroShotTask:
    name = "zero-shot"

    def __init__(
        self,
        tokenizer: AlbertTokenizer,
        model_max_length: int,
        labels: list[str],
        *,
        label2id: Mapping[str, int] | None = None,
        max_candidate_labels: int = DEFAULT_MAX_CANDIDATE_LABELS,
    ):
        """labels[i] = config.id2label[i]. `label2id`, when the caller has config.json's own mapping,
        is searched instead, in its order, exactly as the pipeline does (they differ only for a
        config whose label2id disagrees with id2label, or with several "entail..." labels)."""
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.labels = list(labels)
        self.max_candidate_labels = max_candidate_labels
        self.entailment_id = find_entailment_id(self.labels, label2id)
        if self.entailment_id == -1:
            raise ValueError(
                f"zero-shot classification needs an NLI model with an entailment label (a label starting "
                f'with "entail", any case); this model\'s labels are {self.labels}'
            )
        if not 0 <= self.entailment_id < len(self.labels):
            raise ValueError(
                f"the entailment label's id {self.entailment_id} is not one of the model's "
                f"{len(self.labels)} label ids ({self.labels})"
            )
        # As the pipeline: -1 (the last logit) when entailment is 0. Kept as the pipeline writes it, as a
        # negative index works on the logits the same way.
        self.contradiction_id = -1 if self.entailment_id == 0 else 0

    # --- pre-processing

    def prepare(self, items: list[str], params: ZeroShotParams) -> Prepared:
        labels = parse_candidate_labels(params.candidate_labels)
        if not labels:
            raise InvalidInput(
                "parameters.candidate_labels must hold at least one label"
                + (" (a string is split on commas)" if isinstance(params.candidate_labels, str) else "")
            )
        if len(labels) > self.max_candidate_labels:
            raise PayloadTooLarge(
                f"parameters.candidate_labels has {len(labels)} labels; the limit is {self.max_candidate_labels}"
            )
        hypotheses = self._hypotheses(params.hypothesis_template, labels)
        model_inputs = []
        for index, sequence in enumerate(items):
            if not sequence.strip():
                raise InvalidInput(f"{item_prefix(index, len(items))}text is empty or only whitespace")
            for label, hypothesis in zip(labels, hypotheses, strict=True):
                model_inputs.append(self._encode(sequence, hypothesis, label))
        context = _Context(sequences=list(items), labels=labels, multi_label=params.multi_label)
        return Prepared(model_inputs=model_inputs, context=context)

    @staticmethod
    def _hypotheses(template: str, labels: list[str]) -> list[str]:
        try:
            hypotheses = [template.format(label) for label in labels]
        except (IndexError, KeyError, ValueError) as exc:
            raise InvalidInput(
                f"parameters.hypothesis_template {template!r} cannot be formatted with a label ({exc!r}); "
                'it must hold one "{}" where the label goes'
            ) from exc
        # The pipeline's check, on the first label only.
        if hypotheses[0] == template:
            raise InvalidInput(
                f"parameters.hypothesis_template {template!r} was not able to be formatted with the "
                'target labels; it must hold "{}" where the label goes'
            )
        return hypotheses

    def _encode(self, sequence: str, hypothesis: str, label: str) -> ModelInput:
        # The pipeline tokenizes [sequence, hypothesis] with truncation="only_first" to the tokenizer's
        # model_max_length: only the sequence loses tokens.
        try:
            encoding = self.tokenizer.encode(
                sequence, hypothesis, max_length=self.model_max_length, truncation="only_first"
            )[0]
        except Exception as exc:  # tokenizers raises a plain Exception
            if "too short" not in str(exc):
                raise
            hypothesis_length = len(self.tokenizer.encode(hypothesis, add_special_tokens=False)[0].ids)
            specials = self.tokenizer.num_special_tokens_to_add(pair=True)
            raise PayloadTooLarge(
                f"the hypothesis for candidate label {label[:80]!r} is {hypothesis_length} tokens, "
                f"{hypothesis_length + specials} with the special tokens; the model's limit is "
                f"{self.model_max_length} tokens, so it cannot fit even with the text cut to nothing"
            ) from exc
        return ModelInput(
            input_ids=np.asarray(encoding.ids, dtype=np.int32),  # [L]
            token_type_ids=np.asarray(encoding.type_ids, dtype=np.int32),  # [L]
        )

    # --- post-processing

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list[dict]:
        context: _Context = prepared.context
        n = len(context.labels)
        if len(outputs) != n * len(context.sequences):
            raise ValueError(f"expected {n * len(context.sequences)} outputs, got {len(outputs)}")
        answers = []
        for s, sequence in enumerate(context.sequences):
            # As the pipeline: the logits of one sequence's pairs, reshaped to (1, n, C).
            logits = np.stack([outputs[s * n + i]["logits"] for i in range(n)])[None]  # [1, n, C]
            logits = logits.astype(np.float32, copy=False)
            scores = self._scores(logits, context.multi_label or n == 1)  # [1, n]
            top_inds = list(reversed(scores[0].argsort()))
            answers.append(
                {
                    "sequence": sequence,
                    "labels": [context.labels[i] for i in top_inds],
                    "scores": scores[0, top_inds].tolist(),
                }
            )
        return answers

    def _scores(self, reshaped_outputs: np.ndarray, independent: bool) -> np.ndarray:
        """The pipeline's float32 numpy, expression for expression; reshaped_outputs [1, n, C]."""
        if independent:
            chosen = reshaped_outputs[..., [self.contradiction_id, self.entailment_id]]  # [1, n, 2]
        else:
            chosen = reshaped_outputs[..., self.entailment_id]  # [1, n]
        with np.errstate(over="ignore", invalid="ignore"):
            scores = np.exp(chosen) / np.exp(chosen).sum(-1, keepdims=True)
        if not np.isfinite(scores).all():
            # exp overflowed (a logit above ~88): the same softmax, shifted, where the pipeline gives NaN.
            shifted = np.exp(chosen - chosen.max(-1, keepdims=True))
            scores = shifted / shifted.sum(-1, keepdims=True)
        return scores[..., 1] if independent else scores


# --- the registry entry ----------------------------------------------------------------------------------


def decode(body: ZeroShotRequest, settings) -> Decoded:
    inputs, single = as_list(body.inputs, settings.max_list_items)
    items = [check_text(text, where(i, single)) for i, text in enumerate(inputs)]
    p = body.parameters
    labels = p.candidate_labels if isinstance(p.candidate_labels, str) else tuple(p.candidate_labels)
    params = ZeroShotParams(labels, hypothesis_template=p.hypothesis_template, multi_label=p.multi_label)
    return Decoded(items, params, single)


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> ZeroShotTask:
    # Raises ValueError for a classifier without an "entailment" label: the model fails at start-up.
    return ZeroShotTask(tokenizer, max_length, list(config.id2label))


TASK = ModelTask(
    name="zero-shot",
    head="sequence-classification",
    architectures=("AlbertForSequenceClassification",),
    program="classify",
    build=build,
    endpoints=(
        Endpoint(
            path="/zero-shot",
            summary="Zero-shot classification with an NLI model, as the zero-shot-classification pipeline.",
            request=ZeroShotRequest,
            response=ZeroShotResponse,
            decode=decode,
        ),
    ),
)
