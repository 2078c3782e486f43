"""Models by name: the list and states (`GET /models`, `GET /models/{name}`), and `POST /models/{name}` in the
Hugging Face Inference API's request and answer shapes for the model's task."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ...errors import InvalidInput
from ...tasks import TASKS
from ..deps import AuthDep, RuntimeDep
from .tasks import ERRORS, TimeoutHeader, answer

router = APIRouter(tags=["models"])


@router.get("/models", summary="Every configured model: task, endpoint, source, default flag and state.")
async def list_models(runtime: RuntimeDep) -> dict:
    return {"models": [m.describe() for m in runtime.models.values()]}


@router.get(
    "/models/{name}",
    summary="One model; 200 when it is ready, 503 while loading or compiling or after a failure.",
    responses={404: ERRORS[404]},
)
async def get_model(name: str, runtime: RuntimeDep):
    served = runtime.named(name)
    return JSONResponse(served.describe(), status_code=200 if served.state == "ready" else 503)


@router.post(
    "/models/{name}",
    responses=ERRORS,
    summary="Run a model by name, with the Hugging Face Inference API's request and answer for its task "
    "(what huggingface_hub.InferenceClient(model=f'{base}/models/{name}') sends and reads).",
)
async def run_model(
    name: str,
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    payload: Any = Body(  # noqa: B008 - FastAPI's way to declare a body
        ..., description="The task's body, as for its endpoint (see GET /models for the task)."
    ),
    timeout: TimeoutHeader = None,
):
    served = runtime.usable(runtime.named(name))
    if not isinstance(payload, dict):
        raise InvalidInput(f"the body must be a JSON object with 'inputs' (got {type(payload).__name__})")
    endpoint = TASKS[served.task].endpoint_for_hub(payload)
    try:
        # The path names the model; a "model" field in the body cannot send it elsewhere.
        body = endpoint.request.model_validate({**payload, "model": name})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=json.dumps(payload)[:200]) from None
    return await answer(request, runtime, served, endpoint, body, timeout, hub=True)
