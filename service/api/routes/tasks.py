"""The four task endpoints: decode the request, run it, encode the answer.

The pydantic schemas check shapes and types; this module adds the limits that depend on settings (list
length, top_k, targets) and the text checks, then hands plain task items and parameters to `infer`.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from ...errors import InvalidInput, PayloadTooLarge, ValidationFailed
from ...inference import Timings, infer
from ...settings import Settings
from ...tasks.classify import ClassifyItem, ClassifyParams
from ...tasks.fill_mask import FillMaskParams
from ...tasks.ner import NERParams
from ...tasks.qa import QAItem, QAParams
from ..deps import AuthDep, RuntimeDep
from ..schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    FillMaskRequest,
    FillMaskResponse,
    NERRequest,
    NERResponse,
    QARequest,
    QAResponse,
    TextPair,
)

router = APIRouter(tags=["tasks"])

ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "An API key is configured and the request lacks it or has a wrong one.",
        404: "No model is configured for this endpoint.",
        413: "Body or list larger than the configured limits.",
        422: "Malformed JSON, wrong types, empty text, out-of-range parameters.",
        429: "The queue is full; retry after Retry-After seconds.",
        503: "Not ready yet, or shutting down.",
        504: "The request's deadline passed before it was served.",
    }.items()
}

# C0 controls other than tab, newline and carriage return, DEL, and lone UTF-16 surrogates (which JSON
# escapes can smuggle in, and which cannot be encoded as UTF-8).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")

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


def _check_text(value: str, field: str) -> str:
    if not value.strip():
        raise InvalidInput(f"{field} must not be empty or whitespace-only (got {len(value)} characters)")
    bad = _FORBIDDEN.search(value)
    if bad:
        raise InvalidInput(
            f"{field} contains the control character or invalid code point U+{ord(bad.group()):04X} "
            f"at position {bad.start()}"
        )
    return value


def _as_list(inputs: Any, settings: Settings) -> tuple[list, bool]:
    if not isinstance(inputs, list):
        return [inputs], True
    if not inputs:
        raise InvalidInput("inputs must not be an empty list")
    if len(inputs) > settings.max_list_items:
        raise PayloadTooLarge(f"inputs has {len(inputs)} items; the limit is {settings.max_list_items}")
    return inputs, False


def _where(index: int, single: bool) -> str:
    return "inputs" if single else f"inputs[{index}]"


def _check_top_k(top_k: int | None, settings: Settings, field: str = "parameters.top_k") -> None:
    if top_k is not None and top_k > settings.max_top_k:
        raise ValidationFailed(f"{field} must be at most {settings.max_top_k}, got {top_k}")


async def _serve(
    request: Request,
    runtime,
    endpoint: str,
    items: list,
    params: Any,
    timeout: float | None,
) -> list:
    settings = runtime.settings
    budget = settings.request_timeout_s if timeout is None else min(timeout, settings.request_timeout_s)
    timings = Timings()
    request.state.timings = timings
    answers = await infer(
        runtime,
        endpoint,
        items,
        params,
        deadline=time.monotonic() + budget,
        disconnected=lambda: _disconnected(request),
        timings=timings,
    )
    return answers


def _respond(answers: list, single: bool, request: Request) -> JSONResponse:
    # The tasks already build plain JSON-ready answers in the documented shapes (the fuzz and parity tests
    # check them against the schema), so they are returned as they are: FastAPI's re-validation through the
    # response model's unions cost a noticeable part of a short request's time.
    return JSONResponse(answers[0] if single else answers, headers=request.state.timings.headers())


async def _disconnected(request: Request) -> None:
    """Completes when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    summary="Text classification (sentence or sentence pair), as the text-classification pipeline.",
)
async def classify(
    body: ClassifyRequest,
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    timeout: TimeoutHeader = None,
):
    settings = runtime.settings
    inputs, single = _as_list(body.inputs, settings)
    items = []
    for i, value in enumerate(inputs):
        where = _where(i, single)
        if isinstance(value, TextPair):
            pair = None if value.text_pair is None else _check_text(value.text_pair, f"{where}.text_pair")
            items.append(ClassifyItem(_check_text(value.text, f"{where}.text"), pair))
        else:
            items.append(ClassifyItem(_check_text(value, where)))
    _check_top_k(body.parameters.top_k, settings)
    params = ClassifyParams(top_k=body.parameters.top_k, function_to_apply=body.parameters.function_to_apply)
    answers = await _serve(request, runtime, "classify", items, params, timeout)
    return _respond(answers, single, request)


@router.post(
    "/fill-mask",
    response_model=FillMaskResponse,
    responses=ERRORS,
    summary="Masked-token prediction, as the fill-mask pipeline (one list per mask with several masks).",
)
async def fill_mask(
    body: FillMaskRequest,
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    timeout: TimeoutHeader = None,
):
    settings = runtime.settings
    inputs, single = _as_list(body.inputs, settings)
    items = [_check_text(text, _where(i, single)) for i, text in enumerate(inputs)]
    _check_top_k(body.parameters.top_k, settings)
    targets = body.parameters.targets
    if isinstance(targets, str):
        targets = [targets]
    if targets is not None:
        if len(targets) > settings.max_targets:
            raise ValidationFailed(
                f"parameters.targets has {len(targets)} items; the limit is {settings.max_targets}"
            )
        for i, target in enumerate(targets):
            _check_text(target, f"parameters.targets[{i}]")
    params = FillMaskParams(top_k=body.parameters.top_k, targets=None if targets is None else tuple(targets))
    answers = await _serve(request, runtime, "fill-mask", items, params, timeout)
    return _respond(answers, single, request)


@router.post(
    "/qa",
    response_model=QAResponse,
    responses=ERRORS,
    summary="Extractive question answering over contexts of any length, as the question-answering pipeline.",
)
async def qa(
    body: QARequest,
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    timeout: TimeoutHeader = None,
):
    settings = runtime.settings
    inputs, single = _as_list(body.inputs, settings)
    items = []
    for i, value in enumerate(inputs):
        where = _where(i, single)
        items.append(
            QAItem(
                _check_text(value.question, f"{where}.question"),
                _check_text(value.context, f"{where}.context"),
            )
        )
    p = body.parameters
    _check_top_k(p.top_k, settings)
    params = QAParams(
        top_k=p.top_k,
        doc_stride=p.doc_stride,
        max_answer_len=p.max_answer_len,
        max_seq_len=p.max_seq_len,
        max_question_len=p.max_question_len,
        handle_impossible_answer=p.handle_impossible_answer,
        align_to_words=p.align_to_words,
    )
    answers = await _serve(request, runtime, "qa", items, params, timeout)
    return _respond(answers, single, request)


@router.post(
    "/ner",
    response_model=NERResponse,
    responses=ERRORS,
    summary="Named-entity recognition (token classification), as the token-classification pipeline.",
)
async def ner(
    body: NERRequest,
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    timeout: TimeoutHeader = None,
):
    settings = runtime.settings
    inputs, single = _as_list(body.inputs, settings)
    items = [_check_text(text, _where(i, single)) for i, text in enumerate(inputs)]
    p = body.parameters
    params = NERParams(
        aggregation_strategy=p.aggregation_strategy,
        ignore_labels=("O",) if p.ignore_labels is None else tuple(p.ignore_labels),
        stride=p.stride,
    )
    answers = await _serve(request, runtime, "ner", items, params, timeout)
    return _respond(answers, single, request)
