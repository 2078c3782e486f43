"""`albert-serve batch INPUT OUTPUT --model NAME`: every row of INPUT answered by one model, into Parquet.

The job's own flags are below; every other flag (and every ALBERT_* variable) is the server's configuration:
`--models-file`, `--dtype`, `--compilation-cache-dir`, the batching limits. `--model` is a name from the
models file (or `--models`), a local checkpoint directory, or a hub id.

Exit status: 0 when every row has been written (rows that could not be answered carry their `error`); 1 when
the model failed to load; 2 when the job cannot run as asked (a bad flag, an unreadable input, a mismatched
OUTPUT), with one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path

log = logging.getLogger("albert_serve.batch")

DEFAULT_CHUNK_ROWS = 4096


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albert-serve batch",
        description="Answer every row of INPUT with one model and write OUTPUT as Parquet files. Every other flag "
        "is the server's (see albert-serve --help), e.g. --models-file, --dtype, --compilation-cache-dir.",
    )
    parser.add_argument(
        "input", metavar="INPUT", help=".jsonl, .csv, .parquet, a directory of them, or hf://datasets/<repo>"
    )
    parser.add_argument(
        "output", metavar="OUTPUT", help="directory of Parquet files (created; resumed if it holds this job)"
    )
    parser.add_argument(
        "--model", required=True, help="a configured model's name, a local checkpoint directory, or a hub id"
    )
    parser.add_argument(
        "--task", default=None, help="the task, where the checkpoint's own is not the one wanted"
    )
    parser.add_argument("--column", default="text", help="the text column (default: text)")
    parser.add_argument("--pair-column", default=None, help="classify: the column of each text's pair")
    parser.add_argument("--question-column", default="question", help="qa: the question column")
    parser.add_argument("--context-column", default="context", help="qa: the context column")
    parser.add_argument(
        "--query-column", default="query", help="rerank: the column each row's text is scored against"
    )
    parser.add_argument(
        "--options",
        default="{}",
        help="JSON merged into every row's request body, as the endpoint takes it: e.g. '{\"normalize\": false}' "
        'for embed, \'{"parameters": {"candidate_labels": ["a", "b"]}}\' for zero-shot',
    )
    parser.add_argument("--split", default="train", help="hf://datasets input: the split (default: train)")
    parser.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per output file and per resume step"
    )
    parser.add_argument(
        "--output-prefix", default="", help="before each answer column's name (where the input has one)"
    )
    ray = parser.add_argument_group("Ray (pip install -e '.[batch]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray. Alone: the cluster this machine belongs to (or the one `ray job submit` runs the job "
        "in), else a new local one; `local`: always a new one on this machine; `auto`: an existing cluster "
        "only; ray://host:10001 or host:6379: that cluster",
    )
    ray.add_argument(
        "--ray-actors", type=int, default=None, help="actors answering rows (default: one per alive node)"
    )
    ray.add_argument(
        "--ray-actor-cpus",
        type=float,
        default=None,
        help="CPUs each actor reserves (default: the smallest node's CPUs: one engine per node)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return _run(args, rest)
    except _Refused as exc:
        print(f"albert-serve batch: {exc}", file=sys.stderr)
        return 2


class _Refused(Exception):
    pass


def _options(text: str) -> dict:
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise _Refused(f"--options is not JSON ({exc})") from None
    if not isinstance(options, dict):
        raise _Refused(f"--options must be a JSON object, got {text!r}")
    return options


def resolve_model(model: str, task: str | None, settings):
    """The ModelSpec `--model` names: a configured model, a local directory, or a hub id."""
    from ..models import configured_models, spec_for_source

    if Path(model).expanduser().is_dir():
        name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model).expanduser().resolve().name)[:64] or "model"
        return spec_for_source(name, model, task, settings, "--model")
    if settings.models_file or settings.models:
        for spec in configured_models(settings):
            if spec.name == model:
                return (
                    spec
                    if task is None or task == spec.task
                    else spec_for_source(spec.name, spec.source, task, settings, spec.origin)
                )
    return spec_for_source(re.sub(r"[^A-Za-z0-9._-]", "-", model)[-64:], model, task, settings, "--model")


def _run(args, rest: list[str]) -> int:
    from pydantic import ValidationError

    from ..app import configure_logging
    from ..models import ConfigError
    from ..settings import load_settings
    from .answering import Columns
    from .job import JobRefused, Progress, run_chunks
    from .sources import SourceError, open_source

    try:
        settings = load_settings(rest)
    except ValidationError as exc:
        raise _Refused(f"configuration error: {exc}") from None
    configure_logging(settings.log_level)
    if args.chunk_rows < 1:
        raise _Refused(f"--chunk-rows must be at least 1, got {args.chunk_rows}")
    options = _options(args.options)
    columns = Columns(
        args.column, args.pair_column, args.question_column, args.context_column, args.query_column
    )
    try:
        source = open_source(args.input, args.split)
        spec = resolve_model(args.model, args.task, settings)
    except (SourceError, ConfigError) as exc:
        raise _Refused(str(exc)) from None

    if args.ray is not None:
        return _run_on_ray(args, settings, spec, source, columns, options)

    from ..runtime import Runtime
    from .answering import RowAnswerer

    begin = time.monotonic()
    runtime = Runtime(settings, specs=[spec], complete_grid=False)
    try:
        runtime.start(background=True)
        runtime.wait_ready()
        served = runtime.models[spec.name]
        if served.state != "ready":
            print(f"albert-serve batch: model {spec.name} failed: {served.reason}", file=sys.stderr)
            return 1
        plan = _prepared_plan(args, source, spec, served.task, columns, options)
        log.info("model %s (%s) ready in %.1fs", spec.name, served.task, time.monotonic() - begin)
        progress = Progress(source.count_rows())
        answerer = RowAnswerer(runtime, served, columns, options, in_flight=in_flight_groups(settings))
        try:
            asyncio.run(run_chunks(plan, answerer, progress))
        except (JobRefused, SourceError) as exc:
            raise _Refused(str(exc)) from None
        finally:
            progress.close()
    finally:
        runtime.stop()
    _log_done(begin, progress, args.output)
    return 0


def _prepared_plan(args, source, spec, task: str, columns, options: dict):
    """The job's plan, with OUTPUT checked against it (a mismatch refused) and its manifest written."""
    from .job import JobPlan, JobRefused

    plan = JobPlan(
        source, Path(args.output), spec, task, columns, options, args.chunk_rows, args.output_prefix
    )
    try:
        plan.prepare_output()
    except (JobRefused, OSError) as exc:
        raise _Refused(str(exc)) from None
    return plan


def _run_on_ray(args, settings, spec, source, columns, options: dict) -> int:
    try:
        import ray
    except ImportError:
        raise _Refused("--ray needs Ray: pip install -e '.[batch]' (or pip install 'ray[data]')") from None
    from .job import JobRefused, Progress
    from .ray_job import connect, run_on_ray
    from .sources import SourceError

    if spec.task is None:  # the driver writes the manifest before any actor has loaded the model
        raise _Refused(f"--ray: name the task of {spec.source!r} with --task (it is not a local checkpoint)")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise _Refused(f"--ray-actors must be at least 1, got {args.ray_actors}")
    if args.ray_actor_cpus is not None and args.ray_actor_cpus <= 0:
        raise _Refused(f"--ray-actor-cpus must be positive, got {args.ray_actor_cpus}")
    begin = time.monotonic()
    plan = _prepared_plan(args, source, spec, spec.task, columns, options)
    try:
        started = connect(args.ray)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise _Refused(f"{f'--ray {args.ray}' if args.ray else '--ray'}: cannot connect ({exc})") from None
    progress = Progress(source.count_rows())
    try:
        run_on_ray(plan, settings, progress, actors=args.ray_actors, actor_cpus=args.ray_actor_cpus)
    except (JobRefused, SourceError) as exc:
        raise _Refused(str(exc)) from None
    except ray.exceptions.RayActorError as exc:
        failed = _actor_start_failure(exc)
        if failed is None:
            raise
        print(f"albert-serve batch: {failed}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        if started:
            ray.shutdown()
    _log_done(begin, progress, args.output)
    return 0


def _actor_start_failure(exc: BaseException) -> str | None:
    """Why a Ray actor could not start (its model failed to load there), from Ray's error; None for any other
    fault."""
    if not getattr(exc, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(getattr(exc, "error_msg", exc)).splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "ModelFailed: " in line), lines[-1] if lines else "")
    return reason.split("ModelFailed: ", 1)[-1] or str(exc)


def _log_done(begin: float, progress, output: str) -> None:
    log.info(
        "batch done in %.1fs: %d row(s) answered (%d with an error), %d already done, into %s",
        time.monotonic() - begin,
        progress.done,
        progress.errors,
        progress.skipped,
        output,
    )


def in_flight_groups(settings) -> int:
    """Groups queued at once: enough for the batcher to fill its largest batch twice over (the next batch is
    ready when the device is free), within the queue's limit."""
    from .answering import GROUP_ROWS

    wanted = 2 * max(settings.max_batch_sequences, settings.max_batch_tokens // 32) // GROUP_ROWS
    return max(2, min(wanted, settings.max_queue_sequences // GROUP_ROWS // 2 or 1))
