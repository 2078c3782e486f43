"""text-embeddings-inference's face: the TEI routes the task registry does not declare, in one file.

TEI's `/embed`, `/rerank`, `/similarity` and `/v1/embeddings` are task endpoints (service/tasks/); this
module translates the rest of TEI's OpenAPI document (docs/openapi.json in huggingface/
text-embeddings-inference) onto the same runtime, tasks and batcher:

    POST /predict     a classifier's labels, every one best first (TEI's softmax, sigmoid for one label,
                      or raw logits): the classify task with the function TEI picks
    POST /embed_all   per-token last hidden states (tasks/embed/tokens.py) of an embedding model
    POST /tokenize    the model's tokenizer: ids, the caller's substrings, special flags, offsets
    POST /decode      ids back to text
    GET /info         TEI's Info fields (`tei_info`), merged into this service's own /info

Errors on these routes have TEI's body and, for the statuses TEI documents, its kinds: `{"error",
"error_type"}` with error_type Validation, Empty, Overloaded, Unhealthy or Backend (service/api/tei_errors.py).
The status codes stay this service's; a too-long input with truncate false is a 413 `Validation`, as TEI's
(whose `Validation` kind is a 413)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.concurrency import run_in_threadpool

from .api.deps import AuthDep, RuntimeDep
from .api.routes.tasks import TimeoutHeader, answer
from .api.schemas import ErrorBody
from .api.tei_errors import TEIRoute
from .errors import DeadlineExceeded, EndpointDisabled, InvalidInput, ServiceError
from .hardware import resolve_dtype
from .runtime import Runtime, ServedModel
from .tasks.base import (
    Decoded,
    Endpoint,
    TruncationDirection,
    as_list,
    check_client_batch,
    check_text,
    model_field,
    truncate_or_default,
    where,
)
from .tasks.classify import ClassifyItem, ClassifyParams
from .tasks.embed import EmbedParams
from .tasks.embed.tokens import token_embeddings_for

VERSION = "0.1.0"
PATHS = ("/predict", "/embed_all", "/tokenize", "/decode")


# --- errors in TEI's kinds -----------------------------------------------------------------------------------


class EmptyBatch(ServiceError):
    """TEI's `Empty`: a batch with nothing in it (400)."""

    error_type = "Empty"
    status = 400


router = APIRouter(tags=["text-embeddings-inference"], route_class=TEIRoute)

ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Empty: an empty batch.",
        401: "An API key is configured and the request lacks it or has a wrong one.",
        404: "No model serves the route's task, or none has the name the request gives.",
        413: "An input over the model's length with truncate false, or a list over max_list_items.",
        422: "Validation: a malformed body, a batch over --max-client-batch-size, a pair of three strings, an "
        "unknown prompt_name, ids outside the vocabulary, a model of another task.",
        429: "Overloaded: the queue is full.",
        503: "Unhealthy: the model is not ready.",
        504: "The request's deadline passed before it was served (deadline_exceeded).",
    }.items()
}


def _batch(values: list, settings, field: str) -> list:
    """TEI's batch checks: an empty batch is `Empty`, one over --max-client-batch-size is `Validation`."""
    if not values:
        raise EmptyBatch(f"`{field}` cannot be empty")
    check_client_batch(len(values), settings, field)
    as_list(values, settings.max_list_items, field)
    return values


def _tokenizer_model(runtime: Runtime, name: str | None) -> ServedModel:
    """The model whose tokenizer /tokenize and /decode use: the named one, else the default embedding
    model, else the default classifier or reranker, else the only model."""
    if name is not None:
        return runtime.usable(runtime.named(name))
    for task in ("embed", "classify", "rerank"):
        try:
            return runtime.model_for(task, None)
        except ServiceError:
            continue
    ready = [m for m in runtime.models.values() if m.state == "ready"]
    if len(ready) == 1:
        return ready[0]
    return runtime.model_for("embed", None)  # raises the reason


# --- POST /predict ---------------------------------------------------------------------------------------------


class PredictRequest(BaseModel):
    """TEI's PredictRequest: a string, a pair [a, b], or a batch of [a] and [a, b]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "I like you."},
                {"inputs": ["A man plays a guitar.", "Someone makes music."]},
                {"inputs": [["I like you."], ["A man plays.", "Someone makes music."]], "raw_scores": True},
            ]
        },
    )
    inputs: str | list[str] | list[list[str]] = Field(
        description="A string, a pair of strings, or a batch of single strings and pairs ([[a], [a, b]])."
    )
    raw_scores: StrictBool = Field(False, description="The logits, not softmax (sigmoid for one label).")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the model's length; false: a 413; default: --auto-truncate."
    )
    truncation_direction: TruncationDirection = Field(
        "right", description="Accepted for TEI's clients; the classifier cuts the longest text's end."
    )
    model: str | None = model_field()


def _sequence(value: list[str], at: str) -> ClassifyItem:
    if len(value) not in (1, 2):
        raise InvalidInput(
            f"{at}: a sequence is one string or a pair of two strings, got {len(value)} strings"
        )
    texts = [check_text(text, f"{at}[{i}]") for i, text in enumerate(value)]
    return ClassifyItem(texts[0], texts[1] if len(texts) == 2 else None)


def decode_predict(body: PredictRequest, settings, num_labels: int) -> Decoded:
    inputs = body.inputs
    if isinstance(inputs, str):
        items, single = [ClassifyItem(check_text(inputs, "inputs"))], True
    elif not inputs:
        raise EmptyBatch("`inputs` cannot be empty")
    elif isinstance(inputs[0], str):  # one string or one pair, as TEI reads a flat list
        items, single = [_sequence(inputs, "inputs")], True
    else:
        _batch(inputs, settings, "inputs")
        items, single = [_sequence(value, f"inputs[{i}]") for i, value in enumerate(inputs)], False
    # TEI's scores: the logits, or a sigmoid for a single-label model, else a softmax (whatever the config's
    # problem_type says, unlike the text-classification pipeline).
    function = "none" if body.raw_scores else ("sigmoid" if num_labels == 1 else "softmax")
    params = ClassifyParams(
        top_k=None, function_to_apply=function, truncate=truncate_or_default(body.truncate, settings)
    )
    return Decoded(items, params, single)


Prediction = dict[str, Any]


@router.post(
    "/predict",
    summary="TEI's /predict: a sequence classifier's labels for a string, a pair or a batch, best first.",
    response_model=list[Prediction] | list[list[Prediction]],
    responses=ERRORS,
)
async def predict(
    body: PredictRequest, request: Request, runtime: RuntimeDep, _: AuthDep, timeout: TimeoutHeader = None
):
    served = runtime.model_for("classify", body.model)
    labels = runtime.tasks[served.name].labels
    endpoint = Endpoint(
        path="/predict",
        summary="",
        request=PredictRequest,
        response=None,
        decode=lambda b, settings: decode_predict(b, settings, len(labels)),
    )
    return await answer(request, runtime, served, endpoint, body, timeout)


# --- POST /embed_all -------------------------------------------------------------------------------------------


class EmbedAllRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": "What is Deep Learning?"}]}
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.")
    truncate: StrictBool | None = Field(
        None, description="Cut inputs over the model's length; false: a 413; default: --auto-truncate."
    )
    truncation_direction: TruncationDirection = Field("right", description="Which end to cut.")
    prompt_name: str | None = Field(
        None, description="A prompt of the model to prepend (default: the model's default prompt, if any)."
    )
    model: str | None = model_field()


@router.post(
    "/embed_all",
    summary="TEI's /embed_all: every token's last hidden state (sentence-transformers' token_embeddings).",
    response_model=list[list[list[float]]],
    responses=ERRORS,
)
async def embed_all(
    body: EmbedAllRequest, request: Request, runtime: RuntimeDep, _: AuthDep, timeout: TimeoutHeader = None
):
    settings = runtime.settings
    texts = [body.inputs] if isinstance(body.inputs, str) else _batch(body.inputs, settings, "inputs")
    texts = [check_text(t, where(i, isinstance(body.inputs, str))) for i, t in enumerate(texts)]
    served = runtime.model_for("embed", body.model)
    task = runtime.tasks[served.name]
    params = EmbedParams(
        normalize=False,
        truncate=truncate_or_default(body.truncate, settings),
        truncation_direction=body.truncation_direction.lower(),
        prompt_name=body.prompt_name,
    )
    budget = settings.request_timeout_s if timeout is None else min(timeout, settings.request_timeout_s)
    deadline = time.monotonic() + budget
    prepared = await run_in_threadpool(task.prepare, texts, params)
    program = token_embeddings_for(served.runner)
    states = await run_in_threadpool(program.run, prepared.model_inputs)
    if time.monotonic() > deadline:
        raise DeadlineExceeded("the request's deadline passed before it was served")
    content = [[[float(x) for x in row] for row in state] for state in states]
    return JSONResponse(content, headers={"X-Model": served.name})


# --- POST /tokenize and /decode --------------------------------------------------------------------------------


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": "test", "add_special_tokens": True}]}
    )
    inputs: str | list[str] = Field(description="A text or a list of texts.")
    add_special_tokens: StrictBool = Field(True, description="Add the model's special tokens ([CLS], [SEP]).")
    prompt_name: str | None = Field(
        None, description="A prompt of the model (sentence-transformers' prompts) to prepend; default none."
    )
    model: str | None = model_field()


def tokenize_text(tokenizer, text: str, add_special_tokens: bool) -> list[dict]:
    """TEI's SimpleToken list: a special token has its own text and no offsets; any other token's text is the
    caller's text between `start` and `stop`, which count UTF-8 bytes as TEI's do (its Rust tokenizer's
    offsets), not characters."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
    byte_at = [0]  # byte_at[i]: where character i starts in the UTF-8 encoding
    for character in text:
        byte_at.append(byte_at[-1] + len(character.encode("utf-8", "surrogatepass")))
    tokens = []
    for token_id, token, (start, stop), special in zip(
        encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        if special:
            tokens.append({"id": token_id, "text": token, "special": True, "start": None, "stop": None})
        else:
            tokens.append(
                {
                    "id": token_id,
                    "text": text[start:stop],
                    "special": False,
                    "start": byte_at[start],
                    "stop": byte_at[stop],
                }
            )
    return tokens


def _prompt(runtime: Runtime, served: ServedModel, prompt_name: str | None) -> str:
    if prompt_name is None:
        return ""  # TEI's /tokenize applies no prompt unless asked
    config = getattr(runtime.tasks[served.name], "config", None)
    prompts = getattr(config, "prompts", None) or {}
    if prompt_name not in prompts:
        known = ", ".join(repr(n) for n in prompts) or "none"
        raise InvalidInput(f"prompt_name {prompt_name!r} is not one of the model's prompts ({known})")
    return prompts[prompt_name]


@router.post(
    "/tokenize",
    summary="TEI's /tokenize: the model's tokens for each text, with ids, special flags and offsets.",
    response_model=list[list[dict[str, Any]]],
    responses=ERRORS,
)
async def tokenize(body: TokenizeRequest, runtime: RuntimeDep, _: AuthDep):
    settings = runtime.settings
    single = isinstance(body.inputs, str)
    texts = [body.inputs] if single else _batch(body.inputs, settings, "inputs")
    served = _tokenizer_model(runtime, body.model)
    prompt = _prompt(runtime, served, body.prompt_name)
    tokenizer = runtime.tasks[served.name].tokenizer
    answers = [tokenize_text(tokenizer, prompt + text, body.add_special_tokens) for text in texts]
    return JSONResponse(answers, headers={"X-Model": served.name})


class DecodeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"ids": [2, 13, 3], "skip_special_tokens": True}]}
    )
    ids: list[StrictInt] | list[list[StrictInt]] = Field(description="One list of token ids, or several.")
    skip_special_tokens: StrictBool = Field(True, description="Leave the special tokens out of the text.")
    model: str | None = model_field()


@router.post(
    "/decode",
    summary="TEI's /decode: token ids back to text, one string per id list.",
    response_model=list[str],
    responses=ERRORS,
)
async def decode(body: DecodeRequest, runtime: RuntimeDep, _: AuthDep):
    settings = runtime.settings
    if not body.ids:
        raise EmptyBatch("`ids` cannot be empty")
    batch = isinstance(body.ids[0], list)
    lists = _batch(body.ids, settings, "ids") if batch else [body.ids]
    served = _tokenizer_model(runtime, body.model)
    tokenizer = runtime.tasks[served.name].tokenizer
    vocab = tokenizer.vocab_size
    for i, ids in enumerate(lists):
        for token in ids:
            if not 0 <= token < vocab:
                at = f"ids[{i}]" if batch else "ids"
                raise InvalidInput(f"{at}: token id {token} is not in the vocabulary (0 to {vocab - 1})")
    texts = [tokenizer.backend.decode(ids, skip_special_tokens=body.skip_special_tokens) for ids in lists]
    return JSONResponse(texts, headers={"X-Model": served.name})


# --- POST /: TEI's route for its one model ---------------------------------------------------------------------


@router.post(
    "/",
    include_in_schema=False,  # "/" is the playground's page in the API docs' eyes; the README lists this route
    summary="TEI's root route (what InferenceClient(model=base_url) posts to): the default model of /info "
    "answers in its task's Inference API shape, as POST /models/{name}.",
    responses=ERRORS,
)
async def root(
    request: Request,
    runtime: RuntimeDep,
    _: AuthDep,
    payload: Any = Body(..., description="The body for the model's task, as for its endpoint."),  # noqa: B008
    timeout: TimeoutHeader = None,
):
    from .api.routes.models import run_model

    served = _info_model(runtime)
    if served is None:
        raise EndpointDisabled("no model is configured")
    return await run_model(served.name, request, runtime, None, payload, timeout)


# --- GET /info: TEI's Info fields ------------------------------------------------------------------------------


def _info_model(runtime: Runtime) -> ServedModel | None:
    for task in ("embed", "classify", "rerank", "sparse-embed"):
        try:
            return runtime._default_model(task)
        except ServiceError:
            continue
    return next(iter(runtime.models.values()), None)


def tei_info(runtime: Runtime) -> dict:
    """TEI's `Info` for the model its routes answer with by default (embedding, else classifier, else
    reranker, else SPLADE), added beside this service's own /info fields."""
    settings = runtime.settings
    served = _info_model(runtime)
    info: dict[str, Any] = {
        "model_id": served.spec.source if served else "",
        "model_sha": None,
        "model_dtype": served.spec.dtype if served else resolve_dtype(settings.dtype),
        "served_model_name": served.name if served else "",
        "model_type": {"embedding": {"pooling": "mean"}},
        "max_concurrent_requests": settings.max_queue_sequences,
        "max_input_length": 0,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": settings.max_client_batch_size,
        "auto_truncate": settings.auto_truncate,
        "tokenization_workers": 1,
        "version": VERSION,
        "sha": None,
        "docker_label": None,
    }
    if served is None:
        return info
    task = runtime.tasks.get(served.name)
    if task is not None:
        info["max_input_length"] = int(
            getattr(task, "max_length", None) or getattr(task, "model_max_length", 0)
        )
    labels = served.labels or []
    if served.task == "embed" and task is not None:
        info["model_type"] = {"embedding": {"pooling": "+".join(task.config.pooling_modes)}}
    elif served.task == "sparse-embed":
        info["model_type"] = {"embedding": {"pooling": "splade"}}
    elif served.task in ("classify", "rerank"):
        kind = "classifier" if served.task == "classify" else "reranker"
        info["model_type"] = {
            kind: {
                "id2label": {str(i): label for i, label in enumerate(labels)},
                "label2id": {label: i for i, label in enumerate(labels)},
            }
        }
    return info
