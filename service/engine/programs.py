"""The compiled programs and their sets: which function each program kind runs, what makes two models share
one (the sharing key), and ProgramSet, one executable per bucket for every model of one backbone shape."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import Bucket
from .costs import read_costs, write_costs

# The compiled programs: "classify" (the first token of each sequence through the last layer, then the
# classifier), "tokens" (per-token outputs: QA and NER heads), "fill-mask" (features, then the vocabulary
# projection at the mask positions only). The four original task names are accepted for their program.
# "embed" pools each sequence inside the program (sentence-transformers' modules; see tasks/embed.py), so
# only the pooled vectors leave the device.
PROGRAMS = ("classify", "tokens", "fill-mask", "embed", "sparse")  # sparse: tasks/embed/sparse.py's SPLADE
PROGRAM_OF = {"qa": "tokens", "ner": "tokens"}
MAX_MASK_CHUNK = 256


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


def tree_signature(tree) -> tuple:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return tuple((jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype)) for path, x in leaves)


def embedding_signature(embedding) -> tuple:
    steps = tuple(
        ("dense", s.in_features, s.out_features, s.activation, s.bias is not None)
        if hasattr(s, "in_features")
        else (type(s).__name__,)
        for s in embedding.steps
    )
    return (tuple(embedding.pooling_modes), bool(embedding.include_prompt), steps)


def classify_program(backbone):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids, first_tokens):
        def run(m):
            # Only each sequence's first token is pooled, so only those go through the last layer.
            first = m(
                input_ids, None, token_type_ids, position_ids, segment_ids, output_positions=first_tokens
            )
            return m.pool(first).astype(jnp.float32)  # [R, K, H]

        return {"pooled": backbone.apply({"params": params}, method=run)}

    return fn


def tokens_program(backbone):
    def fn(params, input_ids, token_type_ids, position_ids, segment_ids):
        hidden = backbone.apply(
            {"params": params}, input_ids, None, token_type_ids, position_ids, segment_ids
        )
        return {"hidden": hidden.astype(jnp.float32)}  # [R, L, H]

    return fn


def vocab_program(mlm_module):
    def fn(params, hidden):  # [M, H] float32
        def run(m, h):
            return m.vocab_logits(m.predictions.transform(h))  # [M, V] float32

        logits = mlm_module.apply({"params": params}, hidden, method=run)
        return {"probs": jax.nn.softmax(logits, axis=-1)}

    return fn


def powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes = [start]
    while sizes[-1] < limit:
        sizes.append(sizes[-1] * 2)
    return sizes


# The modules whose code the programs run (the model, these programs, the embedding program).
_PROGRAM_SOURCES = ("model.modules", "model.layers", __name__, "service.tasks.embed.pooling")


def _source_hash() -> str:
    """The code a program's run time depends on (measured costs are kept per version of it)."""
    digest = hashlib.sha256()
    for module in _PROGRAM_SOURCES:
        spec = importlib.util.find_spec(module)
        with contextlib.suppress(OSError, TypeError, AttributeError):  # a module moved: re-measure
            digest.update(Path(spec.origin).read_bytes())
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

    def load_serialized(self, key, path: Path) -> bool:
        """Take `key`'s executable from a file the background grid compiler wrote (jax's serialize_executable:
        no tracing, no lowering, a ~30 ms read instead of ~0.3 s of Python holding the GIL); False if it is
        compiled already."""
        from jax.experimental.serialize_executable import deserialize_and_load

        with self._lock:
            if key in self.compiled or key in self._pending:
                return False
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        executable = deserialize_and_load(payload, in_tree, out_tree)
        with self._lock:
            if key in self.compiled:
                return False
            self.compiled[key] = executable
            self.compiles += 1
        return True

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
        for label, seconds in read_costs(costs_file, self.costs_id).items():
            with contextlib.suppress(ValueError):
                rows, length = (int(n) for n in label.split("x"))
                self.seconds.setdefault(Bucket(rows, length), float(seconds))

    def save_costs(self, costs_file: Path | None) -> None:
        if costs_file is not None and self.seconds:
            write_costs(costs_file, self.costs_id, {str(b): s for b, s in self.seconds.items()})

    def refresh(self) -> None:
        """Tell every model using these programs to plan with what is compiled now."""
        for runner in list(self.runners):
            runner.refresh()


_SETS: dict[tuple, ProgramSet] = {}
_SETS_LOCK = threading.Lock()


def shared_program_set(key: tuple, make: Callable[[], ProgramSet]) -> ProgramSet:
    with _SETS_LOCK:
        found = _SETS.get(key)
        if found is None:
            found = _SETS[key] = make()
        return found


def program_sets() -> list[ProgramSet]:
    """Every program set of this process."""
    with _SETS_LOCK:
        return list(_SETS.values())
