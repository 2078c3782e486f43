"""Packing: several short sequences share a row (each keeps its own positions, and attention stays within it;
see model/modules.py), so padding is only what is left at the end of rows; and the choice, among compiled
buckets, of the batch that serves the most tokens per second of measured device time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tasks.base import ModelInput
from .buckets import Bucket

# Smallest sequence an endpoint produces ([CLS] x [SEP]); bounds how many sequences share a row.
MIN_SEQUENCE = 3
MAX_SEQUENCES_PER_ROW = 16


@dataclass
class PackedBatch:
    """Sequences laid out in a bucket, plus where each one went."""

    bucket: Bucket
    input_ids: np.ndarray  # int32 [R, Lr]
    token_type_ids: np.ndarray  # int32 [R, Lr]
    position_ids: np.ndarray  # int32 [R, Lr]
    segment_ids: np.ndarray  # int32 [R, Lr], 0 = padding
    first_tokens: np.ndarray  # int32 [R, K]: offset of each row's k-th sequence (0 where none)
    placements: list[tuple[int, int, int]]  # per sequence: (row, offset, length)
    slots: list[tuple[int, int]]  # per sequence: (row, k)

    @property
    def real_tokens(self) -> int:
        return sum(length for _, _, length in self.placements)

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.bucket.tokens


def sequences_per_row(length: int) -> int:
    """Most sequences packed into one row. Classification runs the last layer only for each sequence's
    first token, at this many slots per row whether used or not, so it is capped (a row of 224 tokens would
    otherwise reserve 74 slots for the handful of sequences it ever holds)."""
    return max(1, min(length // MIN_SEQUENCE, MAX_SEQUENCES_PER_ROW))


@dataclass
class Plan:
    """Which of the offered sequences go into which bucket, row by row (indices into the offered list)."""

    bucket: Bucket
    rows: list[list[int]]

    @property
    def chosen(self) -> list[int]:
        return sorted(i for row in self.rows for i in row)


def _fill_rows(
    lengths: list[int], row_length: int, max_rows: int, per_row: int, required: int = 1
) -> list[list[int]] | None:
    """Place the first `required` sequences (those that must go: the oldest) in order, then the others longest
    first, each in the first row with room, opening rows up to `max_rows`; other sequences that fit nowhere
    are left out. Rows come back in the order they were opened. None if a required sequence does not fit."""
    rows: list[list[int]] = []
    free: list[int] = []
    order = [*range(required), *sorted(range(required, len(lengths)), key=lambda i: -lengths[i])]
    for index in order:
        need = lengths[index]
        for r, room in enumerate(free):
            if need <= room and len(rows[r]) < per_row:
                rows[r].append(index)
                free[r] -= need
                break
        else:
            if len(rows) < max_rows and need <= row_length:
                rows.append([index])
                free.append(row_length - need)
            elif index < required:
                return None
    return rows


class Packer:
    """Chooses, among compiled buckets, the batch that serves the most tokens per second.

    Given the waiting sequences in arrival order, each candidate bucket is filled (the oldest sequence
    always, then the others longest first) and scored by real tokens served per second of its measured
    run time. So a lone request gets the smallest bucket that holds it, and under load a bucket is filled
    to the brim rather than a bigger one padded; whatever does not fit waits for the next batch, first in
    line, and is never passed over twice (the batcher marks it required). Costs start from a FLOP estimate
    and are replaced by each bucket's measured time at warm-up.
    """

    def __init__(self, buckets: list[Bucket], attention_cost_per_token: float):
        self.buckets = sorted(buckets)
        self.lengths = sorted({b.length for b in buckets})
        self.max_length = self.lengths[-1]
        self.max_tokens = max(b.tokens for b in buckets)
        self._rows_by_length = {n: sorted(b.rows for b in buckets if b.length == n) for n in self.lengths}
        self._min_rows = min(b.rows for b in buckets)
        # Until measured: matmul work per token, plus attention's per token and unit of row length (it is
        # quadratic in the row).
        self._costs = {b: b.tokens * (1.0 + attention_cost_per_token * b.length) for b in self.buckets}

    def cost(self, bucket: Bucket) -> float:
        return self._costs[bucket]

    def set_measured_costs(self, seconds: dict[Bucket, float]) -> None:
        """Use measured run times; smoothed so a bigger bucket never looks cheaper than a smaller one."""
        costs = dict(seconds)
        for bucket in sorted(costs, key=lambda b: (b.length, b.rows)):
            smaller = [
                costs[b] for b in costs if b.length <= bucket.length and b.rows <= bucket.rows and b != bucket
            ]
            costs[bucket] = max([costs[bucket], *smaller])
        self._costs.update(costs)

    def _candidate_lengths(self, lengths: list[int], required: int) -> list[int]:
        # Row lengths worth trying: every length that offers more than the fewest rows, and among the others
        # the smallest holding the required sequences one by one, all together, and everything offered.
        longest = max(lengths[:required])
        fitting = [n for n in self.lengths if n >= longest]
        candidates = set(fitting[:1])
        for total in (sum(lengths[:required]), sum(lengths)):
            candidates.update([n for n in fitting if n >= total][:1])
        candidates.update(n for n in fitting if self._rows_by_length[n][-1] > self._min_rows)
        return sorted(candidates)

    def plan(self, lengths: list[int], required: int = 1) -> Plan | None:
        """The best batch from sequences of these lengths, in arrival order; the first `required` must be in it
        (the oldest, and any passed over before). None if they cannot all go in one bucket."""
        if not lengths or max(lengths[:required]) > self.max_length:
            return None
        best, best_score = None, -1.0
        for row_length in self._candidate_lengths(lengths, required):
            row_counts = self._rows_by_length[row_length]
            rows = _fill_rows(lengths, row_length, row_counts[-1], sequences_per_row(row_length), required)
            if rows is None:
                continue
            fills = [sum(lengths[i] for i in row) for row in rows]
            # Rows holding required sequences, then the fullest others: the best `count` rows of this filling.
            must = [r for r, row in enumerate(rows) if min(row) < required]
            order = [*must, *sorted((r for r in range(len(rows)) if r not in must), key=lambda r: -fills[r])]
            for count in row_counts:
                if count < len(must):
                    continue
                kept = order[:count]
                bucket = Bucket(count, row_length)
                score = sum(fills[r] for r in kept) / self.cost(bucket)
                if score > best_score * (1 + 1e-9):
                    best, best_score = Plan(bucket, [rows[r] for r in kept]), score
                if count >= len(rows):
                    break  # more rows would only add padding
        return best

    def plan_all(self, lengths: list[int]) -> Plan | None:
        """The cheapest bucket holding every one of `lengths`; None if none can."""
        best = None
        for row_length in self.lengths:
            if row_length < max(lengths):
                continue
            order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
            rows = _fill_rows(
                [lengths[i] for i in order], row_length, len(lengths), sequences_per_row(row_length)
            )
            rows = [[order[i] for i in row] for row in rows]
            fitting = [r for r in self._rows_by_length[row_length] if r >= len(rows)]
            if fitting and (
                best is None or self.cost(Bucket(fitting[0], row_length)) < self.cost(best.bucket)
            ):
                best = Plan(Bucket(fitting[0], row_length), rows)
        return best

    def pack(self, sequences: list[ModelInput], plan: Plan | None = None) -> PackedBatch:
        """Lay out `sequences` as `plan` says (by default, all of them in the cheapest bucket holding them).

        The plan must place every one of `sequences`."""
        lengths = [len(s) for s in sequences]
        if plan is None:
            plan = self.plan_all(lengths)
            if plan is None:
                raise ValueError(f"no compiled bucket holds sequences of lengths {lengths}")
        if plan.chosen != list(range(len(sequences))):
            raise ValueError("the plan does not place every sequence exactly once")
        bucket = plan.bucket
        shape = (bucket.rows, bucket.length)
        input_ids = np.zeros(shape, np.int32)
        token_type_ids = np.zeros(shape, np.int32)
        position_ids = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        first_tokens = np.zeros((bucket.rows, sequences_per_row(bucket.length)), np.int32)
        placements: list[tuple[int, int, int]] = [(0, 0, 0)] * len(sequences)
        slots: list[tuple[int, int]] = [(0, 0)] * len(sequences)
        for r, members in enumerate(plan.rows):
            offset = 0
            for k, index in enumerate(members):
                seq, n = sequences[index], lengths[index]
                input_ids[r, offset : offset + n] = seq.input_ids
                token_type_ids[r, offset : offset + n] = seq.token_type_ids
                position_ids[r, offset : offset + n] = np.arange(n, dtype=np.int32)
                segment_ids[r, offset : offset + n] = k + 1
                first_tokens[r, k] = offset
                placements[index] = (r, offset, n)
                slots[index] = (r, k)
                offset += n
        return PackedBatch(
            bucket, input_ids, token_type_ids, position_ids, segment_ids, first_tokens, placements, slots
        )
