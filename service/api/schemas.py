"""Response models of the operations endpoints and of errors. Each task's request and answer models live in
its module (service/tasks/).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")


# --- errors and operations ---------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, with the limit and the value received.")
    error_type: str = Field(description="The kind of error (validation_error, payload_too_large, ...).")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: bool
    draining: bool
    models: dict[str, str] = Field(description="Each model's state: loading, compiling, ready or failed.")
    failed: dict[str, str] | None = Field(None, description="Each failed model's reason.")
    pending: str | None = None
