"""The same batch job on Ray: Ray Data reads the input's chunks, `map_batches` answers them on a pool of
actors (each one engine, compiled once, from the shared compilation cache), and this driver writes them.

The output is the in-process job's, file for file: chunk `i` is the same rows, written as `part-{i}.parquet`
with the same columns, beside the same manifest. So a Ray job resumes from its finished chunks, a different
model or input is refused, and an in-process run and a Ray run can finish each other's OUTPUT.

Why the chunks are read by one read task rather than by Ray's file readers: resuming needs chunk `i` to be the
same rows every time, which Ray's parallel readers do not promise; reading and tokenizing are a small part of
a row's cost next to the model (thousands of rows a second against hundreds), so one reader keeps every actor
busy. Each chunk travels as one block, tagged with its index and row count; the driver writes a chunk when all
its rows are back, in whatever order the actors finish.

On a cluster the model's source (a local checkpoint directory), the input and the compilation cache must be
at the same path on every node (or the model a hub id the nodes can fetch); OUTPUT is written by the driver.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..models import ModelSpec
from ..settings import Settings
from .answering import Columns
from .job import JobPlan, Progress, answered_table, write_part
from .sources import Source, SourceError, python_rows

log = logging.getLogger("albert_serve.batch")

CHUNK_COLUMN = "__albert_chunk"  # the chunk's index, on every row of its block
ROWS_COLUMN = "__albert_chunk_rows"  # the chunk's number of rows (a block may reach the driver in pieces)
_IN_FLIGHT_PER_ACTOR = 2  # chunks an actor answers at once


class ModelFailed(RuntimeError):
    """The model could not be loaded on a Ray actor (the message says why)."""


def connect(address: str) -> bool:
    """Join Ray: `""` the cluster this machine belongs to (or the one `ray job submit` runs this in), else a
    new local one (Ray's own default); `local` always a new local one; `auto` an existing cluster only; else
    the cluster at `address`. True if this process connected (and must disconnect, or shut down what it
    started, at the end)."""
    import ray

    if ray.is_initialized():
        return False
    if address in ("", "local"):
        ray.init(
            address=address or None, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    else:
        _send_auth_token_if_present()
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    return True


def _send_auth_token_if_present() -> None:
    # Ray 2.60 sends this machine's cluster token (~/.ray/auth_token, written by `ray start`) when it joins
    # with address="auto", but not for an explicit address, which the cluster then refuses. Same rule here.
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: its own rule applies
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def default_actors() -> tuple[int, float]:
    """One actor per alive node, each given its node's CPUs (XLA uses every core of its process)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n.get("Resources", {}).get("CPU", 1.0) for n in nodes] or [1.0]
    return len(cpus), max(min(cpus), 1.0)


def _chunk_datasource(source: Source, chunk_rows: int, needed: list[str], finished: frozenset[int]):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ChunkDatasource(Datasource):
        """The input's chunks, in order, one block each (those already written left out)."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read():
                for index, table in enumerate(source.tables(chunk_rows, needed)):
                    if index not in finished:
                        yield _tagged(table, index)

            metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(read, metadata)]

    return ChunkDatasource()


def _tagged(table: pa.Table, index: int) -> pa.Table:
    rows = table.num_rows
    table = table.append_column(CHUNK_COLUMN, pa.array([index] * rows, pa.int64()))
    return table.append_column(ROWS_COLUMN, pa.array([rows] * rows, pa.int64()))


class ChunkAnswerer:
    """A Ray actor's engine: the model loaded and its covering programs compiled once, then each chunk's rows
    answered through the same RowAnswerer as the in-process job (on this actor's own event loop)."""

    def __init__(self, settings: Settings, spec: ModelSpec, columns: Columns, options: dict, names: dict):
        from ..app import configure_logging
        from ..runtime import Runtime
        from .answering import RowAnswerer
        from .cli import in_flight_groups

        configure_logging(settings.log_level)
        self.runtime = Runtime(settings, specs=[spec], complete_grid=False)
        self.runtime.start(background=True)
        self.runtime.wait_ready()
        served = self.runtime.models[spec.name]
        if served.state != "ready":
            self.runtime.stop()
            raise ModelFailed(f"model {spec.name} failed: {served.reason}")
        self.needed = columns.needed(served.task)
        self.names = names
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="answers", daemon=True).start()
        self.answerer = RowAnswerer(
            self.runtime,
            served,
            columns,
            options,
            in_flight=in_flight_groups(settings) * _IN_FLIGHT_PER_ACTOR,
        )

    def __call__(self, block: pa.Table) -> pa.Table:
        # The block's schema metadata says which columns hold mixed-type JSON values (see sources.py).
        rows = python_rows(block, self.needed)
        answers, errors = asyncio.run_coroutine_threadsafe(self.answerer.answer(rows), self.loop).result()
        return _with_answers(block, self.answerer.to_arrow(answers, errors), self.names)


def _with_answers(block: pa.Table, columns: dict[str, pa.Array], names: dict[str, str]) -> pa.Table:
    # The tags stay last, after the answer columns, so the driver drops them without reordering the rest.
    tags = block.select([CHUNK_COLUMN, ROWS_COLUMN])
    table = answered_table(block.drop_columns([CHUNK_COLUMN, ROWS_COLUMN]), columns, names)
    for field, column in zip(tags.schema, tags.columns, strict=True):
        table = table.append_column(field, column)
    return table


def run_on_ray(
    plan: JobPlan,
    settings: Settings,
    progress: Progress,
    *,
    actors: int | None = None,
    actor_cpus: float | None = None,
) -> None:
    """Answer and write every chunk of `plan` not finished yet, on the Ray this process is connected to."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own progress (rows, rows/s, ETA) is the one shown
    default_count, default_cpus = default_actors()
    actors = actors or default_count
    actor_cpus = actor_cpus or default_cpus

    needed = plan.columns.needed(plan.task)
    first = next(plan.source.tables(plan.chunk_rows, needed), None)
    if first is None:
        raise SourceError(f"{plan.source.location}: no rows")
    plan.check_columns(first)
    # Ray merges the blocks a read yields up to this size before passing them on (128 MiB by default: a
    # million short texts, all sent to one actor at the end of the read). About a chunk's size keeps chunks
    # apart, so they stream to every actor and back; a chunk cut in two or sharing a block is still
    # written whole (the driver gathers its rows by tag).
    context.target_max_block_size = max(first.nbytes, 1 << 16)
    finished = {int(path.stem.split("-")[1]): path for path in plan.output.glob("part-*.parquet")}
    for index, path in sorted(finished.items()):
        progress.chunk(index, pq.ParquetFile(path).metadata.num_rows, 0, skipped=True)
    log.info(
        "on Ray: %d actor(s) of %g CPU(s), %d chunk(s) already written", actors, actor_cpus, len(finished)
    )

    names = plan.output_names()
    answered = ray.data.read_datasource(
        _chunk_datasource(plan.source, plan.chunk_rows, needed, frozenset(finished)),
        override_num_blocks=1,
        # The reader reserves no CPU: the actors hold every core (one engine per node), and a reader waiting
        # for a free CPU would wait for ever. Its work is small beside theirs.
        ray_remote_args={"num_cpus": 0},
    ).map_batches(
        ChunkAnswerer,
        fn_constructor_kwargs={
            "settings": settings,
            "spec": plan.spec,
            "columns": plan.columns,
            "options": plan.options,
            "names": names,
        },
        batch_size=plan.chunk_rows,  # a chunk's rows a call (rows carry their chunk's tag wherever they go)
        batch_format="pyarrow",
        zero_copy_batch=True,
        # Two chunks at once per actor, as in-process: the next one's rows queue while the last groups of one
        # finish, so the engine never waits for a chunk.
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_concurrent_calls_per_actor=_IN_FLIGHT_PER_ACTOR,
            enable_true_multi_threading=True,
        ),
        num_cpus=actor_cpus,
    )
    pieces: dict[int, list[pa.Table]] = defaultdict(list)
    for block in answered.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for index in pc.unique(block.column(CHUNK_COLUMN)).to_pylist():
            piece = block.filter(pc.equal(block.column(CHUNK_COLUMN), index))
            pieces[index].append(piece)
            if sum(p.num_rows for p in pieces[index]) == piece.column(ROWS_COLUMN)[0].as_py():
                table = pa.concat_tables(pieces.pop(index)).drop_columns([CHUNK_COLUMN, ROWS_COLUMN])
                write_part(plan.output, index, table)
                errors = table.num_rows - table.column(names["error"]).null_count
                progress.chunk(index, table.num_rows, errors)
    if pieces:  # every block came back whole or Ray raised: a chunk left over is a fault of this code
        raise RuntimeError(f"chunk(s) {sorted(pieces)} came back incomplete from Ray")
