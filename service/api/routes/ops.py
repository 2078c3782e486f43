"""Operations endpoints: liveness, readiness, model information, metrics. Never behind API keys."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...runtime import STATES
from ..deps import RuntimeDep
from ..schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="Liveness: 200 while the process is alive.")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: 503 until every model is ready (with strict_readiness=false: every model that did not "
    "fail), and while shutting down.",
    responses={503: {"model": Readiness, "description": "Not ready; the body says what is pending."}},
)
async def ready(runtime: RuntimeDep):
    body = runtime.readiness()
    return JSONResponse(body, status_code=200 if runtime.ready else 503)


@router.get(
    "/info",
    summary="Per model: task, source, state, architecture, labels, dtype, devices, buckets; the hardware.",
)
async def info(runtime: RuntimeDep) -> dict:
    from ... import hardware, tei  # TEI's Info fields beside this service's own (tei imports the api package)

    return {**runtime.info(), "hardware": hardware.describe(), **tei.tei_info(runtime)}


@router.get(
    "/metrics",
    summary="Prometheus metrics.",
    response_class=Response,
    # Documented, so that the OpenAPI schema names the content type the endpoint really answers with.
    responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    metrics = runtime.metrics
    metrics.queue_depth.set(runtime.batcher.queued_sequences if runtime.batcher else 0)
    metrics.ready.set(1 if runtime.ready else 0)
    for name, served in runtime.models.items():
        for state in STATES:
            metrics.model_state.labels(name, served.task or "", state).set(1 if served.state == state else 0)
        metrics.model_programs.labels(name, "total").set(served.total)
        metrics.model_programs.labels(name, "compiled").set(served.compiled)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
