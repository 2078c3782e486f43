"""The runtime: the repository of named models, each with its own state, and the batcher that serves them.

Models load and compile one after the other on a background thread, so /health answers at once and each
model serves as soon as it is ready: `loading` -> `compiling` -> `ready`, or `failed` with the reason. A
model that fails never stops the others. /ready is strict by default (every model ready); the setting
`strict_readiness=false` relaxes it to every model that did not fail.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

import model as albert
from model.hub import resolve_source

from .batching import Batcher
from .engine import ModelRunner, bucket_grid, complete_grids, program_sets, release_memory
from .engine.compiling import background_loader
from .errors import (
    EndpointDisabled,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    NotReady,
    ServiceError,
)
from .grid_child import GridChild
from .metrics import COMPILES, Metrics
from .models import ConfigError, ModelSpec, configured_models, task_of_checkpoint
from .settings import MODEL_FIELDS, Settings
from .tasks import TASKS
from .tasks.base import ModelTask

log = logging.getLogger(__name__)

STATES = ("loading", "compiling", "ready", "failed")
# What a tokenizer is read from (model/tokenizer.py): models whose files are all the same share one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def configure_compilation_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache (must happen before the first compile)."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every bucket: even sub-second compiles add up over a grid of shapes.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class StartUpStopped(Exception):
    """The process is shutting down while this model was still loading or compiling."""


@dataclass
class ServedModel:
    """One named model and where it stands."""

    spec: ModelSpec
    task: str | None  # known from the configuration or the checkpoint; None until a hub checkpoint is fetched
    state: str = "loading"  # loading | compiling | ready | failed
    reason: str = ""  # why it failed
    runner: ModelRunner | None = None  # once ready
    grid: ModelRunner | None = None  # from compiling on: whose programs count as this model's progress
    architecture: str = ""
    labels: list[str] | None = None
    mask_token: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def compiled(self) -> int:
        """Programs of this model's grid compiled so far (shared ones included)."""
        return self.grid.compiled_count() if self.grid is not None else 0

    @property
    def total(self) -> int:
        return self.grid.program_count() if self.grid is not None else 0

    def grid_progress(self) -> dict | None:
        """Where the model's grid stands: programs compiled of all, and whether every bucket is compiled
        and timed (`complete`); the model answers everything from `ready` on, with what has landed."""
        if self.grid is None:
            return None
        return {
            "compiled": self.compiled,
            "programs": self.total,
            "buckets_compiled": len(self.grid.compiled_buckets),
            "buckets": len(self.grid.buckets),
            "complete": self.grid.grid_complete,
        }

    def describe(self) -> dict:
        """The model as GET /models lists it."""
        entry = {
            "name": self.name,
            "task": self.task,
            "endpoint": TASKS[self.task].endpoints[0].path if self.task else None,
            "source": self.spec.source,
            "default": self.spec.default,
            "dtype": self.spec.dtype,
            "state": self.state,
        }
        if self.state == "compiling":
            entry["compiled"], entry["programs"] = self.compiled, self.total
        if self.state in ("compiling", "ready") and self.grid is not None:
            entry["grid"] = self.grid_progress()
        if self.state == "failed":
            entry["reason"] = self.reason
        if self.runner is not None and self.task == "fill-mask":
            entry["mask_token"] = self.mask_token
        return entry


@dataclass
class Runtime:
    settings: Settings
    # The models to serve; None: the configured ones (`configured_models(settings)`). A batch job serves one.
    specs: list[ModelSpec] | None = None
    # After ready, compile the rest of the grid in the background (a server). A batch job keeps to the covering
    # set: its full batches pack into the covering buckets, and a compiler beside it would only take its cores.
    complete_grid: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    models: dict[str, ServedModel] = field(default_factory=dict)
    runners: dict[str, ModelRunner] = field(default_factory=dict)  # name -> runner, ready models only
    tasks: dict[str, Any] = field(default_factory=dict)  # name -> task handler, ready models only
    batcher: Batcher | None = None
    draining: bool = False
    in_flight: int = 0  # task requests being handled (maintained by the request middleware)
    started_at: float = field(default_factory=time.monotonic)
    _thread: threading.Thread | None = None
    _settled: threading.Event = field(default_factory=threading.Event)  # every model ready or failed
    _stop: threading.Event = field(default_factory=threading.Event)
    _background: bool = True
    _grid_thread: threading.Thread | None = None
    _grid_done: threading.Event = field(default_factory=threading.Event)
    _grid_child: GridChild | None = None  # the background grid compiler, while it runs (see grid_child.py)
    _misses_at_ready: int = 0  # persistent-cache misses (real compiles) in this process when start-up ended
    _tokenizers: dict = field(default_factory=dict)  # files' digest -> tokenizer (see `_tokenizer`)
    _tokenizers_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        # Raises ConfigError naming the entry: nothing has loaded or compiled yet.
        specs = self.specs if self.specs is not None else configured_models(self.settings)
        self.models = {spec.name: ServedModel(spec, spec.task) for spec in specs}
        self.batcher = Batcher(
            {},
            max_batch_sequences=self.settings.max_batch_sequences,
            max_queue_sequences=self.settings.max_queue_sequences,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            on_batch=self.metrics.observe_batch,
        )

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, *, background: bool = True) -> None:
        """Load and compile on a background thread (`background`), or here: then every model's whole grid is
        compiled and timed before this returns."""
        configure_compilation_cache(self.settings.compilation_cache_dir)
        self.batcher.start()
        self._background = background
        if background:
            self._thread = threading.Thread(target=self._start_up, name="start-up", daemon=True)
            self._thread.start()
        else:
            self._start_up()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every model is ready or failed; True if they all settled in time."""
        return self._settled.wait(timeout)

    @property
    def starting(self) -> bool:
        """Some model is still loading or compiling, or the rest of the grid is (a shutdown then stops the
        compiles and leaves at once)."""
        return not self._settled.is_set() or (self._grid_thread is not None and not self._grid_done.is_set())

    @property
    def grid_complete(self) -> bool:
        """Every ready model's whole grid is compiled and timed."""
        return all(m.grid.grid_complete for m in self.models.values() if m.state == "ready" and m.grid)

    def stop_start_up(self) -> None:
        """No new model loads and no new program compiles from now on (a shutdown during start-up)."""
        self._stop.set()
        self._stop_grid_child()

    def stop(self) -> None:
        self._stop.set()
        self._stop_grid_child()
        if self.batcher is not None:
            self.batcher.stop()
        if self._grid_thread is not None:  # no new compile starts; one in progress ends within a second or so
            self._grid_thread.join(10)

    @property
    def ready(self) -> bool:
        if self.draining:
            return False
        if not self.models:  # with explicit model control, a server starts empty and models load by request
            return self.settings.model_control_mode == "explicit"
        states = [m.state for m in self.models.values()]
        if self.settings.strict_readiness:
            return all(s == "ready" for s in states)
        return all(s in ("ready", "failed") for s in states) and "ready" in states

    @property
    def failed(self) -> dict[str, str]:
        return {name: m.reason for name, m in self.models.items() if m.state == "failed"}

    def _start_up(self) -> None:
        begin = time.perf_counter()
        for served in self.models.values():
            if self._stop.is_set():
                break
            try:
                self._load(served)
            except StartUpStopped:
                break
            except Exception as exc:  # this model only: the others load, and /models says why
                served.state, served.reason = "failed", _describe_failure(served.spec, exc)
                log.error("model %s failed: %s", served.name, served.reason)
        if self._stop.is_set():
            log.info("start-up stopped: shutting down")
            return
        if not self._background:  # in the foreground, the whole grid before returning
            self._complete_grid()
        # What start-up made (models, traced programs, executables) lives as long as the process. Frozen, it is
        # out of the garbage collector's reach, so a full collection while serving scans only what requests
        # create. Unfrozen, albert-base's four endpoints leave ~240,000 tracked objects, and each full
        # collection was a 0.4-0.6 s pause of every thread (measured during start-up).
        release_memory()
        gc.freeze()
        if self._background and self.complete_grid:
            self._misses_at_ready = COMPILES.cache_misses
            self._grid_thread = threading.Thread(target=self._complete_grid, name="grid", daemon=True)
            self._grid_thread.start()
        self._settled.set()
        self.metrics.ready.set(1 if self.ready else 0)
        ready = [name for name, m in self.models.items() if m.state == "ready"]
        log.info(
            "start-up done in %.1fs: %d model(s) ready, %d failed%s",
            time.perf_counter() - begin,
            len(ready),
            len(self.failed),
            f" ({', '.join(self.failed)})" if self.failed else "",
        )

    def _load(self, served: ServedModel, compile_covering: bool = True, serve: bool = True):
        """Load `served` and compile its covering programs (`compile_covering`; `albert-serve compile`'s
        background child only builds the model, to compile its grid itself); then serve it (`serve`), or
        return its task handler for the caller to serve."""
        spec = served.spec
        start = time.perf_counter()
        directory = resolve_source(spec.source)
        if served.task is None:
            served.task = task_of_checkpoint(spec, directory)
        task: ModelTask = TASKS[served.task]
        extra = task.read_checkpoint(directory, spec) if task.read_checkpoint is not None else None
        weights = getattr(extra, "backbone_dir", None) or directory
        loaded = albert.from_pretrained(weights, task=task.head, dtype=spec.dtype)
        tokenizer = self._tokenizer(loaded.directory)
        max_length = min(loaded.config.max_position_embeddings, tokenizer.model_max_length)
        # The task checks that this checkpoint can serve it (labels, head size) before anything compiles.
        handler = task.build(tokenizer, max_length, loaded.config, extra)
        served.architecture = loaded.task
        served.mask_token = tokenizer.mask_token
        served.labels = list(loaded.config.id2label) if (task.head or "").endswith("classification") else None
        log.info(
            "%s: loaded %s (%s, task %s) in %.1fs",
            spec.name,
            spec.source,
            loaded.task,
            served.task,
            time.perf_counter() - start,
        )

        devices = jax.local_devices()
        s = self.settings
        buckets = bucket_grid(
            max_length,
            single_row_lengths=s.seq_buckets,
            multi_row_lengths=s.batch_seq_buckets,
            row_counts=s.batch_buckets,
            max_batch_tokens=s.max_batch_tokens,
            devices=len(devices),
        )
        runner = ModelRunner(
            task.program,
            loaded,
            buckets,
            devices,
            embedding=extra if task.program in ("embed", "sparse") else None,
        )
        served.grid, served.state = runner, "compiling"
        shared = runner.compiled_count()
        if shared:
            log.info(
                "%s: %d of its %d programs are already compiled (shared)", spec.name, shared, served.total
            )
        # Ready once the covering programs are compiled: it can then answer any request without compiling.
        # The rest of the grid compiles in the background once every model is ready (see `_complete_grid`).
        covering = (
            runner.compile_covering(costs_file=self._costs_file, stop=self._stop) if compile_covering else []
        )
        for label, seconds in covering:
            self.metrics.compile_seconds.labels(spec.name, label).set(seconds)
            log.info(
                "%s: compiled %s in %.2fs (%d/%d)", spec.name, label, seconds, served.compiled, served.total
            )
        if self._stop.is_set():
            raise StartUpStopped
        served.runner = runner
        if (
            not serve
        ):  # the model repository puts it in service itself, on the event loop (service/repository.py)
            return handler
        self.serve(served, handler)
        log.info(
            "%s: ready (%s) after %.1fs, %d/%d programs compiled",
            spec.name,
            served.task,
            time.perf_counter() - start,
            served.compiled,
            served.total,
        )

    def serve(self, served: ServedModel, handler) -> None:
        """Answer requests for `served` (ready: its runner built and covering programs compiled) with
        `handler`; a model of the same name already served is replaced, its queued requests kept."""
        self.runners[served.name] = served.runner
        self.tasks[served.name] = handler  # the task's pre- and post-processing for this model
        self.batcher.add(served.name, served.runner)
        served.state = "ready"

    def _tokenizer(self, directory: Path):
        """The checkpoint's tokenizer; one object for every model whose tokenizer files are the same (an
        albert-base tokenizer holds ~28 MB; tokenizing only reads it, and truncation works on copies)."""
        digest = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            path = Path(directory) / name
            digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-") + b"\0")
        key = digest.hexdigest()
        with self._tokenizers_lock:
            found = self._tokenizers.get(key)
        if found is None:
            found = albert.load_tokenizer(directory)
            with self._tokenizers_lock:
                found = self._tokenizers.setdefault(key, found)
        return found

    @property
    def _costs_file(self) -> Path | None:
        cache = self.settings.compilation_cache_dir
        return Path(cache) / "albert-serve-bucket-costs.json" if cache else None

    def _complete_grid(self) -> None:
        """Compile (or read from the persistent cache) the rest of every ready model's grid, at low priority,
        then time each bucket; each model plans with each bucket as it lands. A request never waits for it:
        it only ever runs through what is already compiled."""
        begin = time.perf_counter()
        runners = [m.grid for m in self.models.values() if m.state == "ready" and m.grid is not None]
        users: dict[int, list[str]] = {}
        for name, m in self.models.items():
            if m.state == "ready" and m.grid is not None:
                for program_set in (m.grid.main, m.grid.vocab):
                    if program_set is not None:
                        users.setdefault(id(program_set), []).append(name)
        count = loaded = 0
        try:
            if self._background and self._costs_file is not None:
                loaded = self._grid_from_child()
            for program_set, label, seconds in complete_grids(
                runners, costs_file=self._costs_file, stop=self._stop, background=self._background
            ):
                count += 1
                names = users.get(id(program_set), [])
                for name in names:
                    self.metrics.compile_seconds.labels(name, label).set(seconds)
                log.debug(
                    "grid: compiled %s %s in %.2fs (%s)", program_set.label, label, seconds, ", ".join(names)
                )
        except Exception:  # the models keep serving with what has landed
            log.exception("compiling the rest of the grid failed")
            return
        finally:
            self._grid_done.set()
        if self._stop.is_set():
            return
        # What the background made lives as long as the process too: out of the collector's reach, as at the
        # end of start-up (complete_grids has just collected).
        gc.freeze()
        log.info(
            "grid complete in %.1fs: %d program(s) loaded from the background compiler, %d compiled here, "
            "%d model(s); %d compile(s) in this process since ready",
            time.perf_counter() - begin,
            loaded,
            count,
            len(runners),
            COMPILES.cache_misses - self._misses_at_ready,
        )

    def _grid_from_child(self) -> int:
        """Have a child process compile the rest of the grid into the persistent cache at the lowest priority
        (service/grid_child.py), and load each program from the cache as it lands; the number loaded. If the
        child fails, what it did not deliver is compiled here (complete_grids, after this)."""
        try:
            child = GridChild(self.settings)
        except OSError as exc:
            log.warning("could not start the background grid compiler (%s); compiling in this process", exc)
            return 0
        self._grid_child = child
        if self._stop.is_set():  # a shutdown between the check and the start
            self._stop_grid_child()
            return 0
        log.info("grid: compiling the rest in a background process (pid %d)", child.pid)
        sets = {program_set.label: program_set for program_set in program_sets()}
        loaded = 0
        with background_loader() as load:
            for label, key, path in child.programs():
                if self._stop.is_set():
                    break
                program_set = sets.get(label)
                if program_set is None or key in program_set.compiled:
                    continue
                load(program_set, key, path)  # no compile: the serialized executable, or the cache
                program_set.refresh()
                loaded += 1
        status = child.wait()
        child.stop()  # removes its files
        self._grid_child = None
        if status != 0 and not self._stop.is_set():
            log.warning(
                "the background grid compiler exited with status %d after %d program(s); compiling the rest "
                "in this process",
                status,
                loaded,
            )
        return loaded

    def _stop_grid_child(self) -> None:
        child = self._grid_child
        if child is not None:
            child.stop()

    # -- what the routes need -------------------------------------------------------------------------------

    def model_for(self, task: str, name: str | None) -> ServedModel:
        """The model that answers a request for `task` naming `name` (None: the task's default)."""
        if name is not None:
            served = self.named(name)
            if served.task is not None and served.task != task:
                raise InvalidInput(
                    f"model {name!r} serves task {served.task} (POST {TASKS[served.task].endpoints[0].path}), "
                    f"not {task}"
                )
        else:
            served = self._default_model(task)
        return self.usable(served)

    def named(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"no model is named {name!r}; the models are: {known}")
        return served

    def _default_model(self, task: str) -> ServedModel:
        candidates = [m for m in self.models.values() if m.task == task]
        if not candidates:
            pending = [m.name for m in self.models.values() if m.task is None and m.state != "failed"]
            if pending:  # a hub model whose task is not known yet may turn out to serve it
                raise NotReady(
                    f"no model of task {task} is known yet; still loading: {', '.join(pending)}",
                    headers={"Retry-After": "5"},
                )
            path = TASKS[task].endpoints[0].path
            variable = f"{Settings.env_name(MODEL_FIELDS[task])}, " if task in MODEL_FIELDS else ""
            raise EndpointDisabled(
                f"no model is configured for {path} (task {task}); configure one: {variable}a "
                f'[models.<name>] table with task = "{task}" in ALBERT_MODELS_FILE, or ALBERT_MODELS'
            )
        defaults = [m for m in candidates if m.spec.default]
        if defaults:
            return defaults[0]
        if len(candidates) == 1:
            return candidates[0]
        names = ", ".join(repr(m.name) for m in candidates)
        raise InvalidInput(
            f'several models serve task {task} and none is the default: name one with "model" ({names})'
        )

    def usable(self, served: ServedModel) -> ServedModel:
        """`served` if it can answer now; otherwise the 503 that says why (failed: no Retry-After)."""
        if served.state == "ready":
            return served
        if served.state == "failed":
            raise ModelUnavailable(f"model {served.name!r} failed to load: {served.reason}")
        progress = f" ({served.compiled}/{served.total} programs)" if served.state == "compiling" else ""
        raise NotReady(
            f"model {served.name!r} is not ready yet: {served.state}{progress}", headers={"Retry-After": "5"}
        )

    def pending_summary(self) -> str:
        parts = []
        for name, m in self.models.items():
            if m.state == "compiling":
                parts.append(f"{name} compiling {m.compiled}/{m.total} programs")
            elif m.state == "loading":
                parts.append(f"{name} loading")
        return "; ".join(parts)

    def readiness(self) -> dict:
        body: dict = {
            "ready": self.ready,
            "draining": self.draining,
            "models": {name: m.state for name, m in self.models.items()},
        }
        if self.failed:
            body["failed"] = self.failed
        if not self.ready:
            # Failures are listed once, under "failed"; "pending" is what is still on its way.
            body["pending"] = "shutting down" if self.draining else self.pending_summary() or "nothing"
        return body

    def info(self) -> dict:
        models = {}
        for name, m in self.models.items():
            entry = m.describe()
            runner = m.runner
            if runner is not None:
                cfg = runner.config
                entry.update(
                    architecture=m.architecture,
                    labels=m.labels,
                    dtype=jax.numpy.dtype(runner.model.dtype).name,
                    devices=[str(d) for d in runner.devices],
                    max_length=runner.packer.max_length,
                    buckets=[str(b) for b in runner.buckets],
                    compiled_buckets=[str(b) for b in runner.compiled_buckets],
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_hidden_layers,
                )
            models[name] = entry
        # Per endpoint, the model a request naming none gets (the contract's original /info shape).
        endpoints = {}
        for task in TASKS.values():
            try:
                served = self._default_model(task.name)
            except ServiceError:
                continue
            endpoints[task.endpoints[0].path.lstrip("/")] = {"model": served.name, **models[served.name]}
        return {
            "models": models,
            "endpoints": endpoints,
            "jax": {"version": jax.__version__, "backend": jax.default_backend()},
        }


def _describe_failure(spec: ModelSpec, exc: Exception) -> str:
    if isinstance(exc, albert.SourceNotFoundError):
        return f"{exc} (check {spec.origin}: a local model directory, or a hub id in the cache)"
    if isinstance(exc, ConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
