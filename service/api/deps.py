"""Typed dependencies for the routes: the runtime, settings, and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..errors import Unauthorized
from ..runtime import Runtime
from ..settings import Settings

# Declared async although they never wait: FastAPI runs a plain `def` dependency on the thread pool, and three
# thread hops per request cost a lone request ~0.3 ms (measured); these are a few attribute reads and
# comparisons.


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.runtime.settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With API keys configured, task endpoints need `Authorization: Bearer <key>`."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(
            "this endpoint needs an API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Compare against every key, in constant time per key, so timing reveals neither the key nor its index.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given_bytes, key.encode("utf-8"))
    if not matched:
        raise Unauthorized(
            "the API key is not valid", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


AuthDep = Annotated[None, Depends(require_api_key)]
