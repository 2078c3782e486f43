"""The Open Inference Protocol v2 (KServe's v2 REST protocol, which Triton also serves): a thin translation
onto the task registry and `infer`, the same path the task routes take.

Inputs: `text` (BYTES [n]); a classifier also takes `text_pair`. Each `text` element is one input of the
model's task endpoint (for `qa`, the JSON object {"question", "context"}). The request's `parameters`, other
than the protocol's own, are the endpoint's: a field of its body (`normalize`, `truncate` for embed) or its
`parameters` (`top_k`, `aggregation_strategy`, `candidate_labels`...). Outputs: embed -> `embedding`
(FP32 [n, dim]); classify -> `scores` (FP32 [n, labels], label-id order) and `label` (BYTES [n]); any other
task -> `answer` (BYTES [n], the endpoint's JSON answer for each input). For `rerank` each `text` element
is a whole /rerank body's JSON ({"query", "texts"}), and its `answer` that body's ranking.

Binary tensor extension: requests may carry any input as raw bytes after the JSON part (the length of the
JSON part in `Inference-Header-Content-Length`; a BYTES element is a 4-byte little-endian length and its
bytes). Outputs are answered in binary when an output asks `"binary_data": true` or the request asks
`"binary_data_output": true` (what tritonclient sends when it names no outputs); JSON otherwise.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..errors import ModelNotFound, PayloadTooLarge, ServiceError
from ..inference import Timings, infer
from ..repository import ModelRepository
from ..runtime import Runtime, ServedModel
from ..tasks import TASKS
from ..tasks.base import Decoded
from .deps import AuthDep, RuntimeDep
from .schemas import ErrorBody

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

VERSION = "1"  # every model has one version
# Request parameters that belong to the protocol (or to Triton's clients), not to the task endpoint.
PROTOCOL_PARAMETERS = {
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
}
# Tasks whose endpoint input is an object: each `text` element is its JSON.
OBJECT_INPUTS = {"qa"}
# Tasks whose endpoint takes one input per request: each `text` element is a whole body's JSON ({"query",
# "texts"} for rerank), decoded as the endpoint decodes it; the request's parameters apply to every element.
BODY_INPUTS = {"rerank": ("query", "texts")}


def _errors(*statuses: int) -> dict:
    descriptions = {
        400: "Unknown input or output, wrong datatype or shape, BYTES that are not UTF-8, bad parameters.",
        401: "An API key is configured and the request lacks it or has a wrong one.",
        404: "No model of that name, or no such version (every model has version 1).",
        413: "More elements than max_list_items, or a body over max_body_bytes.",
        429: "The queue is full; retry after Retry-After seconds.",
        503: "The model is not ready (loading, compiling, failed) or the service is shutting down.",
        504: "The request's deadline passed before it was served.",
    }
    return {status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses}


INFER_RESPONSES = {
    200: {
        "description": "The output tensors: JSON, or with binary outputs the JSON part (its length in "
        "Inference-Header-Content-Length) followed by the raw tensors.",
        "content": {"application/json": {}, "application/octet-stream": {}},
    },
    **_errors(400, 401, 404, 413, 429, 503, 504),
}


class ProtocolError(ServiceError):
    """A request the protocol layer refuses: unknown input, wrong datatype or shape, undecodable tensor."""

    error_type = "invalid_request"
    status = 400


# --- What a model takes and answers ---------------------------------------------------------------------


def _inputs_of(task: str) -> list[dict]:
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    if task == "classify":
        inputs.append({"name": "text_pair", "datatype": "BYTES", "shape": [-1], "optional": True})
    return inputs


def _outputs_of(runtime: Runtime, served: ServedModel) -> list[dict]:
    if served.task == "embed":
        handler = runtime.tasks.get(served.name)
        dimension = getattr(handler, "dimension", None) or -1
        return [{"name": "embedding", "datatype": "FP32", "shape": [-1, dimension]}]
    if served.task == "classify":
        labels = len(served.labels) if served.labels else -1
        return [
            {"name": "scores", "datatype": "FP32", "shape": [-1, labels]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ]
    return [{"name": "answer", "datatype": "BYTES", "shape": [-1]}]


def _check_version(name: str, version: str | None) -> None:
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")


# --- Server and model metadata, health ------------------------------------------------------------------


@router.get("", summary="Server metadata: name, version, extensions.")
async def server_metadata() -> dict:
    return {
        "name": "albert-serve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_repository"],
    }


@router.get("/health/live", summary="200 while the process is alive.")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="200 when the service is ready (as /ready), 503 otherwise.",
    responses={503: {"description": 'Not ready: {"ready": false}.'}},
)
async def server_ready(runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"ready": runtime.ready}, status_code=200 if runtime.ready else 503)


async def _metadata(runtime: Runtime, name: str, version: str | None) -> dict:
    _check_version(name, version)
    served = runtime.named(name)
    return {
        "name": served.name,
        "versions": [VERSION],
        "platform": f"albert-serve/{served.task or 'unknown'}",
        "inputs": _inputs_of(served.task) if served.task else [],
        "outputs": _outputs_of(runtime, served) if served.task else [],
    }


@router.get("/models/{name}", summary="Model metadata: its inputs and outputs.", responses=_errors(404))
async def model_metadata(name: str, runtime: RuntimeDep) -> dict:
    return await _metadata(runtime, name, None)


@router.get(
    "/models/{name}/versions/{version}", summary="Model metadata of one version.", responses=_errors(404)
)
async def model_version_metadata(name: str, version: str, runtime: RuntimeDep) -> dict:
    return await _metadata(runtime, name, version)


def _model_ready(runtime: Runtime, name: str, version: str | None) -> JSONResponse:
    _check_version(name, version)
    ready = runtime.named(name).state == "ready"
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


READY_RESPONSES = {503: {"description": 'The model is not ready: {"name", "ready": false}.'}, **_errors(404)}


@router.get(
    "/models/{name}/ready", summary="200 when the model is ready, 503 otherwise.", responses=READY_RESPONSES
)
async def model_ready(name: str, runtime: RuntimeDep) -> JSONResponse:
    return _model_ready(runtime, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="200 when the model is ready, 503 otherwise.",
    responses=READY_RESPONSES,
)
async def model_version_ready(name: str, version: str, runtime: RuntimeDep) -> JSONResponse:
    return _model_ready(runtime, name, version)


# --- Inference ---------------------------------------------------------------------------------------------


def _split_body(raw: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part of a request and the binary part after it (the binary tensor extension)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise ProtocolError(
                f"Inference-Header-Content-Length is {header_length!r}; it must be the length of the JSON "
                f"part, at most the body's {len(raw)} bytes"
            )
        json_part, binary = raw[: int(header_length)], raw[int(header_length) :]
    else:
        json_part, binary = raw, b""
    try:
        body = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the request's JSON part is not valid JSON ({exc})") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise ProtocolError("the request must be a JSON object with a non-empty 'inputs' list of tensors")
    return body, binary


def _flatten(data: Any) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _bytes_elements(name: str, blob: bytes) -> list[bytes]:
    """A BYTES tensor's elements from its binary form: each a 4-byte little-endian length and the bytes."""
    elements, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError(f"input {name!r}: binary BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(
                f"input {name!r}: a BYTES element declares {length} bytes but only {len(blob) - offset} remain"
            )
        elements.append(blob[offset : offset + length])
        offset += length
    return elements


def _read_tensors(body: dict, binary: bytes, allowed: list[str], max_items: int) -> dict[str, list[str]]:
    """Each input tensor's texts, checked: known name, BYTES, shape [n] (or [n, 1]), UTF-8."""
    tensors: dict[str, list[str]] = {}
    offset = 0
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict):
            raise ProtocolError("each entry of 'inputs' must be an object with name, datatype, shape, data")
        name = tensor.get("name")
        if name not in allowed:
            raise ProtocolError(f"unknown input {name!r}; this model takes {', '.join(allowed)}")
        if name in tensors:
            raise ProtocolError(f"input {name!r} is given twice")
        if tensor.get("datatype") != "BYTES":
            raise ProtocolError(f"input {name!r} must have datatype BYTES, got {tensor.get('datatype')!r}")
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
        ):
            raise ProtocolError(f"input {name!r} must have shape [n] (or [n, 1]), got {shape!r}")
        count = shape[0]
        if count == 0:
            raise ProtocolError(f"input {name!r} has no elements (shape {shape})")
        if count > max_items:
            raise PayloadTooLarge(
                f"input {name!r} has {count} elements; the limit is {max_items} (max_list_items)"
            )
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} binary "
                    "bytes left in the body"
                )
            raw = _bytes_elements(name, binary[offset : offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            raw = _flatten(tensor["data"])
            if not all(isinstance(x, str) for x in raw):
                raise ProtocolError(
                    f"input {name!r}: every element of a BYTES tensor's JSON data must be a string"
                )
        if len(raw) != count:
            raise ProtocolError(f"input {name!r} has shape {shape} but {len(raw)} elements")
        texts = []
        for index, element in enumerate(raw):
            if isinstance(element, bytes):
                try:
                    element = element.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ProtocolError(
                        f"input {name!r} element {index} is not valid UTF-8: byte 0x{element[exc.start]:02x} at "
                        f"offset {exc.start}"
                    ) from None
            texts.append(element)
        tensors[name] = texts
    if "text" not in tensors:
        raise ProtocolError("the input 'text' is required")
    if "text_pair" in tensors and len(tensors["text_pair"]) != len(tensors["text"]):
        raise ProtocolError(
            f"text_pair has {len(tensors['text_pair'])} elements but text has {len(tensors['text'])}"
        )
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} binary bytes after the tensors belong to no input")
    return tensors


def _endpoint_body(task: str, endpoint, tensors: dict[str, list[str]], parameters: dict, name: str) -> dict:
    """The task endpoint's request body for these tensors."""
    texts = tensors["text"]
    if task == "classify":
        if "top_k" in parameters:
            raise ProtocolError("parameter top_k is not taken here: 'scores' holds every label's score")
        pairs = tensors.get("text_pair")
        items: list = [
            {"text": t} if pairs is None else {"text": t, "text_pair": p}
            for t, p in zip(texts, pairs or texts, strict=True)
        ]
    elif task in OBJECT_INPUTS:
        items = []
        for index, text in enumerate(texts):
            try:
                items.append(json.loads(text))
            except ValueError:
                raise ProtocolError(
                    f"text element {index}: a {task} model takes each element as its endpoint's JSON input "
                    '(e.g. {"question": ..., "context": ...})'
                ) from None
    else:
        items = list(texts)
    body: dict = {"inputs": items, "model": name}
    fields = endpoint.request.model_fields
    own = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    task_parameters = {k: v for k, v in own.items() if k not in fields}
    body.update({k: v for k, v in own.items() if k in fields and k not in ("inputs", "model", "parameters")})
    if task_parameters:
        body["parameters"] = task_parameters
    return body


def _validated(endpoint, body: dict):
    try:
        return endpoint.request.model_validate(body)
    except ValidationError as exc:
        raise ProtocolError(
            f"the inputs or parameters do not suit {endpoint.path}: {_describe(exc)}"
        ) from None


def _decode(
    task: str, endpoint, tensors: dict[str, list[str]], parameters: dict, name: str, settings
) -> Decoded:
    """The request as the task endpoint decodes it: its items (one per `text` element) and parameters."""
    if task not in BODY_INPUTS:
        return endpoint.decode(
            _validated(endpoint, _endpoint_body(task, endpoint, tensors, parameters, name)), settings
        )
    keys = BODY_INPUTS[task]
    fields = endpoint.request.model_fields
    shared = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    unknown = sorted(k for k in shared if k not in fields or k in (*keys, "model"))
    if unknown:
        raise ProtocolError(f"unknown parameter(s) {', '.join(unknown)} for {endpoint.path}")
    items, params = [], None
    for index, text in enumerate(tensors["text"]):
        try:
            element = json.loads(text)
        except ValueError:
            element = None
        if not isinstance(element, dict) or set(element) - set(keys):
            raise ProtocolError(
                f"text element {index}: a {task} model takes each element as a JSON object with "
                f"{' and '.join(keys)}"
            )
        decoded = endpoint.decode(_validated(endpoint, {**element, **shared, "model": name}), settings)
        items += decoded.items
        params = decoded.params  # the same for every element: the request's parameters
    return Decoded(items, params, False)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{loc}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _output_tensors(
    runtime: Runtime, served: ServedModel, answers: list
) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (datatype, array) of the model's outputs for these answers."""
    if served.task == "embed":
        return {"embedding": ("FP32", np.asarray(answers, dtype=np.float32))}
    if served.task == "classify":
        labels = served.labels or []
        position = {label: i for i, label in enumerate(labels)}
        scores = np.zeros((len(answers), len(labels)), dtype=np.float32)
        for row, ranked in enumerate(answers):
            for entry in ranked:
                scores[row, position[entry["label"]]] = entry["score"]
        best = np.array([ranked[0]["label"].encode() for ranked in answers], dtype=object)
        return {"scores": ("FP32", scores), "label": ("BYTES", best)}
    encoded = np.array([json.dumps(a, ensure_ascii=False).encode() for a in answers], dtype=object)
    return {"answer": ("BYTES", encoded)}


def _binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in array.reshape(-1))
    return array.astype("<f4").tobytes()


def _json_data(datatype: str, array: np.ndarray) -> list:
    if datatype == "BYTES":
        return [x.decode("utf-8") for x in array.reshape(-1)]
    return array.reshape(-1).tolist()


async def _disconnected(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


async def _infer(request: Request, runtime: Runtime, name: str, version: str | None) -> Response:
    _check_version(name, version)
    served = runtime.usable(runtime.named(name))
    body, binary = _split_body(await request.body(), request.headers.get("inference-header-content-length"))
    settings = runtime.settings
    allowed = [spec["name"] for spec in _inputs_of(served.task)]
    tensors = _read_tensors(body, binary, allowed, settings.max_list_items)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    known_outputs = [spec["name"] for spec in _outputs_of(runtime, served)]
    requested = body.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise ProtocolError("'outputs' must be a list of objects with a name")
        for output in requested:
            if output.get("name") not in known_outputs:
                raise ProtocolError(
                    f"unknown output {output.get('name')!r}; this model answers {', '.join(known_outputs)}"
                )
    # The model may be reloaded or unloaded meanwhile: everything up to `infer` taking its task runs without a
    # pause, so the request runs whole on the model it found.
    served = runtime.usable(runtime.named(name))
    endpoint = TASKS[served.task].endpoints[0]
    try:
        decoded = _decode(served.task, endpoint, tensors, parameters, name, settings)
        timings = Timings()
        request.state.timings = timings
        answers, _ = await infer(
            runtime,
            served,
            decoded.items,
            decoded.params,
            deadline=time.monotonic() + settings.request_timeout_s,
            disconnected=lambda: _disconnected(request),
            timings=timings,
        )
    except ServiceError as exc:
        if exc.status == 422:  # the task's checks (empty text, a parameter out of range): the protocol's 400
            raise ProtocolError(exc.message) from None
        raise

    outputs = _output_tensors(runtime, served, answers)
    everything_binary = parameters.get("binary_data_output") is True
    wanted = (
        [
            (o["name"], (o.get("parameters") or {}).get("binary_data", everything_binary) is True)
            for o in requested
        ]
        if requested
        else [(n, everything_binary) for n in known_outputs]
    )
    header: dict = {"model_name": served.name, "model_version": VERSION, "outputs": []}
    if "id" in body:
        header["id"] = body["id"]
    chunks = []
    for output_name, binary_out in wanted:
        datatype, array = outputs[output_name]
        entry = {"name": output_name, "datatype": datatype, "shape": list(array.shape)}
        if binary_out:
            chunk = _binary(datatype, array)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _json_data(datatype, array)
        header["outputs"].append(entry)
    headers = {**timings.headers(), "X-Model": served.name}
    if not chunks:
        return JSONResponse(header, headers=headers)
    json_part = json.dumps(header).encode()
    headers["Inference-Header-Content-Length"] = str(len(json_part))
    return Response(json_part + b"".join(chunks), media_type="application/octet-stream", headers=headers)


@router.post(
    "/models/{name}/infer", summary="Run the model on JSON (or binary) tensors.", responses=INFER_RESPONSES
)
async def model_infer(name: str, request: Request, runtime: RuntimeDep, _: AuthDep) -> Response:
    return await _infer(request, runtime, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Run one version of the model.",
    responses=INFER_RESPONSES,
)
async def model_version_infer(
    name: str, version: str, request: Request, runtime: RuntimeDep, _: AuthDep
) -> Response:
    return await _infer(request, runtime, name, version)


# --- Model repository (Triton's model repository extension) ----------------------------------------------

CONTROL_RESPONSES = _errors(400, 401, 404)


@router.post(
    "/repository/index",
    summary="Every model of the model repository: name, state (READY, LOADING, UNLOADING, UNAVAILABLE), reason.",
    responses=_errors(401),
)
async def repository_index(request: Request, runtime: RuntimeDep, _: AuthDep) -> list[dict]:
    rows = ModelRepository.of(runtime).index()
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("ready") is True:
        rows = [row for row in rows if row["state"] == "READY"]
    return rows


@router.post(
    "/repository/models/{name}/load",
    summary="Load (or reload) a model of the repository; answers once it is ready (explicit mode only).",
    responses=CONTROL_RESPONSES,
)
async def repository_load(name: str, runtime: RuntimeDep, _: AuthDep) -> dict:
    await ModelRepository.of(runtime).load(name)
    return {}


@router.post(
    "/repository/models/{name}/unload",
    summary="Unload a model loaded from the repository: new requests 404, those accepted are answered.",
    responses=CONTROL_RESPONSES,
)
async def repository_unload(name: str, runtime: RuntimeDep, _: AuthDep) -> dict:
    await ModelRepository.of(runtime).unload(name)
    return {}
