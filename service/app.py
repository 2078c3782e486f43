"""The application factory: routes, error mapping, and the request middleware.

`create_app(settings)` builds the app; its lifespan starts the runtime (models load and compile in the
background, so /health answers at once) and stops it on shutdown.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import tei
from .api import oip
from .api.routes import models, ops, pages, tasks
from .errors import ServiceError
from .repository import ModelRepository
from .runtime import Runtime
from .settings import Settings
from .tasks import endpoints

log = logging.getLogger("albert_serve.access")
error_log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TASK_PATHS = {endpoint.path for _, endpoint in endpoints()} | set(tei.PATHS)
_METRIC_PATHS = {*_TASK_PATHS, "/health", "/ready", "/info", "/metrics", "/models"}


def _is_task_request(scope) -> bool:
    """A request that runs a model: a task endpoint, or POST /models/{name}."""
    path = scope.get("path", "")
    if path.startswith("/v2/models/") and path.endswith("/infer"):  # the Open Inference Protocol's infer
        return True
    return path in _TASK_PATHS or (path.startswith("/models/") and scope.get("method") == "POST")


def _metric_label(scope) -> str:
    """Requests are counted by route, not by raw path (a model name is not a label of its own)."""
    path = scope.get("path", "")
    if path in _METRIC_PATHS:
        return path
    if path.startswith("/models/"):
        return "/models/{name}"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "/v2/models/{name}/infer"
    return "other"


def error_response(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(exc: RequestValidationError, content_type: str = "") -> str:
    """One readable line per problem: where, what, and the value received (shortened)."""
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",)) or "body"
        kind = error.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})")
            continue
        if kind == "missing" and loc == "body":
            parts.append("the body is empty; expected a JSON object with 'inputs'")
            continue
        if loc == "body" and isinstance(error.get("input"), bytes):
            # FastAPI leaves the body as raw bytes when the Content-Type is not JSON (curl -d sends a form).
            raw = error["input"]
            sent = f"sent as {content_type}" if content_type else "sent without a Content-Type"
            start = raw[:40].decode("utf-8", "replace")
            start = "".join(c if c.isprintable() else "?" for c in start) + ("..." if len(raw) > 40 else "")
            parts.append(
                f"the body must be JSON sent with the header 'Content-Type: application/json' (got "
                f"{len(raw)} bytes {sent}, starting: {start})"
            )
            continue
        message = error.get("msg", "invalid")
        parts.append(
            f"{loc}: {message}" + ("" if kind == "missing" else f" (got {_short(error.get('input'))})")
        )
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def describe_body_error(cause: BaseException) -> str:
    """What made a body undecodable, without the parser's internals."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body is not valid UTF-8: byte 0x{cause.object[cause.start]:02x} at offset {cause.start} "
            f"({cause.reason})"
        )
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON: it nests arrays or objects too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the body is not valid JSON: it holds an integer with too many digits"
    return f"the body could not be decoded as JSON ({type(cause).__name__})"


class RequestMiddleware:
    """Pure ASGI middleware around every HTTP request.

    - gives each request an id (the client's X-Request-ID if sane, else a new one), returned as a header;
    - refuses bodies over the limit with 413 before the app reads them (by Content-Length, or while
      reading a chunked body), then replays the body to the app;
    - counts in-flight task requests on the runtime (graceful shutdown waits for them);
    - writes one structured log line and the metrics per request.
    """

    def __init__(self, app, runtime: Runtime):
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client_id = headers.get("x-request-id", "")
        request_id = client_id if _REQUEST_ID.match(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        is_task = _is_task_request(scope)
        if is_task and self.runtime.draining:
            # Refused on arrival; a request that arrived before SIGTERM is in flight and will be answered.
            await error_response(503, "the service is shutting down", "unavailable", {"Retry-After": "5"})(
                scope, receive, send_with_id
            )
            self._account(scope, path, status_holder["status"], time.monotonic() - start, request_id)
            return
        if is_task:
            self.runtime.in_flight += 1
        try:
            body_receive, too_large = await self._read_body(scope, receive, headers)
            if body_receive is None:
                limit = self.runtime.settings.max_body_bytes
                await error_response(
                    413,
                    f"the request body exceeds the limit of {limit} bytes (got {too_large})",
                    "payload_too_large",
                )(scope, receive, send_with_id)
            else:
                await self.app(scope, body_receive, send_with_id)
        except Exception:
            error_log.exception("unhandled error for request %s", request_id)
            if not status_holder["started"]:
                await error_response(500, "internal error; see the server log", "internal_error")(
                    scope, receive, send_with_id
                )
        finally:
            if is_task:
                self.runtime.in_flight -= 1
            self._account(scope, path, status_holder["status"], time.monotonic() - start, request_id)

    async def _read_body(self, scope, receive, headers):
        """Read the whole body (bounded).

        Returns (a receive() that replays it, None), or (None, how much was received) if it is too large:
        the 413 names the value received as well as the limit.
        """
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return receive, None
        limit = self.runtime.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None, f"Content-Length {int(declared)}"
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, f"at least {size} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None

    def _account(self, scope, path: str, status: int, seconds: float, request_id: str) -> None:
        label = _metric_label(scope)
        metrics = self.runtime.metrics
        metrics.requests.labels(label, str(status)).inc()
        if _is_task_request(scope):
            metrics.latency.labels(label).observe(seconds)
        timings = scope.get("state", {}).get("timings")
        record = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
        }
        if timings is not None:
            record.update(
                tokenize_ms=round(timings.tokenize * 1000, 2),
                queue_ms=round(timings.queue * 1000, 2),
                inference_ms=round(timings.inference * 1000, 2),
            )
        client = scope.get("client")
        if client:
            record["client"] = f"{client[0]}:{client[1]}"
        log.info("request", extra={"fields": record})


def create_app(settings: Settings, *, runtime: Runtime | None = None, start_runtime: bool = True) -> FastAPI:
    runtime = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # An app that starts its runtime owns it and stops it; one given a started runtime leaves it alone.
        if start_runtime:
            runtime.start(background=True)
        yield
        if start_runtime:
            runtime.stop()

    app = FastAPI(
        title="albert-serve",
        version="0.1.0",
        summary="ALBERT models over HTTP, any number by name: classification, fill-mask, question answering, "
        "NER.",
        description="Answers as the transformers 4.57 pipelines do. Errors are JSON "
        '`{"error": ..., "error_type": ...}`.',
        lifespan=lifespan,
        # /docs and /redoc are served offline by the pages router, from the service's own copies.
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.include_router(tasks.router)
    app.include_router(tei.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(pages.router)
    app.include_router(oip.router)
    ModelRepository.of(runtime)  # its load/unload counters are on /metrics from the start

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return error_response(exc.status, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        return error_response(422, describe_validation_error(exc, content_type), "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI answers a JSON body it cannot decode for reasons other than a JSON syntax error (invalid
        # UTF-8, nesting deeper than the parser's recursion limit, integers of thousands of digits) with a
        # bare 400 "There was an error parsing the body". The contract says malformed JSON is a 422 that
        # names what is wrong.
        if exc.status_code == 400 and exc.__cause__ is not None:
            return error_response(422, describe_body_error(exc.__cause__), "validation_error")
        kinds = {404: "not_found", 405: "method_not_allowed"}
        message = (
            f"{exc.detail}: {request.method} {request.url.path}"
            if exc.status_code in kinds
            else str(exc.detail)
        )
        return error_response(exc.status_code, message, kinds.get(exc.status_code, "http_error"), exc.headers)

    app.add_middleware(RequestMiddleware, runtime=runtime)
    return app


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware writes one line per request
    # JAX tries every backend it knows at start-up and logs, at info, each one this machine lacks ("Unable to
    # initialize backend 'tpu'"): noise on every start of a CPU or GPU machine. Kept at debug.
    if level.lower() != "debug":
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
