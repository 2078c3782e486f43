"""A batch job in this process: the input read in chunks, each chunk answered and written as one Parquet file.

OUTPUT holds `part-00000.parquet`, `part-00001.parquet`, ... (chunk `i` = input rows `i*chunk_rows` onwards,
every input column kept, the answer columns added) and `_albert_batch.json`, the manifest saying which model,
input, columns and options made them. A part file appears whole or not at all (written beside, then
renamed), so a job stopped at any moment (SIGKILL included) and started again with the same arguments skips
the finished chunks and ends with every row exactly once. A different model, input, columns or options in
the same OUTPUT is refused, not mixed.

Memory stays flat: at most two chunks are held at a time (one being answered while the next is read).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..models import ModelSpec
from .answering import Columns, answer_columns
from .sources import Source, SourceError, python_rows

log = logging.getLogger("albert_serve.batch")

MANIFEST = "_albert_batch.json"
FORMAT_VERSION = 1
_CHUNKS_AHEAD = 2  # chunks answered at once: the next one's rows queue while the last groups of one finish


class JobRefused(ValueError):
    """The job cannot run as asked (the message says why); nothing was written."""


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def model_identity(spec: ModelSpec, task: str) -> dict:
    """What identifies the model for the manifest: its source, task and dtype, and for a local checkpoint its
    config and the sizes of its weight files (the same path holding another checkpoint is another model)."""
    identity = {"name": spec.name, "source": spec.source, "task": task, "dtype": spec.dtype}
    directory = Path(spec.source).expanduser()
    if directory.is_dir():
        identity["source"] = str(directory.resolve())
        config = directory / "config.json"
        if config.is_file():
            identity["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
        identity["weights"] = {
            p.name: p.stat().st_size
            for p in sorted(directory.iterdir())
            if p.suffix in (".safetensors", ".bin", ".msgpack") and p.is_file()
        }
    return identity


@dataclass
class JobPlan:
    source: Source
    output: Path
    spec: ModelSpec
    task: str
    columns: Columns
    options: dict
    chunk_rows: int
    prefix: str = ""  # before each answer column's name

    def manifest(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "model": model_identity(self.spec, self.task),
            "input": self.source.fingerprint(),
            "columns": asdict(self.columns),
            "options": self.options,
            "chunk_rows": self.chunk_rows,
            "prefix": self.prefix,
        }

    def output_names(self) -> dict[str, str]:
        """Answer column -> its name in the output."""
        return {name: self.prefix + name for name in answer_columns(self.task)}

    def prepare_output(self) -> int:
        """Check OUTPUT against this job (refuse a mismatch), write the manifest, remove partial files; the
        number of finished chunks already there."""
        manifest = self.manifest()
        path = self.output / MANIFEST
        if path.exists():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise JobRefused(f"{path}: unreadable manifest ({exc}); use another OUTPUT") from None
            different = [key for key in manifest if found.get(key) != manifest[key]]
            if different:
                raise JobRefused(
                    f"{self.output} holds another job's results (its {', '.join(different)} differ from this "
                    "job's); use another OUTPUT, or remove it to start over"
                )
        elif self.output.exists() and any(self.output.iterdir()):
            raise JobRefused(
                f"{self.output} is not empty and is not a batch job's output; use another OUTPUT"
            )
        self.output.mkdir(parents=True, exist_ok=True)
        for partial in self.output.glob(".*.tmp"):  # a write the last run did not finish
            partial.unlink()
        if not path.exists():
            _write_atomically(path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return sum(1 for _ in self.output.glob("part-*.parquet"))

    def check_columns(self, table: pa.Table) -> None:
        missing = [c for c in self.columns.needed(self.task) if c not in table.column_names]
        if missing:
            raise JobRefused(
                f"the input has no column {', '.join(map(repr, missing))} (it has {', '.join(table.column_names)}); "
                "name the columns with --column/--pair-column/--question-column/--context-column/--query-column"
            )
        clashes = [n for n in self.output_names().values() if n in table.column_names]
        if clashes:
            raise JobRefused(
                f"the input already has column(s) {', '.join(map(repr, clashes))}, which the answers would "
                "replace; use --output-prefix to name the answer columns differently"
            )


def answered_table(table: pa.Table, columns: dict[str, pa.Array], names: dict[str, str]) -> pa.Table:
    """`table` with the answer columns added, each under its output name."""
    for name, array in columns.items():
        table = table.append_column(pa.field(names[name], array.type), array)
    return table


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_part(output: Path, index: int, table: pa.Table) -> None:
    """Chunk `index`'s answers, whole or not at all."""
    path = output / part_name(index)
    partial = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, partial)
    with open(partial, "rb") as handle:  # on disk before the rename makes it count as finished
        os.fsync(handle.fileno())
    os.replace(partial, path)


class Progress:
    """Rows, rows/s and ETA: a bar redrawn in place on a terminal, a log line per chunk otherwise."""

    def __init__(self, total: int | None, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.start = time.monotonic()
        self.done = 0  # rows answered by this run
        self.skipped = 0  # rows of chunks a previous run finished
        self.errors = 0

    def chunk(self, index: int, rows: int, errors: int, *, skipped: bool = False) -> None:
        if skipped:
            self.skipped += rows
            return
        self.done += rows
        self.errors += errors
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        finished = self.done + self.skipped
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {_duration((self.total - finished) / rate)}"
        of = f"/{self.total}" if self.total is not None else ""
        if self.terminal:
            width = 30
            filled = int(width * finished / self.total) if self.total else 0
            bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.total else ""
            self.stream.write(f"\r{bar}{finished}{of} rows, {rate:.1f} rows/s{eta}, {self.errors} error(s)  ")
            self.stream.flush()
        else:
            log.info(
                "chunk %d: %d rows (%d error(s)); %d%s rows, %.1f rows/s%s",
                index,
                rows,
                errors,
                finished,
                of,
                rate,
                eta,
            )

    def close(self) -> None:
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


async def run_chunks(plan: JobPlan, answerer, progress: Progress) -> None:
    """Answer and write every chunk not finished yet, in order, `_CHUNKS_AHEAD` at once."""
    needed = plan.columns.needed(plan.task)
    chunks = plan.source.tables(plan.chunk_rows, needed)
    pending: deque = deque()
    index = 0

    async def write_oldest():
        i, table, answering = pending.popleft()
        answers, errors = await answering
        columns = answerer.to_arrow(answers, errors)
        await asyncio.to_thread(
            write_part, plan.output, i, answered_table(table, columns, plan.output_names())
        )
        progress.chunk(i, table.num_rows, sum(e is not None for e in errors))

    try:
        while True:
            table = await asyncio.to_thread(next, chunks, None)
            if table is None:
                break
            if index == 0:
                plan.check_columns(table)
            if (plan.output / part_name(index)).exists():
                progress.chunk(index, table.num_rows, 0, skipped=True)
            else:
                rows = python_rows(table, needed)
                pending.append((index, table, asyncio.ensure_future(answerer.answer(rows))))
                if len(pending) >= _CHUNKS_AHEAD:
                    await write_oldest()
            index += 1
        while pending:
            await write_oldest()
    finally:
        for _, _, answering in pending:
            answering.cancel()
        with contextlib.suppress(Exception):
            chunks.close()
    if index == 0:
        raise SourceError(f"{plan.source.location}: no rows")
