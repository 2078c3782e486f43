"""TEI's error kinds: a route of text-embeddings-inference's API answers its errors as TEI does,
`{"error", "error_type"}` with TEI's ErrorType for the status (Validation, Empty, Overloaded, Unhealthy,
Backend), the status staying this service's.

TEI's own routes use it: those of service/tei.py, and the task endpoints only TEI has (TEI_TASK_PATHS,
registered by the task router). The routes this service shares with TEI (/embed, /rerank, /similarity,
/v1/embeddings) keep this service's kinds.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..errors import ServiceError, ValidationFailed

# Task endpoints that exist only as TEI routes.
TEI_TASK_PATHS = frozenset({"/embed_sparse"})

# TEI's ErrorType for each status its document lists; the others (401, 404, 504: nothing TEI answers) keep
# this service's kinds.
TEI_ERROR_TYPES = {
    400: "Empty",
    413: "Validation",
    422: "Validation",
    424: "Backend",
    429: "Overloaded",
    500: "Backend",
    503: "Unhealthy",
}


def tei_error(exc: ServiceError) -> JSONResponse:
    kind = TEI_ERROR_TYPES.get(exc.status, exc.error_type)
    return JSONResponse(
        {"error": exc.message, "error_type": kind}, status_code=exc.status, headers=exc.headers
    )


class TEIRoute(APIRoute):
    """A route whose errors (schema validation included) answer in TEI's `{error, error_type}` kinds."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            from ..app import describe_validation_error  # the app imports this module

            try:
                return await handler(request)
            except RequestValidationError as exc:
                content_type = request.headers.get("content-type", "").split(";")[0].strip()
                return tei_error(ValidationFailed(describe_validation_error(exc, content_type)))
            except ServiceError as exc:
                return tei_error(exc)

        return route
