"""ModelRunner: one model's parameters (once, on the devices), its host-side head, the shared program sets it
runs through, and `run`, from sequences to per-sequence outputs."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import PretrainedAlbert
from model.modules import AlbertModel

from ..tasks.base import ModelInput
from ..tasks.embed import embedding_fn, embedding_params, prompt_lengths_for
from ..tasks.embed.sparse import sparse_signature, splade_fn
from .buckets import Bucket, covering_buckets
from .compiling import compile_many, complete_grids, program_label
from .packing import PackedBatch, Packer, Plan, sequences_per_row
from .programs import (
    MAX_MASK_CHUNK,
    PROGRAM_OF,
    PROGRAMS,
    ProgramSet,
    backbone_signature,
    classify_program,
    embedding_signature,
    powers_of_two_up_to,
    shared_program_set,
    tokens_program,
    tree_signature,
    vocab_program,
)


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
        self.program = PROGRAM_OF.get(program, program)
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
            self.params = embedding_params(params, embedding, model.dtype)
            key = (
                "embed",
                *common,
                type(model.module).__name__,
                tree_signature(self.params),
                embedding_signature(embedding),
            )
            fn = embedding_fn(model.module, embedding)
        elif self.program == "sparse":
            # SPLADE (tasks/embed/sparse.py): the masked-LM model whole, pooled and top-k'd inside.
            self.params = params
            key = ("sparse", *common, tree_signature(params), sparse_signature(embedding))
            fn = splade_fn(model.module, embedding)
        else:
            self.params = params["albert"]
            pooled = self.program == "classify"
            key = (self.program if pooled else "tokens", *common, tree_signature(self.params))
            backbone = AlbertModel(cfg, model.dtype, add_pooling_layer=pooled, scan_layers=scan)
            fn = (classify_program if pooled else tokens_program)(backbone)
            head = {"classify": "classifier"}.get(self.program) or next(
                (name for name in ("classifier", "qa_outputs") if name in params), None
            )
            if head is not None and self.program != "fill-mask":
                self._head = {
                    "name": head,
                    "kernel": np.asarray(params[head]["kernel"], np.float32),
                    "bias": np.asarray(params[head]["bias"], np.float32),
                }
        self.main = shared_program_set(
            key,
            lambda: ProgramSet(
                key,
                key[0],
                jax.jit(fn),
                self._param_specs(self.params),
                # Not a bound method: the set outlives this runner (an unloaded model's weights must go).
                functools.partial(bucket_input_specs, self.program, self._by_rows),
                self.devices,
            ),
        )
        self.main.runners.add(self)

        self.vocab: ProgramSet | None = None
        self._mask_sizes: list[int] = []
        if self.program == "fill-mask":
            # Vocabulary projections run in chunks of at most this many masks: [256, 30000] float32 is 30 MB.
            largest_chunk = max(len(self.devices), min(max(b.tokens for b in buckets), MAX_MASK_CHUNK))
            self._mask_sizes = powers_of_two_up_to(largest_chunk, start=len(self.devices))
            self._vocab_params = {
                "albert": {
                    "embeddings": {"word_embeddings": params["albert"]["embeddings"]["word_embeddings"]}
                },
                "predictions": params["predictions"],
            }
            vocab_key = ("vocab", *common, tree_signature(self._vocab_params))
            module = model.module
            hidden = cfg.hidden_size
            by_rows = self._by_rows  # not `self`: the set outlives this runner
            self.vocab = shared_program_set(
                vocab_key,
                lambda: ProgramSet(
                    vocab_key,
                    "vocab",
                    jax.jit(vocab_program(module)),
                    self._param_specs(self._vocab_params),
                    lambda size: [jax.ShapeDtypeStruct((size, hidden), jnp.float32, sharding=by_rows)],
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
        return bucket_input_specs(self.program, self._by_rows, bucket)

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
        for _set, key, seconds in compile_many(self.covering_programs(), threads, stop):
            yield program_label(key), seconds
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
        if self.program == "sparse":
            out = executable(self.params, *inputs, batch.first_tokens)
            values, indices, count = (np.asarray(out[k]) for k in ("values", "indices", "count"))
            return [
                {"values": values[r, k], "indices": indices[r, k], "count": count[r, k]}
                for r, k in batch.slots
            ], batch
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


def bucket_input_specs(program: str, by_rows, bucket: Bucket) -> list[jax.ShapeDtypeStruct]:
    """The input shapes of `program` for one bucket, sharded by rows."""

    def spec(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=by_rows)

    specs = [spec((bucket.rows, bucket.length)) for _ in range(4)]
    slots = (bucket.rows, sequences_per_row(bucket.length))
    if program in ("classify", "sparse"):
        specs.append(spec(slots))
    elif program == "embed":
        specs += [spec(slots), spec(slots)]  # first tokens, prompt lengths
    return specs
