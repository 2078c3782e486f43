"""Buckets: the (rows x row length) shapes a model's programs are compiled for, and which of them make a model
able to answer anything (the covering set)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Bucket:
    rows: int
    length: int

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    def __str__(self) -> str:
        return f"{self.rows}x{self.length}"


def default_single_row_lengths(max_length: int) -> list[int]:
    """Lengths for a lone request: steps of 2 tokens up to 64, then 8, 16 and 32 (one padding token at most
    below 64 tokens, 11% above). A padding token costs as much as a real one: on albert-base one token is
    2-3% of a short request's forward pass. (Every length up to 32 would save about 1% more, for a quarter
    more executables: start-up time and memory.)"""
    lengths, n = [], 4
    while n < max_length:
        lengths.append(n)
        n += 2 if n < 64 else 8 if n < 128 else 16 if n < 256 else 32
    return [*lengths, max_length]


def bucket_grid(
    max_length: int,
    *,
    single_row_lengths: list[int],
    multi_row_lengths: list[int],
    row_counts: list[int],
    max_batch_tokens: int,
    devices: int = 1,
) -> list[Bucket]:
    """The (rows, length) shapes to compile.

    One row at any of `single_row_lengths` (a lone request pays for little padding); several rows at the
    coarser `multi_row_lengths`, within `max_batch_tokens`. Lengths above `max_length` are dropped and
    `max_length` itself is always present, so every sequence fits somewhere. Row counts are rounded up to
    a multiple of the device count, since rows are split across devices.
    """

    def rows_for(n: int) -> int:
        return devices * math.ceil(n / devices)

    def clip(lengths: list[int]) -> list[int]:
        return sorted({n for n in lengths if n < max_length} | {max_length})

    grid = {
        Bucket(rows_for(1), n) for n in clip(single_row_lengths or default_single_row_lengths(max_length))
    }
    multi = clip(multi_row_lengths or [32, 64, 128, 256, 512])
    for rows in row_counts:
        if rows <= 1:
            continue
        for length in multi:
            if rows * length <= max_batch_tokens:
                grid.add(Bucket(rows_for(rows), length))
    return sorted(grid, key=lambda b: (b.tokens, b.length))


def covering_buckets(grid: list[Bucket]) -> list[Bucket]:
    """The buckets compiled before a model is ready: with them it answers any request without compiling, and
    at close to its full speed while the rest of the grid compiles in the background. One row of the maximum
    length (every sequence fits), one of 64 and one of 128 tokens (a lone request pays little padding), and
    multi-row buckets of about 256, 512 and 1024 tokens besides the biggest (under load, packed batches of
    every size find a bucket they mostly fill: with the biggest alone, a batch of 300 tokens paid for 2048).
    Among equal sizes rows of about 128 tokens: long enough to pack short requests with little waste at the
    row ends, short enough that attention stays cheap."""
    fewest = min(b.rows for b in grid)
    singles = sorted(b for b in grid if b.rows == fewest)
    cover = {singles[-1]}
    for length in (64, 128):
        cover.add(next((b for b in singles if b.length >= length), singles[0]))
    multi = [b for b in grid if b.rows > fewest]
    if multi:
        cover.add(min(multi, key=lambda b: (-b.tokens, b.length)))
        for tokens in (256, 512, 1024):
            fitting = [b for b in multi if b.tokens >= tokens]
            if fitting:
                cover.add(min(fitting, key=lambda b: (b.tokens, abs(b.length - 128))))
    return sorted(cover)
