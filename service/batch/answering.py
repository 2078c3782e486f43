"""A batch job's rows answered by one served model, on the same path as the task endpoints.

Each row becomes the body its task's endpoint would receive (`/embed`'s, `/classify`'s, ...) and is decoded
by that endpoint's own checks, so a row gets exactly the endpoint's answer or the endpoint's error. Rows then
go through `service.inference.infer` in groups (one group = one queued "request" of many inputs), several
groups in flight at once: the batcher packs them as it packs concurrent requests, and tokenization of the
next groups overlaps the device's work on the current ones. No HTTP and no JSON per row.

Answers become Arrow columns: `embed` -> `embedding` list<float32>; `classify` -> `label`, `score`, `scores`
(in label-id order); every other task -> `answer` (the endpoint's JSON for that row); every task -> `error`
(null when the row is answered).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from ..errors import QueueFull, ServiceError
from ..inference import Timings, infer
from ..runtime import Runtime, ServedModel
from ..tasks import TASKS
from ..tasks.base import Endpoint

GROUP_ROWS = 32  # rows per queued group: the size of a busy client's request
_FAR = 365 * 24 * 3600.0  # a job's rows have no deadline
_QUEUE_FULL_PAUSE_S = 0.05


@dataclass(frozen=True)
class Columns:
    """Which input columns a row's fields come from."""

    text: str = "text"
    pair: str | None = None  # classify: the second text of a pair
    question: str = "question"  # qa
    context: str = "context"  # qa
    query: str = "query"  # rerank: the query each row's text is scored against

    def needed(self, task: str) -> list[str]:
        if task == "qa":
            return [self.question, self.context]
        if task == "rerank":
            return [self.query, self.text]
        return [self.text] + ([self.pair] if task == "classify" and self.pair else [])


def row_body(task: str, row: dict, columns: Columns, options: dict) -> dict:
    """The body of the endpoint request that asks for this row's answer (`options` merged in)."""
    text = row.get(columns.text)
    if task == "qa":
        body = {"inputs": {"question": row.get(columns.question), "context": row.get(columns.context)}}
    elif task == "rerank":
        body = {"query": row.get(columns.query), "texts": [text]}
    elif task == "classify" and columns.pair:
        body = {"inputs": {"text": text, "text_pair": row.get(columns.pair)}}
    else:
        body = {"inputs": text}
    merged = {**options, **body}
    if isinstance(options.get("parameters"), dict):
        merged["parameters"] = dict(options["parameters"])
    if task == "classify":  # every label's score, for the `scores` column (label/score are its best)
        merged["parameters"] = {**merged.get("parameters", {}), "top_k": None}
    return merged


def main_endpoint(task: str) -> Endpoint:
    """The endpoint a task's rows are answered as (the first the task declares: /embed, /classify, ...)."""
    return TASKS[task].endpoints[0]


def answer_columns(task: str) -> dict[str, pa.DataType]:
    if task == "embed":
        columns = {"embedding": pa.list_(pa.float32())}
    elif task == "classify":
        columns = {"label": pa.string(), "score": pa.float32(), "scores": pa.list_(pa.float32())}
    elif task == "sparse-embed":  # SPLADE: the non-zero terms, by index (as /embed_sparse answers them)
        columns = {"indices": pa.list_(pa.int32()), "values": pa.list_(pa.float32())}
    else:
        columns = {"answer": pa.string()}
    return {**columns, "error": pa.string()}


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
    if isinstance(exc, ServiceError):
        return f"{exc.status} {exc.error_type}: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _Row:
    index: int
    items: list
    params: Any


class RowAnswerer:
    """Answers lists of rows with one served model (ready in `runtime`)."""

    def __init__(
        self, runtime: Runtime, served: ServedModel, columns: Columns, options: dict, in_flight: int
    ):
        self.runtime = runtime
        self.served = served
        self.task = served.task
        self.columns = columns
        self.options = options
        self.endpoint = main_endpoint(self.task)
        self._slots = asyncio.Semaphore(in_flight)
        labels = getattr(runtime.tasks[served.name], "labels", None)
        self.labels: list[str] | None = list(labels) if labels is not None else None

    async def answer(self, rows: list[dict]) -> tuple[list[Any], list[str | None]]:
        """Each row's answer (None where it failed) and error (None where it was answered)."""
        answers: list[Any] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)
        decoded: list[_Row] = []
        settings = self.runtime.settings
        needed = self.columns.needed(self.task)
        for i, row in enumerate(rows):
            odd = next((c for c in needed if not isinstance(row.get(c), str)), None)
            if odd is not None:  # one row is one input: a list or a number is not a text to answer
                value = row.get(odd)
                errors[i] = (
                    f"column {odd!r}: expected a string, got {'null' if value is None else type(value).__name__}"
                )
                continue
            try:
                body = self.endpoint.request.model_validate(
                    row_body(self.task, row, self.columns, self.options)
                )
                d = self.endpoint.decode(body, settings)
                decoded.append(_Row(i, d.items, d.params))
            except (ValidationError, ServiceError, ValueError, TypeError) as exc:
                errors[i] = _describe(exc)
        groups: list[list[_Row]] = []
        for row in decoded:  # consecutive rows that share parameters and fit in one group
            group = groups[-1] if groups else None
            if group and group[0].params == row.params and len(group) < GROUP_ROWS:
                group.append(row)
            else:
                groups.append([row])
        await asyncio.gather(*(self._answer_group(group, answers, errors) for group in groups))
        return answers, errors

    async def _answer_group(self, group: list[_Row], answers: list, errors: list) -> None:
        async with self._slots:
            try:
                results = await self._infer([item for row in group for item in row.items], group[0].params)
            except ServiceError as exc:
                if len(group) == 1:
                    errors[group[0].index] = _describe(exc)
                    return
                results = None  # one row's fault (a text too long): find it, answer the others
        if results is None:
            await asyncio.gather(*(self._answer_group([row], answers, errors) for row in group))
            return
        start = 0
        for row in group:
            answers[row.index] = (
                results[start] if len(row.items) == 1 else results[start : start + len(row.items)]
            )
            start += len(row.items)

    async def _infer(self, items: list, params: Any) -> list:
        while True:
            try:
                results, _ = await infer(
                    self.runtime,
                    self.served,
                    items,
                    params,
                    deadline=time.monotonic() + _FAR,
                    disconnected=_never,
                    timings=Timings(),
                )
                return results
            except QueueFull:  # other groups fill the queue: wait for room rather than fail rows
                await asyncio.sleep(_QUEUE_FULL_PAUSE_S)

    def to_arrow(self, answers: list, errors: list) -> dict[str, pa.Array]:
        """The answer columns for these rows."""
        types = answer_columns(self.task)
        if self.task == "embed":
            data = {"embedding": answers}
        elif self.task == "classify":
            data = {"label": [], "score": [], "scores": []}
            for ranked in answers:
                data["label"].append(ranked[0]["label"] if ranked else None)
                data["score"].append(ranked[0]["score"] if ranked else None)
                data["scores"].append(self._in_label_order(ranked) if ranked else None)
        elif self.task == "sparse-embed":
            data = {
                "indices": [None if a is None else [t["index"] for t in a] for a in answers],
                "values": [None if a is None else [t["value"] for t in a] for a in answers],
            }
        else:
            data = {"answer": [None if a is None else json.dumps(a, ensure_ascii=False) for a in answers]}
        data["error"] = errors
        return {name: pa.array(values, type=types[name]) for name, values in data.items()}

    def _in_label_order(self, ranked: list[dict]) -> list[float]:
        # Ranked best first; label names may repeat (id2label is free text), so take each id's own entry.
        remaining = list(ranked)
        scores = []
        for label in self.labels or []:
            at = next(i for i, entry in enumerate(remaining) if entry["label"] == label)
            scores.append(remaining.pop(at)["score"])
        return scores


async def _never() -> None:
    await asyncio.Event().wait()
