"""Prometheus metrics, on a registry of the app's own (so several apps can live in one process, as in tests).

Compilations are counted process-wide from JAX's own monitoring events: whatever compiles, for whatever
reason, shows up in `albert_compilations_total`.
"""

from __future__ import annotations

import threading

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _CompileCounter:
    """Counts XLA backend compilations and persistent-cache hits in this process."""

    BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self._lock = threading.Lock()
        self.compilations = 0
        self.seconds = 0.0
        self.cache_misses = 0  # programs compiled for real: not found in the persistent compilation cache
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_misses":
            with self._lock:
                self.cache_misses += 1

    def _on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == self.BACKEND_COMPILE:
            with self._lock:
                self.compilations += 1
                self.seconds += seconds


COMPILES = _CompileCounter()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "albert_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "albert_request_latency_seconds",
            "Request latency, end to end.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "albert_queue_seconds",
            "Time from queueing to the first forward pass that holds the request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "albert_inference_seconds",
            "Time in forward passes per request.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "albert_batch_sequences",
            "Sequences per forward pass.",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "albert_batch_seconds",
            "Device time of each forward pass (its sum over wall time is how busy the device is).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Counter(
            "albert_batch_tokens",
            "Real (non-padding) tokens run through the model.",
            ["model"],
            registry=r,
        )
        self.padding_ratio = Histogram(
            "albert_batch_padding_ratio",
            "Fraction of each forward pass spent on padding.",
            ["model"],
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.queue_depth = Gauge("albert_queue_sequences", "Sequences waiting for the model.", registry=r)
        self.ready = Gauge("albert_ready", "1 when every model is loaded and compiled.", registry=r)
        self.model_state = Gauge(
            "albert_model_state",
            "1 for each model's current state (loading, compiling, ready, failed), 0 for the others.",
            ["model", "task", "state"],
            registry=r,
        )
        self.model_programs = Gauge(
            "albert_model_programs",
            "Programs each model needs (total) and has compiled (compiled).",
            ["model", "kind"],
            registry=r,
        )
        compilations = Gauge(
            "albert_compilations", "XLA compilations in this process (including start-up).", registry=r
        )
        compilations.set_function(lambda: COMPILES.compilations)
        self.compile_seconds = Gauge(
            "albert_bucket_compile_seconds",
            "Compile time of each program at start-up.",
            ["model", "bucket"],
            registry=r,
        )

    def observe_batch(self, stats) -> None:
        self.batch_size.labels(stats.model).observe(stats.sequences)
        self.batch_seconds.labels(stats.model).observe(stats.seconds)
        self.batch_tokens.labels(stats.model).inc(stats.tokens)
        self.padding_ratio.labels(stats.model).observe(stats.padding_ratio)
