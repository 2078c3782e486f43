"""The engine: ahead-of-time compiled forward passes over a grid of shapes, and packing sequences into them.

A batch is `rows` rows of `length` tokens (a *bucket*). Short sequences are packed several to a row
(each keeps its own positions, and attention stays within it; see model/modules.py), so padding is only
what is left at the end of rows. Every bucket of the grid is compiled before the service is ready, and a
batch is only ever run through an already compiled bucket: a compiled executable refuses any other shape,
so nothing can compile while serving.

With several local devices the rows of a batch are split across them (data parallel), parameters
replicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import PretrainedAlbert

from .tasks.base import ModelInput
from .tasks.embed import embedding_fn, embedding_params, prompt_lengths_for

log = logging.getLogger(__name__)

# The compiled programs: "classify" (the first token of each sequence through the last layer, then the
# classifier), "tokens" (per-token outputs: QA and NER heads), "fill-mask" (features, then the vocabulary
# projection at the mask positions only). The four original task names are accepted for their program.
# "embed" pools each sequence inside the program (sentence-transformers' modules; see tasks/embed.py), so
# only the pooled vectors leave the device.
PROGRAMS = ("classify", "tokens", "fill-mask", "embed")
_PROGRAM_OF = {"qa": "tokens", "ner": "tokens"}
MAX_MASK_CHUNK = 256
# Smallest sequence an endpoint produces ([CLS] x [SEP]); bounds how many sequences share a row.
MIN_SEQUENCE = 3
MAX_SEQUENCES_PER_ROW = 16


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


# --- The jitted functions, one per program ---------------------------------------------------------------
# Each takes the parameters as an argument (not a closed-over constant): smaller programs, faster compiles.


def _classify_fn(module):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens):
        def head(m):
            # Only each sequence's first token is pooled, so only those go through the last layer.
            first = m.albert(
                input_ids, None, token_type_ids, position_ids, segment_ids, output_positions=first_tokens
            )  # [R, K, H]
            return m.classifier(m.albert.pool(first)).astype(jnp.float32)  # [R, K, C]

        return {"logits": module.apply({"params": params}, method=head)}

    return fn


def _token_fn(module):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids):
        return module.apply(
            {"params": params},
            input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            segment_ids=segment_ids,
        )

    return fn


def _mlm_features_fn(module):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids):
        features = module.apply(
            {"params": params},
            input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            segment_ids=segment_ids,
            method=type(module).mlm_features,
        )
        return {"features": features}  # [R, Lr, E]

    return fn


def _mlm_probs_fn(module):
    def fn(params, features):  # [M, E]
        logits = module.apply({"params": params}, features, method=type(module).vocab_logits)  # [M, V] f32
        return {"probs": jax.nn.softmax(logits, axis=-1)}

    return fn


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes = [start]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


class ModelRunner:
    """One model: its compiled buckets, and `run` from sequences to per-sequence outputs."""

    def __init__(
        self,
        program: str,
        model: PretrainedAlbert,
        buckets: list[Bucket],
        devices: list | None = None,
        *,
        embedding=None,
    ):
        """`embedding`: the embed program's pooling and head (a tasks.embed.EmbeddingConfig)."""
        self.program = _PROGRAM_OF.get(program, program)
        if self.program not in PROGRAMS:
            raise ValueError(f"unknown program {program!r}; expected one of {', '.join(PROGRAMS)}")
        self.model = model
        self.config = model.config
        self.devices = devices or jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._by_rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self.embedding = embedding
        params = embedding_params(model.params, embedding) if self.program == "embed" else model.params
        self.params = jax.device_put(params, self._replicated)
        self.buckets = buckets
        cfg = self.config
        # Attention FLOPs per token per unit of row length, relative to the matmul FLOPs per token.
        matmul = 4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size
        self.packer = Packer(buckets, attention_cost_per_token=2 * cfg.hidden_size / matmul)
        self._compiled: dict[Any, Callable] = {}
        self._seconds: dict[Bucket, float] = {}  # measured run time of each bucket
        # Vocabulary projections run in chunks of at most this many masks: [256, 30000] float32 is 30 MB.
        largest_chunk = max(len(self.devices), min(self.packer.max_tokens, MAX_MASK_CHUNK))
        self._mask_sizes = (
            _powers_of_two_up_to(largest_chunk, start=len(self.devices))
            if self.program == "fill-mask"
            else []
        )

    # -- compilation ------------------------------------------------------------------------------------

    def _spec(self, shape, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._by_rows)

    def _param_specs(self):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), self.params
        )

    def _programs(self) -> list[tuple[Any, str, Callable, list[jax.ShapeDtypeStruct]]]:
        """(key, label, jitted function, argument specs) for every executable this model needs."""
        module = self.model.module
        if self.program == "embed":
            main = jax.jit(embedding_fn(module, self.embedding))
        else:
            build = {"classify": _classify_fn, "tokens": _token_fn, "fill-mask": _mlm_features_fn}[
                self.program
            ]
            main = jax.jit(build(module))
        programs = []
        for bucket in self.buckets:
            shape = (bucket.rows, bucket.length)
            specs = [self._spec(shape) for _ in range(4)]
            slots = (bucket.rows, sequences_per_row(bucket.length))
            if self.program == "classify":
                specs.append(self._spec(slots))
            elif self.program == "embed":
                specs += [self._spec(slots), self._spec(slots)]  # first tokens, prompt lengths
            programs.append((bucket, str(bucket), main, specs))
        if self.program == "fill-mask":
            vocab = jax.jit(_mlm_probs_fn(module))
            for size in self._mask_sizes:
                spec = self._spec((size, self.config.embedding_size), self.model.dtype)
                programs.append((("vocab", size), f"vocab x{size}", vocab, [spec]))
        return programs

    def program_count(self) -> int:
        return len(self.buckets) + len(self._mask_sizes)

    def compile_all(
        self, threads: int = 2, costs_file: Path | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[str, float]]:
        """Compile every executable, then time one run of each bucket; yields (label, compile seconds).

        XLA compiles outside the GIL, so `threads` compile side by side; the timed runs go one at a time, as
        they must have the machine to themselves (the first run also pays each executable's one-off costs
        before any request does). Measured times become the packer's costs. With `costs_file`, times measured
        by an earlier start of the same model on the same machine are reused instead of measured again.
        Compiles are handed out `threads` at a time, so once `stop` is set no new one starts and this returns
        after those in progress (a shutdown during start-up waits for at most one compile per thread).
        """
        params = self._param_specs()
        programs = self._programs()
        _, _, jitted, specs = programs[0]
        costs_key = self._costs_key(
            jitted.lower(params, *specs).as_text()
        )  # traced once; compiling reuses it

        def compile_one(program):
            key, label, jitted, specs = program
            start = time.perf_counter()
            executable = jitted.lower(params, *specs).compile()
            return key, label, executable, specs, time.perf_counter() - start

        compiled = []
        waiting = iter(programs)
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="compile") as pool:
            running: deque = deque()

            def hand_out():
                while len(running) < max(1, threads) and not (stop is not None and stop.is_set()):
                    program = next(waiting, None)
                    if program is None:
                        return
                    running.append(pool.submit(compile_one, program))

            hand_out()
            while running:
                key, label, executable, specs, seconds = running.popleft().result()
                self._compiled[key] = executable
                compiled.append((key, executable, specs))
                yield label, seconds
                hand_out()
        if stop is not None and stop.is_set():
            return
        known = self._read_costs(costs_file, costs_key)
        for key, executable, specs in compiled:
            if isinstance(key, Bucket) and str(key) in known:
                self._seconds[key] = known[str(key)]
                continue
            seconds = self._timed_run(executable, specs)
            if isinstance(key, Bucket):
                self._seconds[key] = seconds
        self.packer.set_measured_costs(self._seconds)
        self._write_costs(costs_file, costs_key)

    def _timed_run(self, executable, specs: list[jax.ShapeDtypeStruct]) -> float:
        zeros = [np.zeros(spec.shape, spec.dtype) for spec in specs]
        start = time.perf_counter()
        jax.block_until_ready(executable(self.params, *zeros))
        return time.perf_counter() - start

    def _costs_key(self, program_text: str) -> str:
        """What measured costs depend on: the program (the smallest bucket's text holds the model's shapes,
        dtype and code), the devices and the JAX version."""
        identity = {
            "kind": self.program,
            "program": hashlib.sha256(program_text.encode()).hexdigest(),
            "devices": [d.device_kind for d in self.devices],
            "jax": jax.__version__,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def _read_costs(self, costs_file: Path | None, key: str) -> dict[str, float]:
        if costs_file is None or not costs_file.is_file():
            return {}
        try:
            return json.loads(costs_file.read_text()).get(key, {})
        except (OSError, ValueError, AttributeError):
            return {}  # a damaged file only costs the measurement

    def _write_costs(self, costs_file: Path | None, key: str) -> None:
        if costs_file is None:
            return
        try:
            costs_file.parent.mkdir(parents=True, exist_ok=True)
            table = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
            table[key] = {str(b): seconds for b, seconds in self._seconds.items()}
            costs_file.write_text(json.dumps(table, indent=1))
        except (OSError, ValueError) as exc:
            log.warning("could not save bucket costs to %s: %s", costs_file, exc)

    # -- running ----------------------------------------------------------------------------------------

    def run(
        self, sequences: list[ModelInput], plan: Plan | None = None
    ) -> tuple[list[dict[str, np.ndarray]], PackedBatch]:
        """Run `sequences`, laid out by `plan` (which must place them all; by default the cheapest bucket
        holding them), and return each one's outputs."""
        batch = self.packer.pack(sequences, plan)
        executable = self._compiled[batch.bucket]
        # numpy in: the executable transfers (and shards) its inputs itself, cheaper than device_put calls.
        inputs = (batch.input_ids, batch.token_type_ids, batch.position_ids, batch.segment_ids)
        if self.program == "classify":
            logits = np.asarray(executable(self.params, *inputs, batch.first_tokens)["logits"])
            return [{"logits": logits[r, k]} for r, k in batch.slots], batch
        if self.program == "embed":
            prompts = prompt_lengths_for(batch, sequences)
            vectors = np.asarray(executable(self.params, *inputs, batch.first_tokens, prompts)["embedding"])
            return [{"embedding": vectors[r, k]} for r, k in batch.slots], batch
        outputs = {name: np.asarray(value) for name, value in executable(self.params, *inputs).items()}
        if self.program == "fill-mask":
            return self._fill_mask_outputs(sequences, batch, outputs["features"]), batch
        results = []
        for r, offset, n in batch.placements:
            results.append({name: value[r, offset : offset + n] for name, value in outputs.items()})
        return results, batch

    def _fill_mask_outputs(
        self, sequences, batch: PackedBatch, features: np.ndarray
    ) -> list[dict[str, np.ndarray]]:
        # Only the mask positions are projected onto the vocabulary.
        rows, cols, counts = [], [], []
        for seq, (r, offset, _) in zip(sequences, batch.placements, strict=True):
            positions = seq.mask_positions if seq.mask_positions is not None else np.zeros(0, np.int32)
            rows.extend([r] * len(positions))
            cols.extend(offset + int(p) for p in positions)
            counts.append(len(positions))
        gathered = features[np.asarray(rows, np.int64), np.asarray(cols, np.int64)]  # [M, E]
        probs = np.zeros((0, self.config.vocab_size), np.float32)
        if len(gathered):
            chunks = []
            largest = self._mask_sizes[-1]
            for start in range(0, len(gathered), largest):
                chunk = gathered[start : start + largest]
                size = next(s for s in self._mask_sizes if s >= len(chunk))
                padded = np.zeros((size, chunk.shape[1]), chunk.dtype)
                padded[: len(chunk)] = chunk
                out = self._compiled[("vocab", size)](self.params, padded)["probs"]
                chunks.append(np.asarray(out)[: len(chunk)])
            probs = np.concatenate(chunks)
        results, start = [], 0
        for count in counts:
            results.append({"probs": probs[start : start + count]})
            start += count
        return results
