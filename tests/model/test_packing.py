"""Packed rows: several sequences in one row give each sequence exactly its result alone.

A row holds sequences back to back; `segment_ids` numbers them (1, 2, ...; 0 for padding) and
`position_ids` restart at 0 for each, so attention stays within a sequence (model/modules.py,
`attention_mask_from`). The reference is transformers' PyTorch model run on every sequence alone, as
a batch of one without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model import from_pretrained

ATOL = 1e-4
CLS, SEP = 2, 3  # ids of [CLS] and [SEP] in the test SentencePiece model (builders.train_sentencepiece)
# albert-base's layout (one shared layer applied 4 times): packing does not depend on layer sharing, and
# a single scanned layer compiles fastest.
BASE_LAYOUT = dict(num_hidden_groups=1, inner_group_num=1)

# Sequences as (tokens in segment A, tokens in segment B or 0), and how they are packed into rows.
SEQUENCES = [(3, 2), (4, 0), (2, 0), (4, 4), (3, 0)]  # lengths 8, 6, 4, 11, 5
ROWS = [[0, 1, 2], [3, 4]]  # 18 and 16 tokens, padded to 20
ROW_LENGTH = 20


@dataclass
class Sequence:
    input_ids: np.ndarray  # [n]
    token_type_ids: np.ndarray  # [n]
    row: int
    start: int  # index of its [CLS] in the row

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + len(self.input_ids))

    def alone(self, torch_model) -> dict[str, np.ndarray]:
        """transformers on this sequence alone: a batch of one, no padding."""
        with torch.no_grad():
            outputs = torch_model(
                input_ids=torch.from_numpy(self.input_ids)[None],
                token_type_ids=torch.from_numpy(self.token_type_ids)[None],
                attention_mask=torch.ones(1, len(self.input_ids), dtype=torch.long),
            )
        return {name: value[0].numpy() for name, value in outputs.items()}


def pack(vocab_size: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[Sequence]]:
    rng = np.random.default_rng(seed)
    batch = {
        name: np.zeros((len(ROWS), ROW_LENGTH), np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids", "position_ids", "segment_ids")
    }
    sequences: list[Sequence | None] = [None] * len(SEQUENCES)
    for row, members in enumerate(ROWS):
        start = 0
        for segment, index in enumerate(members, start=1):
            len_a, len_b = SEQUENCES[index]
            ids = [CLS, *rng.integers(5, vocab_size, len_a), SEP]
            types = [0] * len(ids)
            if len_b:
                ids += [*rng.integers(5, vocab_size, len_b), SEP]
                types += [1] * (len_b + 1)
            sequence = Sequence(np.array(ids), np.array(types), row, start)
            batch["input_ids"][row, sequence.span] = ids
            batch["token_type_ids"][row, sequence.span] = types
            batch["attention_mask"][row, sequence.span] = 1
            batch["position_ids"][row, sequence.span] = np.arange(len(ids))
            batch["segment_ids"][row, sequence.span] = segment
            sequences[index] = sequence
            start += len(ids)
        assert start <= ROW_LENGTH
    return batch, sequences


def assert_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != {reference.shape}"
    diff = float(np.max(np.abs(ours - reference)))
    assert diff <= ATOL, f"{what}: max |diff| {diff:.2e} > {ATOL}"


def _position_kwargs(position_embedding_type: str) -> dict:
    extra = {} if position_embedding_type == "absolute" else dict(attn_implementation="eager")
    return dict(position_embedding_type=position_embedding_type, **extra)


@pytest.mark.parametrize("position_embedding_type", ["absolute", "relative_key", "relative_key_query"])
def test_token_classification(make_repo, position_embedding_type):
    directory, torch_model = make_repo(
        "token-classification", **BASE_LAYOUT, **_position_kwargs(position_embedding_type)
    )
    batch, sequences = pack(torch_model.config.vocab_size)
    logits = from_pretrained(directory)(**batch)["logits"]  # [B, L, C]
    for i, sequence in enumerate(sequences):
        reference = sequence.alone(torch_model)["logits"]  # [n, C]
        assert_close(logits[sequence.row, sequence.span], reference, f"sequence {i}")


def test_question_answering(make_repo):
    directory, torch_model = make_repo("question-answering", **BASE_LAYOUT)
    batch, sequences = pack(torch_model.config.vocab_size)
    outputs = from_pretrained(directory)(**batch)  # [B, L] each
    for i, sequence in enumerate(sequences):
        reference = sequence.alone(torch_model)
        for name in ("start_logits", "end_logits"):
            assert_close(outputs[name][sequence.row, sequence.span], reference[name], f"sequence {i} {name}")


# The heads below read a few tokens, and only those go through the last layer (their queries gathered per
# row, relative distances included), so they run with every position type.
@pytest.mark.parametrize("position_embedding_type", ["absolute", "relative_key", "relative_key_query"])
def test_masked_lm_at_positions(make_repo, position_embedding_type):
    """positions [B, K]: per-row token indices; logits [B, K, V] only there. Rows with fewer chosen tokens
    repeat index 0, which is ignored."""
    directory, torch_model = make_repo(
        "masked-lm", **BASE_LAYOUT, **_position_kwargs(position_embedding_type)
    )
    batch, sequences = pack(torch_model.config.vocab_size)
    chosen: list[list[tuple[int, int]]] = [[] for _ in ROWS]  # per row: (sequence, offset in it)
    for i, sequence in enumerate(sequences):
        n = len(sequence.input_ids)
        chosen[sequence.row] += [(i, 0), (i, n // 2), (i, n - 1)]  # [CLS], a middle token, the last [SEP]
    width = max(len(c) for c in chosen)
    positions = np.zeros((len(ROWS), width), np.int64)
    for row, picks in enumerate(chosen):
        positions[row, : len(picks)] = [sequences[i].start + offset for i, offset in picks]

    logits = from_pretrained(directory)(**batch, positions=positions)["logits"]  # [B, K, V]
    assert logits.shape == (len(ROWS), width, torch_model.config.vocab_size)
    alone = [sequence.alone(torch_model)["logits"] for sequence in sequences]  # [n, V] each
    for row, picks in enumerate(chosen):
        for k, (i, offset) in enumerate(picks):
            assert_close(logits[row, k], alone[i][offset], f"row {row} position {k}")


@pytest.mark.parametrize("position_embedding_type", ["absolute", "relative_key", "relative_key_query"])
def test_sequence_classification_at_cls_positions(make_repo, position_embedding_type):
    """cls_positions [B, K]: where each packed sequence's [CLS] is; logits [B, K, C], one per sequence."""
    directory, torch_model = make_repo(
        "sequence-classification", **BASE_LAYOUT, **_position_kwargs(position_embedding_type)
    )
    batch, sequences = pack(torch_model.config.vocab_size)
    width = max(len(members) for members in ROWS)
    cls_positions = np.zeros((len(ROWS), width), np.int64)  # unused slots point at token 0, ignored
    for row, members in enumerate(ROWS):
        cls_positions[row, : len(members)] = [sequences[i].start for i in members]

    logits = from_pretrained(directory)(**batch, cls_positions=cls_positions)["logits"]  # [B, K, C]
    for row, members in enumerate(ROWS):
        for k, i in enumerate(members):
            assert_close(logits[row, k], sequences[i].alone(torch_model)["logits"], f"sequence {i}")


def test_without_segments_sequences_would_mix(make_repo):
    """The control: the same packed row without segment_ids lets sequences attend to each other, and the
    per-sequence results move far beyond the tolerance. So the tests above do test the segment mask."""
    directory, torch_model = make_repo("token-classification", **BASE_LAYOUT)
    batch, sequences = pack(torch_model.config.vocab_size)
    del batch["segment_ids"]
    logits = from_pretrained(directory)(**batch)["logits"]
    diffs = [np.max(np.abs(logits[s.row, s.span] - s.alone(torch_model)["logits"])) for s in sequences]
    assert min(diffs) > 100 * ATOL, diffs
