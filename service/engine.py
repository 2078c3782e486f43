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

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
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
from model.modules import AlbertModel

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


# --- Programs, shared across models ------------------------------------------------------------------------
# A compiled executable takes the parameters as arguments, so one executable serves every model whose
# parameters have the same shapes and dtypes. The programs are cut where models of one backbone differ:
#
#   "classify"  the backbone with its pooler; the last layer only at each sequence's first token
#               -> pooled [R, K, H] float32
#   "tokens"    the backbone -> hidden [R, L, H] float32: QA, NER and fill-mask all run this one
#   "vocab"     fill-mask's transform and vocabulary projection, at the mask positions only -> probs [M, V]
#   "embed"     tasks/embed.py's embedding_fn (pooling and the sentence-transformers head inside), keyed by
#               its pooling and head shapes too
#
# and the small heads in which models of one backbone differ (a classifier of 2 or 7 labels, NER's [H, C],
# QA's [H, 2]) run on the host in float32 numpy after the program: a few thousand multiply-adds per token.
# Each (program kind, backbone configuration less its labels, dtype, parameter shapes, devices) is one
# ProgramSet, process-wide, holding one executable per bucket and each bucket's measured run time.

# AlbertConfig fields that only the heads read (or nothing at inference): left out of the sharing key.
_HEAD_FIELDS = frozenset({"id2label", "problem_type", "architectures", "extra", "classifier_dropout_prob"})


def backbone_signature(config) -> tuple:
    """The configuration a backbone program depends on: every AlbertConfig field but the heads'."""
    return tuple(
        (f.name, getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in _HEAD_FIELDS
    )


def _tree_signature(tree) -> tuple:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple((jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype)) for path, x in leaves)


def _embedding_signature(embedding) -> tuple:
    steps = tuple(
        ("dense", s.in_features, s.out_features, s.activation, s.bias is not None)
        if hasattr(s, "in_features")
        else (type(s).__name__,)
        for s in embedding.steps
    )
    return (tuple(embedding.pooling_modes), bool(embedding.include_prompt), steps)


def _classify_program(backbone):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens):
        def run(m):
            # Only each sequence's first token is pooled, so only those go through the last layer.
            first = m(
                input_ids, None, token_type_ids, position_ids, segment_ids, output_positions=first_tokens
            )
            return m.pool(first).astype(jnp.float32)  # [R, K, H]

        return {"pooled": backbone.apply({"params": params}, method=run)}

    return fn


def _tokens_program(backbone):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids):
        hidden = backbone.apply(
            {"params": params}, input_ids, None, token_type_ids, position_ids, segment_ids
        )
        return {"hidden": hidden.astype(jnp.float32)}  # [R, L, H]

    return fn


def _vocab_program(mlm_module):
    def fn(params, hidden):  # [M, H] float32
        def run(m, h):
            return m.vocab_logits(m.predictions.transform(h))  # [M, V] float32

        logits = mlm_module.apply({"params": params}, hidden, method=run)
        return {"probs": jax.nn.softmax(logits, axis=-1)}

    return fn


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes = [start]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def covering_buckets(grid: list[Bucket]) -> list[Bucket]:
    """The few buckets that let a model answer any request without compiling: one row of the maximum length
    (every sequence fits), one short row (a lone short request pays little padding) and the biggest
    multi-row bucket (several requests share a pass under load). The rest of the grid only makes batches
    cheaper, and compiles in the background."""
    fewest = min(b.rows for b in grid)
    singles = sorted(b for b in grid if b.rows == fewest)
    cover = {singles[-1], next((b for b in singles if b.length >= 64), singles[0])}
    multi = [b for b in grid if b.rows > fewest]
    if multi:
        cover.add(min(multi, key=lambda b: (-b.tokens, b.length)))
    return sorted(cover)


def _source_hash() -> str:
    """The code a program's run time depends on (measured costs are kept per version of it)."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for name in ("model/modules.py", "model/layers.py", "service/engine.py", "service/tasks/embed.py"):
        with contextlib.suppress(OSError):
            digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


class ProgramSet:
    """One program kind for one backbone shape: an executable per program key (a Bucket, or a number of
    masks for "vocab"), shared by every model with those parameter shapes, and each bucket's run time."""

    def __init__(self, key: tuple, kind: str, jitted, param_specs, arg_specs: Callable, devices: list):
        self.key = key
        self.kind = kind
        self.jitted = jitted
        self.param_specs = param_specs
        self._arg_specs = arg_specs
        self.devices = devices
        self.label = f"{kind}:{hashlib.sha256(repr(key).encode()).hexdigest()[:8]}"
        self.compiled: dict[Any, Callable] = {}
        self.compiles = 0  # XLA compiles (or persistent-cache reads) this set did
        self.seconds: dict[Bucket, float] = {}  # measured alone (or by an earlier start): the packer's costs
        self.rough: dict[Bucket, float] = {}  # one run at start-up, until measured properly
        self.runners: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pending: dict[Any, threading.Event] = {}
        self._costs_loaded: set[Path] = set()
        identity = {"key": repr(key), "jax": jax.__version__, "code": _source_hash()}
        self.costs_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ProgramSet({self.label}, {len(self.compiled)} compiled)"

    def arg_specs(self, key) -> list[jax.ShapeDtypeStruct]:
        return self._arg_specs(key)

    def compile(self, key) -> float | None:
        """Compile `key` unless it is (or is being) compiled; the compile seconds, None if it was not this
        call that compiled it."""
        with self._lock:
            if key in self.compiled:
                return None
            event = self._pending.get(key)
            owner = event is None
            if owner:
                event = self._pending[key] = threading.Event()
        if not owner:
            event.wait()
            return None
        try:
            start = time.perf_counter()
            executable = self.jitted.lower(self.param_specs, *self.arg_specs(key)).compile()
            seconds = time.perf_counter() - start
            with self._lock:
                self.compiled[key] = executable
                self.compiles += 1
            return seconds
        finally:
            with self._lock:
                self._pending.pop(key, None)
            event.set()

    def params(self):
        """Some model's parameters, to time a run with."""
        for runner in list(self.runners):
            return runner.params
        return None

    def time_run(self, key, *, warm: bool) -> float | None:
        params = self.params()
        executable = self.compiled.get(key)
        if params is None or executable is None:
            return None
        zeros = [np.zeros(spec.shape, spec.dtype) for spec in self.arg_specs(key)]
        if warm:
            jax.block_until_ready(executable(params, *zeros))
        start = time.perf_counter()
        jax.block_until_ready(executable(params, *zeros))
        return time.perf_counter() - start

    def cost(self, bucket: Bucket, estimate: Callable[[Bucket], float]) -> float:
        """Measured seconds; else one rough run's; else the FLOP estimate scaled by the buckets timed."""
        if bucket in self.seconds:
            return self.seconds[bucket]
        if bucket in self.rough:
            return self.rough[bucket]
        timed = {**self.rough, **self.seconds}
        if not timed:
            return estimate(bucket)
        x = np.array([estimate(b) for b in timed])
        y = np.array(list(timed.values()))
        if len(timed) >= 2:
            (fixed, per_unit), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
            if fixed >= 0 and per_unit > 0:
                return float(fixed + per_unit * estimate(bucket))
        return float(np.mean(y / x) * estimate(bucket))

    def load_costs(self, costs_file: Path | None) -> None:
        if costs_file is None or costs_file in self._costs_loaded:
            return
        self._costs_loaded.add(costs_file)
        for label, seconds in _read_costs(costs_file, self.costs_id).items():
            with contextlib.suppress(ValueError):
                rows, length = (int(n) for n in label.split("x"))
                self.seconds.setdefault(Bucket(rows, length), float(seconds))

    def save_costs(self, costs_file: Path | None) -> None:
        if costs_file is not None and self.seconds:
            _write_costs(costs_file, self.costs_id, {str(b): s for b, s in self.seconds.items()})

    def refresh(self) -> None:
        """Tell every model using these programs to plan with what is compiled now."""
        for runner in list(self.runners):
            runner.refresh()


_SETS: dict[tuple, ProgramSet] = {}
_SETS_LOCK = threading.Lock()


def _program_set(key: tuple, make: Callable[[], ProgramSet]) -> ProgramSet:
    with _SETS_LOCK:
        found = _SETS.get(key)
        if found is None:
            found = _SETS[key] = make()
        return found


def program_sets() -> list[ProgramSet]:
    """Every program set of this process."""
    with _SETS_LOCK:
        return list(_SETS.values())


def _read_costs(costs_file: Path, key: str) -> dict[str, float]:
    if not costs_file.is_file():
        return {}
    try:
        found = json.loads(costs_file.read_text()).get(key, {})
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # a damaged file only costs the measurement


_COSTS_LOCK = threading.Lock()


def _write_costs(costs_file: Path, key: str, costs: dict[str, float]) -> None:
    with _COSTS_LOCK:
        try:
            costs_file.parent.mkdir(parents=True, exist_ok=True)
            try:
                table = json.loads(costs_file.read_text()) if costs_file.is_file() else {}
            except ValueError:
                table = {}
            table[key] = costs
            partial = costs_file.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(table, indent=1))
            partial.replace(costs_file)
        except OSError as exc:
            log.warning("could not save bucket costs to %s: %s", costs_file, exc)


# Niceness of the background compile threads (Linux: per thread). Requests' threads (nice 0) get about nine
# tenths of a contested core; the lowest priority (19) would starve the grid on a machine others load too.
BACKGROUND_NICE = 10


def _lower_priority() -> None:
    """Background compiles run at a low CPU priority, so requests come first."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def release_memory() -> None:
    """Hand back what compiling left behind: JAX's tracing and lowering caches (about 3.5 MB per albert-base
    bucket; serving runs only the compiled executables, which hold their own) and the C heap's free pages
    (XLA and LLVM leave tens of MB per compile free but resident in malloc's arenas). Call it when no
    compile is in progress."""
    jax.clear_caches()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _compile_many(
    work: list[tuple[ProgramSet, Any]], threads: int, stop: threading.Event | None, background: bool = False
) -> Iterator[tuple[ProgramSet, Any, float]]:
    """Compile each (set, key) of `work`, `threads` side by side (XLA compiles outside the GIL); yields (set,
    key, compile seconds) for those this call compiled. Compiles are handed out `threads` at a time, so once
    `stop` is set no new one starts (a shutdown waits for at most one compile per thread)."""
    waiting = iter(work)
    threads = max(1, threads)
    with ThreadPoolExecutor(
        threads, thread_name_prefix="compile", initializer=_lower_priority if background else None
    ) as pool:
        running: deque = deque()

        def hand_out():
            while len(running) < threads and not (stop is not None and stop.is_set()):
                item = next(waiting, None)
                if item is None:
                    return
                running.append((item, pool.submit(item[0].compile, item[1])))

        hand_out()
        while running:
            (program_set, key), future = running.popleft()
            seconds = future.result()
            if seconds is not None:
                yield program_set, key, seconds
            hand_out()


def _label(key) -> str:
    return str(key) if isinstance(key, Bucket) else f"vocab x{key}"


def complete_grids(
    runners: list[ModelRunner],
    *,
    threads: int = 2,
    costs_file: Path | None = None,
    stop: threading.Event | None = None,
    background: bool = True,
) -> Iterator[tuple[ProgramSet, str, float]]:
    """Compile every program these models want that is not compiled yet, then time each bucket not measured
    yet (one run each, one at a time) and save the times; yields (set, label, compile seconds).

    Each model plans with every bucket as it lands (its cost estimated from those timed, until it is timed
    itself). In the background (`background`) the compile threads run at a low CPU priority (the timed runs
    at the caller's: they measure what requests will get)."""
    work, seen = [], set()
    for runner in runners:
        for program_set, key in runner.programs():
            if (id(program_set), key) not in seen:
                seen.add((id(program_set), key))
                work.append((program_set, key))
    # Cheapest first (the vocabulary projections, then short rows), interleaving the sets.
    work.sort(key=lambda item: (isinstance(item[1], Bucket), getattr(item[1], "tokens", item[1])))
    todo = [item for item in work if item[1] not in item[0].compiled]
    for runner in runners:
        runner.main.load_costs(costs_file)
        runner.warm_covering()
    for count, (program_set, key, seconds) in enumerate(_compile_many(todo, threads, stop, background), 1):
        program_set.refresh()
        if count % 16 == 0:
            with contextlib.suppress(OSError, AttributeError):  # the heap only: caches may be in use
                ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        yield program_set, _label(key), seconds
    release_memory()
    if stop is not None and stop.is_set():
        return
    touched = []
    for program_set, key in work:
        if not isinstance(key, Bucket) or key in program_set.seconds or key not in program_set.compiled:
            continue
        if stop is not None and stop.is_set():
            return
        seconds = program_set.time_run(key, warm=False)  # one run, as requests will see it
        if seconds is not None:
            program_set.seconds[key] = seconds
            program_set.refresh()
            if program_set not in touched:
                touched.append(program_set)
    for program_set in touched:
        program_set.save_costs(costs_file)
    release_memory()


class ModelRunner:
    """One model: its parameters (held once, on the devices), its head, the shared program sets it runs
    through, and `run` from sequences to per-sequence outputs."""

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
        self.config = cfg = model.config
        self.devices = devices or jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("data",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._by_rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self.embedding = embedding
        self.buckets = buckets
        self.cover = covering_buckets(buckets)
        # Attention FLOPs per token per unit of row length, relative to the matmul FLOPs per token.
        matmul = 4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size
        self._attention_cost = 2 * cfg.hidden_size / matmul
        self.packer: Packer | None = None  # once the covering buckets are compiled (see `refresh`)

        # The weights, once: placed on the devices (the host copy from loading is dropped), the model's tree
        # pointing at the placed arrays; the programs get sub-trees of it, the host heads float32 copies.
        model.params = jax.device_put(model.params, self._replicated)
        params = model.params
        dtype = jnp.dtype(model.dtype).name
        scan = getattr(model.module, "scan_layers", True)
        devices_key = tuple(str(d) for d in self.devices)
        common = (backbone_signature(cfg), dtype, scan, devices_key)
        self._head: dict[str, np.ndarray] = {}
        if self.program == "embed":
            self.params = embedding_params(params, embedding)
            key = (
                "embed",
                *common,
                type(model.module).__name__,
                _tree_signature(self.params),
                _embedding_signature(embedding),
            )
            fn = embedding_fn(model.module, embedding)
        else:
            self.params = params["albert"]
            pooled = self.program == "classify"
            key = (self.program if pooled else "tokens", *common, _tree_signature(self.params))
            backbone = AlbertModel(cfg, model.dtype, add_pooling_layer=pooled, scan_layers=scan)
            fn = (_classify_program if pooled else _tokens_program)(backbone)
            head = {"classify": "classifier"}.get(self.program) or next(
                (name for name in ("classifier", "qa_outputs") if name in params), None
            )
            if head is not None and self.program != "fill-mask":
                self._head = {
                    "name": head,
                    "kernel": np.asarray(params[head]["kernel"], np.float32),
                    "bias": np.asarray(params[head]["bias"], np.float32),
                }
        self.main = _program_set(
            key,
            lambda: ProgramSet(
                key, key[0], jax.jit(fn), self._param_specs(self.params), self._bucket_specs, self.devices
            ),
        )
        self.main.runners.add(self)

        self.vocab: ProgramSet | None = None
        self._mask_sizes: list[int] = []
        if self.program == "fill-mask":
            # Vocabulary projections run in chunks of at most this many masks: [256, 30000] float32 is 30 MB.
            largest_chunk = max(len(self.devices), min(max(b.tokens for b in buckets), MAX_MASK_CHUNK))
            self._mask_sizes = _powers_of_two_up_to(largest_chunk, start=len(self.devices))
            self._vocab_params = {
                "albert": {
                    "embeddings": {"word_embeddings": params["albert"]["embeddings"]["word_embeddings"]}
                },
                "predictions": params["predictions"],
            }
            vocab_key = ("vocab", *common, _tree_signature(self._vocab_params))
            module = model.module
            hidden = cfg.hidden_size
            self.vocab = _program_set(
                vocab_key,
                lambda: ProgramSet(
                    vocab_key,
                    "vocab",
                    jax.jit(_vocab_program(module)),
                    self._param_specs(self._vocab_params),
                    lambda size: [self._spec((size, hidden), jnp.float32)],
                    self.devices,
                ),
            )
            self.vocab.runners.add(self)

    # -- programs -----------------------------------------------------------------------------------------

    def _spec(self, shape, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._by_rows)

    def _param_specs(self, tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), tree
        )

    def _bucket_specs(self, bucket: Bucket) -> list[jax.ShapeDtypeStruct]:
        shape = (bucket.rows, bucket.length)
        specs = [self._spec(shape) for _ in range(4)]
        slots = (bucket.rows, sequences_per_row(bucket.length))
        if self.program == "classify":
            specs.append(self._spec(slots))
        elif self.program == "embed":
            specs += [self._spec(slots), self._spec(slots)]  # first tokens, prompt lengths
        return specs

    def programs(self) -> list[tuple[ProgramSet, Any]]:
        """(set, key) of every executable this model uses: its grid, and fill-mask's vocabulary sizes."""
        found = [(self.main, b) for b in self.buckets]
        if self.vocab is not None:
            found += [(self.vocab, size) for size in self._mask_sizes]
        return found

    def covering_programs(self) -> list[tuple[ProgramSet, Any]]:
        found = [(self.main, b) for b in self.cover]
        if self.vocab is not None:
            found += [(self.vocab, size) for size in sorted({self._mask_sizes[0], self._mask_sizes[-1]})]
        return found

    def program_count(self) -> int:
        return len(self.buckets) + len(self._mask_sizes)

    def compiled_count(self) -> int:
        return sum(1 for program_set, key in self.programs() if key in program_set.compiled)

    @property
    def grid_complete(self) -> bool:
        """Every program compiled and every bucket's cost measured."""
        return self.compiled_count() == self.program_count() and all(
            b in self.main.seconds for b in self.buckets
        )

    @property
    def _compiled(self) -> dict:
        """This model's bucket executables (shared with every model of its program set)."""
        return self.main.compiled

    @property
    def compiled_buckets(self) -> list[Bucket]:
        compiled = self.main.compiled
        return [b for b in self.buckets if b in compiled]

    def compile_covering(
        self, threads: int = 2, costs_file: Path | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[str, float]]:
        """Compile the covering programs this model's set lacks (see `covering_buckets`); yields (label,
        compile seconds) for each it compiled. Then the model can plan (at costs estimated from FLOPs until
        buckets are timed, see `warm_covering` and `complete_grids`): it answers any request."""
        self.main.load_costs(costs_file)
        for _set, key, seconds in _compile_many(self.covering_programs(), threads, stop):
            yield _label(key), seconds
        if stop is not None and stop.is_set():
            return
        self.main.refresh()

    def warm_covering(self) -> None:
        """Run each covering bucket once (the first run pays an executable's one-off costs); its time is the
        bucket's cost until it is measured in the quiet (unless an earlier start measured it)."""
        for bucket in self.cover:
            if bucket not in self.main.seconds and bucket not in self.main.rough:
                seconds = self.main.time_run(bucket, warm=False)
                if seconds is not None:
                    self.main.rough[bucket] = seconds
        self.main.refresh()

    def compile_all(
        self, threads: int = 2, costs_file: Path | None = None, stop: threading.Event | None = None
    ) -> Iterator[tuple[str, float]]:
        """The covering programs, then the rest of the grid, in the foreground; yields (label, seconds)."""
        yield from self.compile_covering(threads, costs_file, stop)
        for _, label, seconds in complete_grids(
            [self], threads=threads, costs_file=costs_file, stop=stop, background=False
        ):
            yield label, seconds

    def refresh(self) -> None:
        """Plan among the compiled buckets (at their current costs). The packer is replaced whole, so the
        device worker always sees a consistent one; every bucket in it is compiled."""
        available = self.compiled_buckets
        if not available or not all(b in self.main.compiled for b in self.cover):
            return
        packer = Packer(available, attention_cost_per_token=self._attention_cost)

        def estimate(b: Bucket) -> float:  # the packer's FLOP estimate, for any bucket of the set
            return b.tokens * (1.0 + self._attention_cost * b.length)

        packer.set_measured_costs({b: self.main.cost(b, estimate) for b in available})
        if self.vocab is not None:
            self._vocab_sizes = [s for s in self._mask_sizes if s in self.vocab.compiled]
        self.packer = packer

    # -- running ----------------------------------------------------------------------------------------

    def run(
        self, sequences: list[ModelInput], plan: Plan | None = None
    ) -> tuple[list[dict[str, np.ndarray]], PackedBatch]:
        """Run `sequences`, laid out by `plan` (which must place them all; by default the cheapest bucket
        holding them), and return each one's outputs."""
        batch = self.packer.pack(sequences, plan)
        executable = self.main.compiled[batch.bucket]
        # numpy in: the executable transfers (and shards) its inputs itself, cheaper than device_put calls.
        inputs = (batch.input_ids, batch.token_type_ids, batch.position_ids, batch.segment_ids)
        if self.program == "classify":
            pooled = np.asarray(executable(self.params, *inputs, batch.first_tokens)["pooled"])
            rows = np.array([r for r, _ in batch.slots], np.int64)
            slots = np.array([k for _, k in batch.slots], np.int64)
            logits = pooled[rows, slots] @ self._head["kernel"] + self._head["bias"]  # [N, C] float32
            return [{"logits": row} for row in logits], batch
        if self.program == "embed":
            prompts = prompt_lengths_for(batch, sequences)
            vectors = np.asarray(executable(self.params, *inputs, batch.first_tokens, prompts)["embedding"])
            return [{"embedding": vectors[r, k]} for r, k in batch.slots], batch
        hidden = np.asarray(executable(self.params, *inputs)["hidden"])  # [R, L, H]
        if self.program == "fill-mask":
            return self._fill_mask_outputs(sequences, batch, hidden), batch
        results = []
        kernel, bias = self._head["kernel"], self._head["bias"]
        qa = self._head["name"] == "qa_outputs"
        for r, offset, n in batch.placements:
            logits = hidden[r, offset : offset + n] @ kernel + bias  # [n, C] float32
            if qa:
                results.append({"start_logits": logits[:, 0], "end_logits": logits[:, 1]})
            else:
                results.append({"logits": logits})
        return results, batch

    def _fill_mask_outputs(
        self, sequences, batch: PackedBatch, hidden: np.ndarray
    ) -> list[dict[str, np.ndarray]]:
        # Only the mask positions go through the masked-LM head and onto the vocabulary.
        rows, cols, counts = [], [], []
        for seq, (r, offset, _) in zip(sequences, batch.placements, strict=True):
            positions = seq.mask_positions if seq.mask_positions is not None else np.zeros(0, np.int32)
            rows.extend([r] * len(positions))
            cols.extend(offset + int(p) for p in positions)
            counts.append(len(positions))
        gathered = hidden[np.asarray(rows, np.int64), np.asarray(cols, np.int64)]  # [M, H]
        probs = np.zeros((0, self.config.vocab_size), np.float32)
        if len(gathered):
            chunks = []
            sizes = self._vocab_sizes
            largest = sizes[-1]
            for start in range(0, len(gathered), largest):
                chunk = gathered[start : start + largest]
                size = next(s for s in sizes if s >= len(chunk))
                padded = np.zeros((size, chunk.shape[1]), np.float32)
                padded[: len(chunk)] = chunk
                out = self.vocab.compiled[size](self._vocab_params, padded)["probs"]
                chunks.append(np.asarray(out)[: len(chunk)])
            probs = np.concatenate(chunks)
        results, start = [], 0
        for count in counts:
            results.append({"probs": probs[start : start + count]})
            start += count
        return results
