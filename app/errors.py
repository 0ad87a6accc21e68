"""The one error hierarchy; every error renders as the spec's envelope."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("baton.api")


class BatonError(Exception):
    """An error with an API code, an HTTP status and a readable message."""

    code = "INTERNAL_ERROR"
    status = 500
    default_message = "Internal server error"

    def __init__(self, message: str | None = None, *, details: Any = None, headers: dict | None = None):
        self.message = message or self.default_message
        self.details = details
        self.headers = headers or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"success": False, "error": error}


class Unauthorized(BatonError):
    code, status, default_message = "UNAUTHORIZED", 401, "Missing or invalid API key"


class NotFound(BatonError):
    code, status, default_message = "NOT_FOUND", 404, "Not found"


class Forbidden(BatonError):
    code, status, default_message = "FORBIDDEN", 403, "This API key lacks the scope this route needs"


class ValidationError(BatonError):
    code, status, default_message = "VALIDATION_ERROR", 400, "Invalid request"


class InvalidState(BatonError):
    code, status, default_message = "INVALID_STATE", 400, "Invalid state"


class InvalidStep(BatonError):
    code, status, default_message = "INVALID_STEP", 400, "Invalid step"


class Conflict(BatonError):
    code, status, default_message = "CONFLICT", 409, "Conflict"


class PayloadTooLarge(BatonError):
    code, status, default_message = "PAYLOAD_TOO_LARGE", 413, "Request body exceeds 1 MiB"


class RateLimited(BatonError):
    code, status, default_message = "RATE_LIMITED", 429, "Too many requests"


class MethodNotAllowed(BatonError):
    code, status, default_message = "METHOD_NOT_ALLOWED", 405, "Method not allowed"


class ServiceUnavailable(BatonError):
    code, status, default_message = "SERVICE_UNAVAILABLE", 503, "Service unavailable"


class InternalError(BatonError):
    pass


def for_status(status: int) -> type[BatonError]:
    """The error class that renders an HTTP status raised outside Baton (Werkzeug, webargs)."""
    for cls in BatonError.__subclasses__():
        if cls.status == status:
            return cls  # the first declared wins: 400 is VALIDATION_ERROR
    return InternalError if status >= 500 else ValidationError


def is_transient(exc: BaseException) -> bool:
    """A database or Redis outage (worth retrying, a 503), not a bug or bad input."""
    import psycopg
    import redis
    from sqlalchemy import exc as sa

    return isinstance(
        exc,
        (
            sa.OperationalError,
            sa.InterfaceError,
            sa.TimeoutError,
            # The hot path runs on the driver's connection (``engine.hotpath``): its errors unwrapped.
            psycopg.OperationalError,
            psycopg.InterfaceError,
            redis.ConnectionError,
            redis.TimeoutError,
        ),
    )


def error_for(error: Exception) -> BatonError:
    """The Baton error an unexpected exception is answered with (logged here when it is a fault):
    shared by the Flask app and the WSGI fast paths in front of it."""
    from sqlalchemy.exc import DataError

    if isinstance(error, BatonError):
        return error
    if isinstance(error, DataError):
        # Values PostgreSQL cannot store (a NUL character, an out-of-range number) are bad input.
        return ValidationError("Request contains a value that cannot be stored (for example a NUL character)")
    if is_transient(error):
        logger.warning("service unavailable: %s", error)
        return ServiceUnavailable(
            "The database or Redis is unavailable; try again shortly", headers={"Retry-After": "2"}
        )
    logger.exception("unhandled error")
    return InternalError()
