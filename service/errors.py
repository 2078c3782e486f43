"""Every error a client can get, by name, and the one table that maps each to its HTTP status.

Messages name the limit and the value received; they never carry internals or stack traces.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `error_type` is the machine-readable kind, `status` the HTTP status."""

    error_type = "internal_error"
    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(ServiceError):
    """The request is well-formed JSON of the right shape but its content cannot be served."""

    error_type = "invalid_input"
    status = 422


class ValidationFailed(ServiceError):
    """Malformed JSON, wrong types or out-of-range parameters (request schema validation)."""

    error_type = "validation_error"
    status = 422


class PayloadTooLarge(ServiceError):
    error_type = "payload_too_large"
    status = 413


class Unauthorized(ServiceError):
    error_type = "unauthorized"
    status = 401


class EndpointDisabled(ServiceError):
    error_type = "not_found"
    status = 404


class QueueFull(ServiceError):
    error_type = "overloaded"
    status = 429


class NotReady(ServiceError):
    error_type = "unavailable"
    status = 503


class DeadlineExceeded(ServiceError):
    error_type = "deadline_exceeded"
    status = 504


class ModelNotFound(ServiceError):
    """A request names a model that is not configured."""

    error_type = "model_not_found"
    status = 404


class ModelUnavailable(ServiceError):
    """The model failed to load or compile; retrying will not help until the operator fixes it."""

    error_type = "model_unavailable"
    status = 503
