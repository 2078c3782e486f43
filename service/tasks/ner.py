"""Token classification (/ner): what transformers 4.57's `TokenClassificationPipeline` answers.

The story, in the pipeline's own order (`pipelines/token_classification.py`):

1. prepare: the text is encoded truncated to the model's maximum length; with `stride`, the overflow
   becomes further windows overlapping by `stride` tokens, one `ModelInput` each.
2. finish, per window: softmax per token; special tokens skipped; each token becomes a "pre-entity"
   with its scores, offsets and whether it continues the previous word; pre-entities are aggregated
   (`none` leaves them as they are, `simple` groups adjacent tokens of one entity type, `first`/
   `average`/`max` first merge sub-words into words); `ignore_labels` are filtered out.
3. With several windows, entities found twice in the overlap are merged, keeping the longer one
   (then the higher-scoring one).

The numpy maths is kept in float32 as the pipeline's is, so scores and argmax ties come out the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from model.tokenizer import AlbertTokenizer
from service.errors import InvalidInput

from .base import (
    STRICT,
    Decoded,
    Endpoint,
    ModelInput,
    ModelTask,
    Prepared,
    as_list,
    check_text,
    model_field,
    where,
)

AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
_WORD_STRATEGIES = ("first", "average", "max")


@dataclass(frozen=True)
class NERParams:
    aggregation_strategy: str = "simple"  # none | simple | first | average | max
    ignore_labels: tuple[str, ...] = ("O",)
    stride: int | None = None  # overlap in tokens between windows; None truncates instead


@dataclass
class _Window:
    """What post-processing needs of one encoded window besides the model's logits."""

    input_ids: np.ndarray  # int32 [L]
    offsets: list[tuple[int, int]]  # character offsets into the item's text, per token
    special_tokens_mask: list[int]  # 1 for [CLS], [SEP] and other special tokens


@dataclass
class _Item:
    text: str
    windows: list[_Window]  # in the order of their ModelInputs


@dataclass
class _Context:
    strategy: str  # lower-cased aggregation strategy
    ignore_labels: tuple[str, ...]
    items: list[_Item]


class TokenClassificationTask:
    name = "ner"

    def __init__(self, tokenizer: AlbertTokenizer, model_max_length: int, labels: list[str]):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.labels = labels  # id2label, in id order
        # Tokens of text per window: the special tokens take the rest of the model's length.
        self.window_length = model_max_length - tokenizer.num_special_tokens_to_add(pair=False)
        # BPE/WordPiece-style models mark word continuations with a prefix; SentencePiece (ALBERT) has
        # none, so the pipeline falls back to looking at the text before the token.
        self._word_aware = bool(getattr(tokenizer.backend.model, "continuing_subword_prefix", None))

    # -- pre-processing --------------------------------------------------------------------------

    def prepare(self, items: list[str], params: NERParams) -> Prepared:
        strategy = self._check_params(params)
        for i, text in enumerate(items):
            if not text.strip():
                raise InvalidInput(
                    f"input {i}: text must not be empty or whitespace-only (received {len(text)} characters)"
                )

        model_inputs: list[ModelInput] = []
        prepared_items: list[_Item] = []
        for text in items:
            if params.stride is None:
                # The pipeline always truncates to the model's length and drops the overflow.
                encodings = self.tokenizer.encode(text, max_length=self.model_max_length)[:1]
            else:
                encodings = self.tokenizer.encode(
                    text, max_length=self.model_max_length, stride=params.stride
                )
            windows = []
            for encoding in encodings:
                ids = np.asarray(encoding.ids, dtype=np.int32)  # [L]
                model_inputs.append(ModelInput(ids, np.asarray(encoding.type_ids, dtype=np.int32)))
                windows.append(_Window(ids, list(encoding.offsets), list(encoding.special_tokens_mask)))
            prepared_items.append(_Item(text, windows))
        context = _Context(strategy, tuple(params.ignore_labels), prepared_items)
        return Prepared(model_inputs=model_inputs, context=context)

    def _check_params(self, params: NERParams) -> str:
        # The pipeline looks strategies up by upper-cased name, so any casing is accepted.
        strategy = str(params.aggregation_strategy).lower()
        if strategy not in AGGREGATION_STRATEGIES:
            raise InvalidInput(
                f"aggregation_strategy must be one of {', '.join(AGGREGATION_STRATEGIES)} "
                f"(received {params.aggregation_strategy!r})"
            )
        stride = params.stride
        if stride is not None:
            if stride < 0:
                raise InvalidInput(f"stride must be >= 0 (received {stride})")
            if strategy == "none":
                raise InvalidInput(
                    "stride processes the whole text in overlapping windows, which needs an "
                    f"aggregation_strategy other than 'none' (received aggregation_strategy='none', stride={stride})"
                )
            # The pipeline itself only rejects stride >= model_max_length; below that the tokenizer
            # refuses a stride above the window length and panics at it once the text overflows.
            if stride >= self.window_length:
                raise InvalidInput(
                    f"stride must be less than {self.window_length}, the tokens of text per window "
                    f"(model max length {self.model_max_length} minus special tokens) (received {stride})"
                )
        return strategy

    # -- post-processing -------------------------------------------------------------------------

    def finish(self, prepared: Prepared, outputs: list[dict[str, np.ndarray]]) -> list:
        context: _Context = prepared.context
        assert len(outputs) == len(prepared.model_inputs), "one output per model input"
        answers = []
        position = 0
        for item in context.items:
            entities: list[dict] = []
            for window in item.windows:
                logits = np.asarray(outputs[position]["logits"], dtype=np.float32)  # [L, C]
                logits = logits[: len(window.input_ids)]  # [L, C] even if handed back padded
                position += 1
                scores = _softmax(logits)  # [L, C]
                pre_entities = self._gather_pre_entities(item.text, window, scores)
                grouped = self._aggregate(pre_entities, context.strategy)
                entities.extend(
                    entity
                    for entity in grouped
                    if entity.get("entity") not in context.ignore_labels
                    and entity.get("entity_group") not in context.ignore_labels
                )
            if len(item.windows) > 1:
                entities = _aggregate_overlapping_entities(entities)
            answers.append([_plain(entity) for entity in entities])
        return answers

    def _gather_pre_entities(self, text: str, window: _Window, scores: np.ndarray) -> list[dict]:
        unk_id = self.tokenizer.unk_token_id
        pre_entities = []
        for index, token_scores in enumerate(scores):  # token_scores: [C]
            if window.special_tokens_mask[index]:
                continue
            token_id = int(window.input_ids[index])
            word = self.tokenizer.id_to_token(token_id)
            start, end = window.offsets[index]
            word_ref = text[start:end]
            if self._word_aware:
                is_subword = len(word) != len(word_ref)
            else:
                # The pipeline's fallback: a token continues a word unless a space touches its start.
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            if token_id == unk_id:
                # "<unk>" says nothing: show the text it stands for, and let it start a word.
                word = word_ref
                is_subword = False
            pre_entities.append(
                {
                    "word": word,
                    "scores": token_scores,
                    "start": start,
                    "end": end,
                    "index": index,
                    "is_subword": is_subword,
                }
            )
        return pre_entities

    def _aggregate(self, pre_entities: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for pre_entity in pre_entities:
                label_id = int(pre_entity["scores"].argmax())
                entities.append(
                    {
                        "entity": self.labels[label_id],
                        "score": pre_entity["scores"][label_id],
                        "index": pre_entity["index"],
                        "word": pre_entity["word"],
                        "start": pre_entity["start"],
                        "end": pre_entity["end"],
                    }
                )
        else:
            entities = self._aggregate_words(pre_entities, strategy)
        if strategy == "none":
            return entities
        return self._group_entities(entities)

    def _aggregate_words(self, pre_entities: list[dict], strategy: str) -> list[dict]:
        """Merge each word's sub-word tokens into one entity, so that a word gets a single label."""
        words = []
        group: list[dict] = []
        for pre_entity in pre_entities:
            if group and not pre_entity["is_subword"]:
                words.append(self._aggregate_word(group, strategy))
                group = []
            group.append(pre_entity)
        if group:
            words.append(self._aggregate_word(group, strategy))
        return words

    def _aggregate_word(self, tokens: list[dict], strategy: str) -> dict:
        if strategy == "first":
            scores = tokens[0]["scores"]  # [C]
        elif strategy == "max":
            # The first token holding the highest score of any label decides (max() keeps the first).
            scores = max(tokens, key=lambda token: token["scores"].max())["scores"]  # [C]
        elif strategy == "average":
            scores = np.nanmean(np.stack([token["scores"] for token in tokens]), axis=0)  # [C]
        else:
            raise ValueError(f"not a word aggregation strategy: {strategy}")
        label_id = int(scores.argmax())
        return {
            "entity": self.labels[label_id],
            "score": scores[label_id],
            "word": self._tokens_to_string([token["word"] for token in tokens]),
            "start": tokens[0]["start"],
            "end": tokens[-1]["end"],
        }

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        """Group adjacent entities of one type; a B- tag always starts a new group."""
        groups = []
        current: list[dict] = []
        for entity in entities:
            if current:
                bi, tag = _bi_tag(entity["entity"])
                _, last_tag = _bi_tag(current[-1]["entity"])
                if tag != last_tag or bi == "B":
                    groups.append(self._group_sub_entities(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._group_sub_entities(current))
        return groups

    def _group_sub_entities(self, entities: list[dict]) -> dict:
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": np.mean(np.nanmean([entity["score"] for entity in entities])),
            "word": self._tokens_to_string([entity["word"] for entity in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }

    def _tokens_to_string(self, tokens: list[str]) -> str:
        # transformers' PreTrainedTokenizerFast.convert_tokens_to_string.
        decoder = self.tokenizer.backend.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """The pipeline's softmax over the last axis, in the logits' dtype."""
    maxes = np.max(logits, axis=-1, keepdims=True)  # [L, 1]
    shifted_exp = np.exp(logits - maxes)  # [L, C]
    return shifted_exp / shifted_exp.sum(axis=-1, keepdims=True)  # [L, C]


def _bi_tag(label: str) -> tuple[str, str]:
    """("B"|"I", type) of a label; a label without a B-/I- prefix counts as a continuation."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _aggregate_overlapping_entities(entities: list[dict]) -> list[dict]:
    """Entities found in two overlapping windows: keep the longer one, then the higher-scoring one."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda entity: entity["start"])  # stable, as the pipeline's
    kept = []
    previous = entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length = entity["end"] - entity["start"]
            previous_length = previous["end"] - previous["start"]
            if length > previous_length or (
                length == previous_length and entity["score"] > previous["score"]
            ):
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept


def _plain(entity: dict) -> dict:
    """The entity with plain Python values (numpy scalars do not serialise)."""
    return {
        key: float(value) if key == "score" else int(value) if key in ("index", "start", "end") else value
        for key, value in entity.items()
    }


# --- The HTTP request and answer ------------------------------------------------------------------------


class NERParameters(BaseModel):
    model_config = STRICT
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="How tokens are grouped into entities."
    )
    ignore_labels: list[str] | None = Field(None, description='Labels to leave out (default ["O"]).')
    stride: StrictInt | None = Field(
        None,
        ge=0,
        description="Overlap between windows over a long text; without it, long texts are truncated.",
    )


class NERRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "My name is Sarah and I live in London."},
                {"inputs": "Angela Merkel visited Paris.", "parameters": {"aggregation_strategy": "first"}},
            ]
        },
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.")
    parameters: NERParameters = Field(default_factory=NERParameters)
    model: str | None = model_field()


class Entity(BaseModel):
    entity_group: str
    score: float
    word: str
    start: int | None
    end: int | None


class TokenEntity(BaseModel):
    entity: str
    score: float
    index: int
    word: str
    start: int | None
    end: int | None


NERAnswer = list[Entity] | list[TokenEntity]
NERResponse = NERAnswer | list[NERAnswer]


def decode(body: NERRequest, settings) -> Decoded:
    inputs, single = as_list(body.inputs, settings.max_list_items)
    items = [check_text(text, where(i, single)) for i, text in enumerate(inputs)]
    p = body.parameters
    params = NERParams(
        aggregation_strategy=p.aggregation_strategy,
        ignore_labels=("O",) if p.ignore_labels is None else tuple(p.ignore_labels),
        stride=p.stride,
    )
    return Decoded(items, params, single)


def build(tokenizer: AlbertTokenizer, max_length: int, config, extra=None) -> TokenClassificationTask:
    return TokenClassificationTask(tokenizer, max_length, list(config.id2label))


TASK = ModelTask(
    name="ner",
    head="token-classification",
    architectures=("AlbertForTokenClassification",),
    default_for=("AlbertForTokenClassification",),
    program="tokens",
    build=build,
    endpoints=(
        Endpoint(
            path="/ner",
            summary="Named-entity recognition (token classification), as the token-classification pipeline.",
            request=NERRequest,
            response=NERResponse,
            decode=decode,
        ),
    ),
)
