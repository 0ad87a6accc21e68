"""OpenAPI documentation of the error answers: each in the error envelope, each operation its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask_smorest import Blueprint

from api.schemas.common import ErrorEnvelopeSchema

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
REPLAYED_HEADERS = {
    "Idempotent-Replayed": {
        "description": "`true` when this answers a repeat of an earlier request",
        "schema": {"type": "string"},
    }
}

DESCRIPTIONS = {
    400: "VALIDATION_ERROR, INVALID_STATE or INVALID_STEP: the request cannot be done as sent",
    401: "UNAUTHORIZED: the x-api-key header is missing or not a valid key",
    403: "FORBIDDEN: the key lacks the scope this operation needs",
    404: "NOT_FOUND: no such resource in the key's company",
    409: "CONFLICT: the id or the Idempotency-Key is already taken by something else",
    413: "PAYLOAD_TOO_LARGE: the body exceeds the size limit",
    429: "RATE_LIMITED: too many requests; retry after Retry-After seconds",
    503: "SERVICE_UNAVAILABLE: the database or Redis is unavailable; retry shortly",
}

# Every authenticated operation can answer these (a 400 too: a NUL in an id cannot even be looked up).
AUTHENTICATED = (400, 401, 429, 503)


def errors(blp: Blueprint, *codes: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Document ``codes`` (and those of every authenticated call) as error-envelope answers."""
    return public_errors(blp, *codes, *AUTHENTICATED)


def public_errors(blp: Blueprint, *codes: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Document ``codes`` as error-envelope answers of an operation that needs no key."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        for code in sorted(set(codes)):
            headers = _RETRY_AFTER if code in (429, 503) else None
            view = blp.alt_response(
                code, schema=ErrorEnvelopeSchema, description=DESCRIPTIONS[code], headers=headers
            )(view)
        return view

    return decorate


def replayed(blp: Blueprint, schema: Any, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Document the 200 that answers an idempotent repeat (the first answer, acted on once)."""
    return blp.alt_response(
        200,
        schema=schema,
        description=f"A repeat: {what}",
        headers=REPLAYED_HEADERS,
        success=True,
    )
