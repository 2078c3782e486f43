"""The task endpoints, generated from the task registry: decode the request, run it, encode the answer.

Each task module declares its endpoints (path, request schema, decoding); this module only adds what every
task route shares: the model the request names, the deadline, the client's disconnection, the timing
headers. (No `from __future__ import annotations` here: the generated routes' annotations must be the
schema classes themselves, for FastAPI to read them.)
"""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ...inference import Timings, infer
from ...runtime import Runtime, ServedModel
from ...tasks import endpoints
from ...tasks.base import Decoded, Endpoint, ModelTask
from ..deps import AuthDep, RuntimeDep
from ..schemas import ErrorBody
from ..tei_errors import TEI_TASK_PATHS, TEIRoute

router = APIRouter(tags=["tasks"])

ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "An API key is configured and the request lacks it or has a wrong one.",
        404: "No model serves this task, or no model has the name the request gives.",
        413: "Body or list larger than the configured limits.",
        422: "Malformed JSON, wrong types, empty text, out-of-range parameters, a model of another task.",
        429: "The queue is full; retry after Retry-After seconds.",
        503: "Not ready yet (with Retry-After), the model failed to load (error_type model_unavailable), or "
        "shutting down.",
        504: "The request's deadline passed before it was served.",
    }.items()
}

# Typed `float` (not `float | None`) although it is optional: a header cannot be null, and `float | None`
# documented it as nullable in the OpenAPI schema (the fuzzer sent "null" and got a 422).
TimeoutHeader = Annotated[
    float,
    Header(
        alias="X-Request-Timeout",
        gt=0,
        description="Deadline for this request in seconds (at most the server's default); 504 past it.",
    ),
]


async def answer(
    request: Request,
    runtime: Runtime,
    served: ServedModel,
    endpoint: Endpoint,
    body: Any,
    timeout: float | None,
    *,
    hub: bool = False,
) -> JSONResponse:
    """`served`'s answer to `body` (already validated against `endpoint.request`)."""
    settings = runtime.settings
    decoded: Decoded = endpoint.decode(body, settings)
    budget = settings.request_timeout_s if timeout is None else min(timeout, settings.request_timeout_s)
    timings = Timings()
    request.state.timings = timings
    answers, extras = await infer(
        runtime,
        served,
        decoded.items,
        decoded.params,
        deadline=time.monotonic() + budget,
        disconnected=lambda: _disconnected(request),
        timings=timings,
    )
    if hub and endpoint.hub_answer is not None:
        content = endpoint.hub_answer(answers, decoded)
    elif endpoint.encode is not None:
        content = endpoint.encode(answers, decoded, extras, served.name)
    else:
        content = answers[0] if decoded.single else answers
    # The tasks already build plain JSON-ready answers in the documented shapes (the fuzz and parity tests
    # check them against the schema), so they are returned as they are: FastAPI's re-validation through the
    # response model's unions cost a noticeable part of a short request's time.
    headers = {**timings.headers(), "X-Model": served.name}
    return JSONResponse(content, headers=headers)


async def _disconnected(request: Request) -> None:
    """Completes when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _route(task: ModelTask, endpoint: Endpoint):
    request_model = endpoint.request

    async def route(
        body: request_model,
        request: Request,
        runtime: RuntimeDep,
        _: AuthDep,
        timeout: TimeoutHeader = None,
    ):
        served = runtime.model_for(task.name, body.model)
        return await answer(request, runtime, served, endpoint, body, timeout)

    route.__name__ = endpoint.path.strip("/").replace("-", "_").replace("/", "_")
    return route


for _task, _endpoint in endpoints():
    router.add_api_route(
        _endpoint.path,
        _route(_task, _endpoint),
        methods=["POST"],
        response_model=_endpoint.response,
        responses=ERRORS,
        summary=_endpoint.summary,
        # A route only TEI has answers its errors in TEI's kinds, as the routes of service/tei.py.
        route_class_override=TEIRoute if _endpoint.path in TEI_TASK_PATHS else APIRoute,
    )
