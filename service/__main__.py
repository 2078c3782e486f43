"""`albert-serve` / `python -m service`: start the HTTP server.

Graceful shutdown: on SIGTERM (or Ctrl-C) the service first *drains*: /ready turns 503 and new task
requests get 503, while requests already accepted are answered. When none is left (or the shutdown
deadline is near) the server stops; a second signal, or the deadline itself, ends the process at once.

A signal while models are still loading or compiling stops the start-up too: no new compile starts, and
the process exits with status 0 as soon as the requests in flight (to models already ready) are answered,
without waiting for the compiles in progress.

A configuration the service cannot start with (see service/models.py) exits with status 2 and one line
naming the entry and the reason, before anything loads.

`albert-serve <command> ...` runs one of the SUBCOMMANDS instead of the server (each reads the same
configuration: flags and ALBERT_* variables).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

from .app import configure_logging, create_app
from .models import ConfigError
from .runtime import Runtime
from .settings import load_settings

log = logging.getLogger("albert_serve")

# Left for the server's own connection shutdown after draining.
_CLOSE_SECONDS = 1.0
# How long uvicorn waits for connections still open once draining is over. Shorter than _CLOSE_SECONDS:
# uvicorn notices `should_exit` on a 0.1 s tick and then runs the lifespan shutdown, and all of it must end
# before the backstop at the deadline (with an equal wait, a request that never completes, e.g. a client
# that never sends its whole body, always ended in the backstop's exit status 1).
_SERVER_CLOSE_SECONDS = 0.5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, timeout: float):
        super().__init__(config)
        self.runtime = runtime
        self.timeout = timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.runtime.draining = True
        if self.runtime.starting:
            self.runtime.stop_start_up()
            log.info(
                "signal %s during start-up (%s): stopping; no new compile starts",
                _signal_name(sig),
                self.runtime.pending_summary() or "starting",
            )
        log.info(
            "signal %s: draining %d in-flight request(s), %.0fs at most",
            _signal_name(sig),
            self.runtime.in_flight,
            self.timeout,
        )
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        # Backstop: whatever happens, the process is gone by the deadline.
        backstop = threading.Timer(self.timeout, self._force_exit)
        backstop.daemon = True
        backstop.start()
        while self.runtime.in_flight > 0 and time.monotonic() < deadline - _CLOSE_SECONDS:
            time.sleep(0.05)
        log.info("drained (%d request(s) left); stopping", self.runtime.in_flight)
        self.should_exit = True

    def _force_exit(self) -> None:
        # Say why the process ends without its usual shutdown lines (and with status 1).
        log.warning("shutdown deadline of %.0fs reached; exiting now", self.timeout)
        os._exit(1)  # no logging.shutdown(): a handler lock held by a stuck thread must not stop the exit


def _signal_name(sig) -> str:
    try:
        return signal.Signals(sig).name
    except (ValueError, TypeError):
        return str(sig)


# Commands beside serving: name -> the module whose `main(argv) -> int` runs it (imported only when used).
SUBCOMMANDS = {
    "compile": "service.precompile",  # fill the compilation cache and bucket costs for the models, then exit
    "batch": "service.batch.cli",  # every row of a file or dataset through one model, into Parquet
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        sys.exit(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]))
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    try:
        runtime = Runtime(settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"albert-serve: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    app = create_app(settings, runtime=runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=_SERVER_CLOSE_SECONDS,
        server_header=False,
    )
    DrainingServer(config, runtime, settings.shutdown_timeout_s).run()
    if runtime.starting:
        # Stopped during start-up: compiles may still be running on their threads (XLA cannot interrupt
        # one), and the interpreter would wait for them, then abort tearing JAX down under them. Nothing is
        # left to answer, so leave now, cleanly.
        log.info("stopped during start-up; exiting with status 0")
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
