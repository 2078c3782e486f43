"""The runtime: loads each configured model once, compiles its buckets, and runs the batcher.

Start-up happens on a background thread so that /health answers at once and /ready can say what is still
pending; /ready turns 200 only when every endpoint is loaded and every bucket compiled.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax

import model as albert
from model.pretrained import resolve_dtype

from .batching import Batcher
from .engine import ENDPOINT_TASKS, ModelRunner, bucket_grid
from .errors import EndpointDisabled, NotReady
from .metrics import Metrics
from .settings import Settings, model_env_var
from .tasks import build_task

log = logging.getLogger(__name__)


def configure_compilation_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache (must happen before the first compile)."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache every bucket: even sub-second compiles add up over a grid of shapes.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclass
class EndpointStatus:
    source: str
    state: str = "pending"  # pending | loading | compiling | ready | failed
    detail: str = ""
    compiled: int = 0
    total: int = 0


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    status: dict[str, EndpointStatus] = field(default_factory=dict)
    runners: dict[str, ModelRunner] = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    batcher: Batcher | None = None
    draining: bool = False
    in_flight: int = 0  # task requests being handled (maintained by the request middleware)
    started_at: float = field(default_factory=time.monotonic)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.status = {e: EndpointStatus(s) for e, s in self.settings.model_sources().items()}

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self, *, background: bool = True) -> None:
        configure_compilation_cache(self.settings.compilation_cache_dir)
        if background:
            self._thread = threading.Thread(target=self._start_up, name="start-up", daemon=True)
            self._thread.start()
        else:
            self._start_up()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self.draining

    @property
    def failed(self) -> dict[str, str]:
        return {e: s.detail for e, s in self.status.items() if s.state == "failed"}

    def _start_up(self) -> None:
        begin = time.perf_counter()
        for endpoint, status in self.status.items():
            try:
                self._load(endpoint, status)
            except Exception as exc:  # reported by /ready; the process keeps serving /health and /ready
                status.state = "failed"
                status.detail = _describe_failure(endpoint, status.source, exc)
                log.error("%s: %s", endpoint, status.detail)
        if self.failed:
            return
        self.batcher = Batcher(
            self.runners,
            max_batch_sequences=self.settings.max_batch_sequences,
            max_queue_sequences=self.settings.max_queue_sequences,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            on_batch=self.metrics.observe_batch,
        )
        # What start-up made (models, traced programs, executables) lives as long as the process. Frozen, it is
        # out of the garbage collector's reach, so a full collection while serving scans only what requests
        # create. Unfrozen, albert-base's four endpoints leave ~240,000 tracked objects, and each full
        # collection was a 0.4-0.6 s pause of every thread (measured during start-up).
        gc.collect()
        gc.freeze()
        self.batcher.start()
        self.metrics.ready.set(1)
        self._ready.set()
        log.info("ready: %d endpoint(s) in %.1fs", len(self.runners), time.perf_counter() - begin)

    def _load(self, endpoint: str, status: EndpointStatus) -> None:
        status.state = "loading"
        start = time.perf_counter()
        loaded = albert.from_pretrained(
            status.source, task=ENDPOINT_TASKS[endpoint], dtype=self.settings.dtype
        )
        tokenizer = albert.load_tokenizer(loaded.directory)
        max_length = min(loaded.config.max_position_embeddings, tokenizer.model_max_length)
        log.info(
            "%s: loaded %s (%s) in %.1fs", endpoint, status.source, loaded.task, time.perf_counter() - start
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
        runner = ModelRunner(endpoint, loaded, buckets, devices)
        status.state, status.total = "compiling", runner.program_count()
        cache = self.settings.compilation_cache_dir
        costs_file = Path(cache) / "albert-serve-bucket-costs.json" if cache else None
        for label, seconds in runner.compile_all(costs_file=costs_file):
            status.compiled += 1
            self.metrics.compile_seconds.labels(endpoint, label).set(seconds)
            log.info(
                "%s: compiled %s in %.2fs (%d/%d)", endpoint, label, seconds, status.compiled, status.total
            )
        status.state = "warming up"
        self.runners[endpoint] = runner
        self.tasks[endpoint] = build_task(endpoint, tokenizer, max_length, loaded.config)
        status.state, status.detail = "ready", ""

    # -- what the routes need -------------------------------------------------------------------------------

    def task_for(self, endpoint: str):
        if endpoint not in self.status:
            raise EndpointDisabled(
                f"no model is configured for /{endpoint}; set {model_env_var(endpoint)} to a model source"
            )
        if not self._ready.is_set():
            raise NotReady(f"the service is starting: {self.pending_summary()}", headers={"Retry-After": "5"})
        return self.tasks[endpoint]

    def pending_summary(self) -> str:
        parts = []
        for endpoint, s in self.status.items():
            if s.state == "compiling":
                parts.append(f"{endpoint} compiling {s.compiled}/{s.total} buckets")
            elif s.state != "ready":
                parts.append(f"{endpoint} {s.state}" + (f" ({s.detail})" if s.detail else ""))
        return "; ".join(parts) or "starting the device worker"

    def readiness(self) -> dict:
        return {
            "ready": self.ready,
            "draining": self.draining,
            "endpoints": {
                e: {
                    "state": s.state,
                    "compiled": s.compiled,
                    "buckets": s.total,
                    **({"error": s.detail} if s.detail else {}),
                }
                for e, s in self.status.items()
            },
            **(
                {}
                if self.ready
                else {"pending": self.pending_summary() if not self.draining else "shutting down"}
            ),
        }

    def info(self) -> dict:
        endpoints = {}
        for endpoint, status in self.status.items():
            runner = self.runners.get(endpoint)
            entry = {"source": status.source, "state": status.state}
            if runner is not None:
                cfg = runner.config
                entry.update(
                    architecture=runner.model.task,
                    labels=list(cfg.id2label) if endpoint in ("classify", "ner") else None,
                    dtype=jax.numpy.dtype(resolve_dtype(self.settings.dtype)).name,
                    devices=[str(d) for d in runner.devices],
                    max_length=runner.packer.max_length,
                    buckets=[str(b) for b in runner.buckets],
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    num_hidden_layers=cfg.num_hidden_layers,
                )
            endpoints[endpoint] = entry
        return {"endpoints": endpoints, "jax": {"version": jax.__version__, "backend": jax.default_backend()}}


def _describe_failure(endpoint: str, source: str, exc: Exception) -> str:
    if isinstance(exc, albert.SourceNotFoundError):
        return f"{exc} (set {model_env_var(endpoint)} to a local model directory, or to empty to disable /{endpoint})"
    return f"{type(exc).__name__}: {exc}"
