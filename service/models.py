"""Which models to serve: named entries from the models file, `--models`, and the four endpoint variables.

Every entry is checked here, at start-up and before anything loads or compiles, so that a careless
configuration fails at once with the entry and the reason: an unknown key, a bad or duplicate name, two
defaults for one task, an unknown task, or (for a local checkpoint) a task its architecture cannot serve.
A hub checkpoint is only seen once downloaded; a task it cannot serve makes that model fail, not the others.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import tomllib

from .hardware import AUTO, resolve_dtype
from .settings import DEFAULT_MODELS, MODEL_FIELDS, Settings
from .tasks import DEFAULT_TASK_OF_ARCHITECTURE, TASKS

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ENTRY_KEYS = ("source", "task", "default", "dtype", "pooling")
DTYPES = typing.get_args(Settings.model_fields["dtype"].annotation)  # what --dtype accepts


class ConfigError(ValueError):
    """A configuration the service cannot start with; the message names the entry and the reason."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    task: str | None  # None: from the checkpoint, once it is loaded (a hub id not downloaded yet)
    default: bool
    dtype: str  # compute dtype
    origin: str  # where it was configured, for messages: "models.sentiment in models.toml", "ALBERT_QA_MODEL"
    pooling: str = "mean"  # embed, for a plain ALBERT checkpoint (a sentence-transformers one says its own)

    @property
    def is_local(self) -> bool:
        return Path(self.source).expanduser().is_dir()


def configured_models(settings: Settings) -> list[ModelSpec]:
    """Every configured model, checked; the public default checkpoints when none is configured at all."""
    entries: list[ModelSpec] = []
    if settings.models_file:
        entries += _from_file(Path(settings.models_file), settings)
    if settings.models:
        entries += _from_short_form(settings.models, settings)
    if settings.model_repository:  # every checkpoint of the repository in mode none; none of them in explicit
        from .repository import repository_names, repository_specs

        if settings.model_control_mode == "none":
            entries += repository_specs(settings)
        else:
            repository_names(
                settings
            )  # a directory that is not there fails at start-up, not at the first load
    configured_endpoints = {endpoint: getattr(settings, field) for endpoint, field in MODEL_FIELDS.items()}
    nothing_configured = (
        not entries
        and not settings.model_repository
        and all(value is None for value in configured_endpoints.values())
    )
    for endpoint, value in configured_endpoints.items():
        source = DEFAULT_MODELS[endpoint] if nothing_configured else value
        if source and source.strip():
            origin = Settings.env_name(MODEL_FIELDS[endpoint])
            entries.append(ModelSpec(endpoint, source.strip(), endpoint, True, settings.dtype, origin))
    return _checked(entries)


def spec_for_source(name: str, source: str, task: str | None, settings: Settings, origin: str) -> ModelSpec:
    """One model given by its source (a local directory or a hub id) rather than by configuration, checked as
    a configured one is."""
    return _checked([ModelSpec(name, source, task, True, settings.dtype, origin)])[0]


def _from_file(path: Path, settings: Settings) -> list[ModelSpec]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"models file {path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"models file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"models"})
    if unknown:
        raise ConfigError(
            f"models file {path}: unknown top-level key(s) {', '.join(unknown)}; expected [models.<name>]"
        )
    tables = document.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"models file {path}: 'models' must be tables [models.<name>]")
    entries = []
    for name, table in tables.items():
        origin = f"models.{name} in {path}"
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: must be a table with at least `source`")
        unknown = sorted(set(table) - set(ENTRY_KEYS))
        if unknown:
            raise ConfigError(
                f"{origin}: unknown key(s) {', '.join(unknown)}; expected {', '.join(ENTRY_KEYS)}"
            )
        source = table.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{origin}: `source` must be a non-empty string (a local directory or hub id)")
        task = table.get("task")
        if task is not None and not isinstance(task, str):
            raise ConfigError(f"{origin}: `task` must be a string, got {task!r}")
        default = table.get("default", False)
        if not isinstance(default, bool):
            raise ConfigError(f"{origin}: `default` must be true or false, got {default!r}")
        dtype = table.get("dtype", settings.dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"{origin}: `dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
        pooling = table.get("pooling", "mean")
        if not isinstance(pooling, str) or not pooling:
            raise ConfigError(
                f"{origin}: `pooling` must be a pooling mode such as mean, cls or max, got {pooling!r}"
            )
        entries.append(ModelSpec(name, source.strip(), task, default, dtype, origin, pooling))
    return entries


def _from_short_form(text: str, settings: Settings) -> list[ModelSpec]:
    entries = []
    for position, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            continue
        origin = f"ALBERT_MODELS entry {position + 1} ({part!r})"
        name, sep, source = part.partition("=")
        if not sep or not source.strip():
            raise ConfigError(f"{origin}: expected name=source")
        entries.append(ModelSpec(name.strip(), source.strip(), None, False, settings.dtype, origin))
    return entries


def _checked(entries: list[ModelSpec]) -> list[ModelSpec]:
    seen: dict[str, ModelSpec] = {}
    resolved = []
    for spec in entries:
        if not NAME.match(spec.name):
            raise ConfigError(
                f"{spec.origin}: model name {spec.name!r} is not 1-64 characters of A-Za-z0-9._-"
            )
        if spec.name in seen:
            raise ConfigError(
                f"{spec.origin}: model name {spec.name!r} is already used by {seen[spec.name].origin}"
            )
        seen[spec.name] = spec
        if spec.task is not None and spec.task not in TASKS:
            raise ConfigError(
                f"{spec.origin}: unknown task {spec.task!r}; expected one of {', '.join(TASKS)}"
            )
        if spec.dtype == AUTO:  # what this machine runs fastest (service/hardware.py)
            spec = dataclasses.replace(spec, dtype=resolve_dtype(spec.dtype))
        resolved.append(_with_checkpoint_task(spec))
    defaults: dict[str, list[ModelSpec]] = {}
    for spec in resolved:
        if spec.default and spec.task is not None:
            defaults.setdefault(spec.task, []).append(spec)
    for task, specs in defaults.items():
        if len(specs) > 1:
            raise ConfigError(
                f"two default models for task {task}: {' and '.join(f'{s.name!r} ({s.origin})' for s in specs)}"
            )
    return resolved


def checkpoint_architecture(directory: Path) -> str | None:
    """The architecture config.json names (None if it names none), or "sentence-transformers" for a
    sentence-transformers layout (modules.json), "sentence-transformers-sparse" for a SparseEncoder one."""
    if (directory / "modules.json").is_file():
        from .tasks.embed.sparse import is_sparse_layout  # SPLADE: a SpladePooling module

        return "sentence-transformers-sparse" if is_sparse_layout(directory) else "sentence-transformers"
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading reports a missing or broken config.json with its own message
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return architectures[0] if isinstance(architectures, list) and architectures else None


def task_of_checkpoint(spec: ModelSpec, directory: Path) -> str:
    """The task `spec` serves from the checkpoint in `directory`; ConfigError if it cannot be served."""
    architecture = checkpoint_architecture(directory)
    if spec.task is None:
        task = DEFAULT_TASK_OF_ARCHITECTURE.get(architecture)
        if task is None:
            served = ", ".join(f"{a} ({t})" for a, t in DEFAULT_TASK_OF_ARCHITECTURE.items())
            raise ConfigError(
                f"{spec.origin}: cannot tell the task of {spec.source}: its architecture is {architecture!r}, "
                f"not one of {served}; set `task` in the models file"
            )
        return task
    task = TASKS[spec.task]
    if architecture is not None and architecture not in task.architectures:
        raise ConfigError(
            f"{spec.origin}: task {spec.task} needs a checkpoint of architecture "
            f"{' or '.join(task.architectures)}, but {spec.source} is {architecture}"
        )
    return spec.task


def _with_checkpoint_task(spec: ModelSpec) -> ModelSpec:
    if not spec.is_local:
        return spec
    task = task_of_checkpoint(spec, Path(spec.source).expanduser())
    return dataclasses.replace(spec, task=task)
