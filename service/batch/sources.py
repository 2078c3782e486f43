"""Where a batch job's rows come from: `.jsonl`, `.csv` and `.parquet` files, a directory of them, or a Hugging
Face dataset (`hf://datasets/<repo or local dataset directory>`), read as a stream of Arrow tables.

The rows' order is fixed (files by name, rows in file order), so chunk `i` of a job is always the same rows:
that is what lets a stopped job resume from its finished chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HF_PREFIX = "hf://datasets/"
JSON_COLUMNS = (
    "albert_serve.json_columns"  # table metadata: columns holding JSON text (see _mixed_json_lines)
)
_FINGERPRINT_BYTES = 1 << 20  # of each file's head and tail, with its size: cheap for any size of input


class SourceError(ValueError):
    """The input cannot be read as the job's rows (the message says why)."""


@dataclass(frozen=True)
class Source:
    """An input: files of one format, or a Hugging Face dataset split."""

    location: str
    files: tuple[Path, ...] = ()
    format: str = ""
    split: str = "train"

    @property
    def is_dataset(self) -> bool:
        return self.location.startswith(HF_PREFIX)

    def fingerprint(self) -> dict:
        """What identifies this input, for the job's manifest (a different input is refused, not mixed)."""
        if self.is_dataset:
            return {"dataset": self.location, "split": self.split}
        files = []
        for path in self.files:
            digest = hashlib.sha256()
            size = path.stat().st_size
            with path.open("rb") as handle:
                digest.update(handle.read(_FINGERPRINT_BYTES))
                if size > _FINGERPRINT_BYTES:
                    handle.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                    digest.update(handle.read())
            files.append({"name": path.name, "bytes": size, "sha256": digest.hexdigest()})
        return {"path": str(Path(self.location).resolve()), "format": self.format, "files": files}

    def tables(self, chunk_rows: int, text_columns: Sequence[str] = ()) -> Iterator[pa.Table]:
        """The rows in order, `chunk_rows` at a time (the last chunk may be shorter). A CSV file's
        `text_columns` are read as text whatever they look like (a column of numbers is still text)."""
        if self.is_dataset:
            batches = self._dataset_batches(chunk_rows)
        else:
            batches = self._file_batches(chunk_rows, text_columns)
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in batches:
            while batch.num_rows:
                take = min(chunk_rows - count, batch.num_rows)
                pending.append(batch.slice(0, take))
                batch = batch.slice(take)
                count += take
                if count == chunk_rows:
                    yield pa.Table.from_batches(pending)
                    pending, count = [], 0
        if count:
            yield pa.Table.from_batches(pending)

    def count_rows(self) -> int | None:
        """The number of rows if it is cheap to know (Parquet metadata), else None."""
        if self.format == "parquet":
            return self._arrow_dataset().count_rows()
        return None

    def _arrow_dataset(self) -> ds.Dataset:
        return ds.dataset([str(path) for path in self.files], format=self.format)

    def _file_batches(self, chunk_rows: int, text_columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        # One file at a time, in order: Arrow's dataset scanner may reorder batches across files.
        file_format = self.format
        if self.format == "csv":
            file_format = ds.CsvFileFormat(
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns})
            )
        for path in self.files:
            try:
                scanner = ds.dataset(str(path), format=file_format).scanner(batch_size=chunk_rows)
                yield from scanner.to_batches()
            except pa.ArrowInvalid as exc:
                if self.format != "json" or "changed from" not in str(exc):
                    raise SourceError(f"{path}: cannot be read as {self.format} ({exc})") from None
                # A column whose values are of several types (a number among the texts): Arrow cannot type
                # it, but the rows are still rows; the odd values become their rows' errors, not the job's.
                yield from _mixed_json_lines(path).to_batches(max_chunksize=chunk_rows)
            except OSError as exc:
                raise SourceError(f"{path}: cannot be read as {self.format} ({exc})") from None

    def _dataset_batches(self, chunk_rows: int) -> Iterator[pa.RecordBatch]:
        import datasets

        name = self.location[len(HF_PREFIX) :]
        try:
            dataset = datasets.load_dataset(name, split=self.split)
        except Exception as exc:  # datasets raises many kinds (missing, offline, bad split)
            raise SourceError(f"{self.location}: cannot load split {self.split!r} ({exc})") from None
        yield from dataset.data.table.to_batches(max_chunksize=chunk_rows)


def _mixed_json_lines(path: Path) -> pa.Table:
    """A JSON-lines file with columns of mixed types, read whole: each such column holds every value as its
    JSON text, and the table's metadata names those columns (`python_rows` gives the values back)."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise SourceError(f"{path}, line {number}: not JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise SourceError(f"{path}, line {number}: not a JSON object")
                records.append(record)
    names = list(dict.fromkeys(name for record in records for name in record))
    arrays, encoded = [], []
    for name in names:
        values = [record.get(name) for record in records]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string()))
            encoded.append(name)
    return pa.table(arrays, names=names, metadata={JSON_COLUMNS: json.dumps(encoded)})


def python_rows(table: pa.Table, columns: Sequence[str]) -> list[dict]:
    """`columns` of each row as Python values (those a mixed-type JSON column holds as text decoded)."""
    rows = table.select(list(columns)).to_pylist()
    encoded = json.loads((table.schema.metadata or {}).get(JSON_COLUMNS.encode(), b"[]"))
    for name in set(encoded) & set(columns):
        for row in rows:
            if row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


def open_source(location: str, split: str = "train") -> Source:
    """The Source at `location`; SourceError if there is nothing readable there."""
    if location.startswith(HF_PREFIX):
        if not location[len(HF_PREFIX) :]:
            raise SourceError(f"{location}: name a dataset after {HF_PREFIX}")
        return Source(location, split=split)
    path = Path(location)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise SourceError(f"{location}: no {', '.join(FORMATS)} files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise SourceError(f"{location}: no such file or directory")
    formats = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in formats:
        raise SourceError(f"{location}: not one of {', '.join(FORMATS)}")
    if len(formats) > 1:
        raise SourceError(f"{location}: mixes formats ({', '.join(sorted(formats))}); use one per job")
    return Source(str(path), tuple(files), formats.pop())
