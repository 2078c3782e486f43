"""The model repository and runtime model control (Triton's model repository extension).

`--model-repository DIR` holds one checkpoint per sub-directory, named by it, each with an optional
`albert-serve.toml` of the models file's fields (task, default, dtype, pooling). In mode `none` every one is
served from start-up like a configured model; in mode `explicit` none is, and each loads and unloads by name:

- load: builds the model on a worker thread (weights, tokenizer, its covering programs; programs its backbone
  shape already has are shared, so a second model of a served shape compiles nothing), then puts it in
  service on the event loop in one step. Nothing is served by a half-loaded model, and no request waits on a
  load. A reload builds the new model beside the old one, which serves until the swap. A failing load marks
  the name UNAVAILABLE with the reason (a served model of that name keeps serving).
- unload: the name leaves the model table first (new requests: 404), then the requests already accepted for
  it are answered (its queue drains), then its runner goes and its memory with it.

Only names of sub-directories inside the repository load: a name is 1-64 characters of A-Za-z0-9._-, and its
resolved path (symlinks followed) must lie inside the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib
from prometheus_client import Counter

from .engine import complete_grids
from .errors import ModelNotFound, ServiceError
from .models import DTYPES, NAME, ConfigError, ModelSpec, _checked
from .runtime import STATES, Runtime, ServedModel, _describe_failure
from .settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "albert-serve.toml"
MANIFEST_KEYS = ("task", "default", "dtype", "pooling")


class ControlRefused(ServiceError):
    """A model-control request that cannot be done: mode none, a configured model, a name outside the
    repository."""

    error_type = "invalid_request"
    status = 400


def repository_path(settings: Settings, name: str) -> Path:
    """The checkpoint directory of `name` in the repository; ControlRefused or ModelNotFound otherwise."""
    if not NAME.match(name) or name in (".", ".."):
        raise ControlRefused(f"model name {name!r} is not 1-64 characters of A-Za-z0-9._- (and not . or ..)")
    root = Path(settings.model_repository).expanduser().resolve()
    path = (root / name).resolve()
    if path.parent != root:  # a symlink that leads out of the repository (or deeper into it)
        raise ControlRefused(f"model {name!r} resolves to {path}, outside the model repository {root}")
    if not path.is_dir():
        raise ModelNotFound(f"the model repository {root} has no model directory {name!r}")
    return path


def _spec(settings: Settings, name: str, path: Path) -> ModelSpec:
    origin = f"{name} in the model repository {settings.model_repository}"
    fields: dict = {}
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            fields = tomllib.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{origin}: {MANIFEST} is not valid TOML ({exc})") from None
        unknown = sorted(set(fields) - set(MANIFEST_KEYS))
        if unknown:
            raise ConfigError(
                f"{origin}: unknown key(s) {', '.join(unknown)} in {MANIFEST}; expected {', '.join(MANIFEST_KEYS)}"
            )
        if fields.get("dtype", settings.dtype) not in DTYPES:
            raise ConfigError(
                f"{origin}: `dtype` must be one of {', '.join(DTYPES)}, got {fields['dtype']!r}"
            )
    return ModelSpec(
        name,
        str(path),
        fields.get("task"),
        bool(fields.get("default", False)),
        fields.get("dtype", settings.dtype),
        origin,
        fields.get("pooling", "mean"),
    )


def repository_names(settings: Settings) -> list[str]:
    root = Path(settings.model_repository).expanduser()
    if not root.is_dir():
        raise ConfigError(f"the model repository {root} is not a directory")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME.match(p.name))


def repository_specs(settings: Settings) -> list[ModelSpec]:
    """Every model of the repository (mode none serves them all from start-up)."""
    return [_spec(settings, name, repository_path(settings, name)) for name in repository_names(settings)]


@dataclass
class Entry:
    """A repository model's state as the index reports it: READY, LOADING, UNLOADING or UNAVAILABLE."""

    state: str = "UNAVAILABLE"
    reason: str = ""
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


class ModelRepository:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.entries: dict[str, Entry] = {}
        self._grid_lock = threading.Lock()
        self.loaded: set[str] = set()  # names put in service by a load (the ones unload may take away)
        self.operations = Counter(
            "albert_model_control_total",
            "Model loads and unloads by the model repository API, by outcome.",
            ["operation", "outcome"],
            registry=runtime.metrics.registry,
        )

    @classmethod
    def of(cls, runtime: Runtime) -> ModelRepository:
        """The runtime's repository (one per runtime, however many apps serve it)."""
        found = runtime.__dict__.get("model_repository")
        if found is None:
            found = runtime.__dict__["model_repository"] = cls(runtime)
        return found

    @property
    def explicit(self) -> bool:
        return bool(self.settings.model_repository) and self.settings.model_control_mode == "explicit"

    def _require_explicit(self) -> None:
        if not self.settings.model_repository:
            raise ControlRefused("no model repository is configured (--model-repository)")
        if not self.explicit:
            raise ControlRefused(
                "model control is off: start with --model-control-mode explicit to load and unload models"
            )

    def _entry(self, name: str) -> Entry:
        return self.entries.setdefault(name, Entry())

    def index(self) -> list[dict]:
        if not self.settings.model_repository:
            return []
        rows = []
        for name in repository_names(self.settings):
            served = self.runtime.models.get(name)
            entry = self.entries.get(name)
            if entry is not None and entry.state in ("LOADING", "UNLOADING"):
                state, reason = entry.state, entry.reason
            elif served is not None:
                state = (
                    "READY"
                    if served.state == "ready"
                    else "UNAVAILABLE"
                    if served.state == "failed"
                    else "LOADING"
                )
                reason = (entry.reason if entry is not None else "") or served.reason
            else:
                state, reason = "UNAVAILABLE", entry.reason if entry is not None else "not loaded"
            row = {"name": name, "state": state, "reason": reason}
            if state == "READY":
                row["version"] = "1"
            rows.append(row)
        return rows

    async def load(self, name: str) -> None:
        self._require_explicit()
        path = repository_path(self.settings, name)
        configured = self.runtime.models.get(name)
        if configured is not None and name not in self.loaded:
            raise ControlRefused(f"model {name!r} is configured at start-up, not loaded from the repository")
        entry = self._entry(name)
        async with entry.lock:
            entry.state, entry.reason = "LOADING", ""
            start = time.perf_counter()
            log.info("model control: loading %s from %s", name, path)
            try:
                served, handler = await asyncio.to_thread(self._build, name, path)
                self._check_default(served)
            except Exception as exc:
                entry.state = "READY" if name in self.runtime.models else "UNAVAILABLE"
                entry.reason = f"load failed: {exc}" if not isinstance(exc, ServiceError) else exc.message
                self.operations.labels("load", "failed").inc()
                log.error("model control: loading %s failed: %s", name, entry.reason)
                raise LoadFailed(f"model {name!r} failed to load: {entry.reason}") from None
            # On the event loop, in one step: requests see the old model or the new one, never neither.
            self.runtime.serve(served, handler)
            self.runtime.models[name] = served
            self.loaded.add(name)
            entry.state, entry.reason = "READY", ""
            self.operations.labels("load", "ok").inc()
            self._complete_grid_later(served)
            log.info(
                "model control: %s ready (%s) in %.2fs, %d/%d programs compiled",
                name,
                served.task,
                time.perf_counter() - start,
                served.compiled,
                served.total,
            )

    def _complete_grid_later(self, served: ServedModel) -> None:
        """Compile the rest of a loaded model's bucket grid in the background, at low priority, as start-up
        does for the configured models (it serves from its covering programs meanwhile); one at a time."""

        def complete() -> None:
            with self._grid_lock:
                if self.runtime._stop.is_set() or self.runtime.models.get(served.name) is not served:
                    return
                try:
                    for _ in complete_grids(
                        [served.grid], costs_file=self.runtime._costs_file, stop=self.runtime._stop
                    ):
                        pass
                except Exception:  # the model keeps serving with what has landed
                    log.exception("model control: compiling the rest of %s's grid failed", served.name)

        threading.Thread(target=complete, name=f"grid-{served.name}", daemon=True).start()

    def _check_default(self, served: ServedModel) -> None:
        """A model marked `default` may not take the place of another model's default of its task."""
        if not served.spec.default:
            return
        for other in self.runtime.models.values():
            if other.name != served.name and other.task == served.task and other.spec.default:
                raise LoadFailed(
                    f"{MANIFEST} says default = true, but {other.name!r} is already the default of task "
                    f"{served.task}"
                )

    def _build(self, name: str, path: Path) -> tuple[ServedModel, object]:
        spec = _checked([_spec(self.settings, name, path)])[0]
        served = ServedModel(spec, spec.task)
        try:
            handler = self.runtime._load(served, serve=False)
        except Exception as exc:
            raise LoadFailed(_describe_failure(spec, exc)) from None
        return served, handler

    async def unload(self, name: str) -> None:
        self._require_explicit()
        repository_path(self.settings, name)
        if name in self.runtime.models and name not in self.loaded:
            raise ControlRefused(f"model {name!r} is configured at start-up, not loaded from the repository")
        entry = self._entry(name)
        async with entry.lock:
            served = self.runtime.models.get(name)
            if served is None:
                raise ModelNotFound(f"model {name!r} is not loaded")
            entry.state, entry.reason = "UNLOADING", ""
            log.info("model control: unloading %s", name)
            del self.runtime.models[name]  # new requests: 404 from now on
            # The requests accepted for it are answered: its queue drains, then it goes.
            while not self.runtime.batcher.remove(name):
                await asyncio.sleep(0.01)
            self.runtime.runners.pop(name, None)
            self.runtime.tasks.pop(name, None)
            self.loaded.discard(name)
            metrics = self.runtime.metrics
            for state in STATES:
                with contextlib.suppress(KeyError):  # never reported on /metrics
                    metrics.model_state.remove(name, served.task or "", state)
            del served
            await asyncio.to_thread(gc.collect)
            entry.state, entry.reason = "UNAVAILABLE", "unloaded"
            self.operations.labels("unload", "ok").inc()
            log.info("model control: %s unloaded", name)


class LoadFailed(ServiceError):
    """A load that failed: the checkpoint is not one, or cannot serve its task."""

    error_type = "load_failed"
    status = 400
