"""Per-request access to the process services and the authenticated company."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, request
from marshmallow import Schema
from marshmallow import ValidationError as MarshmallowError

from app import keys
from app.definition import flatten
from app.errors import Forbidden, Unauthorized, ValidationError
from app.services import Services


def services() -> Services:
    return current_app.extensions["baton"]


def authenticate() -> None:
    """``before_request`` for authenticated blueprints: ``x-api-key`` → ``g.principal``, ``g.company_id``."""
    with services().db.session() as session:
        principal = keys.authenticate(session, request.headers.get("x-api-key"))
    if principal is None:
        raise Unauthorized(
            "Missing or invalid API key" if request.headers.get("x-api-key") is None else "Invalid API key"
        )
    g.principal = principal
    g.company_id = principal.company_id


def company_id() -> str:
    return g.company_id


def require(scope: str) -> None:
    """403 unless the request's key holds ``scope`` (``admin`` holds them all)."""
    if not g.principal.allows(scope):
        raise Forbidden(f"This API key lacks the {scope} scope")


def json_body(*, required: bool = True) -> Any:
    """The request's JSON body; a clear 400 when it is missing or not JSON ({} when optional and empty)."""
    if not required and not request.get_data(cache=True):
        return {}
    body = request.get_json(silent=True)
    if body is None:
        raise ValidationError("Request body must be JSON (Content-Type: application/json)")
    return body


def load_body(schema: Schema, *, required: bool = True) -> dict[str, Any]:
    """Validate a JSON object body with ``schema``; errors name each field in ``details``."""
    raw = json_body(required=required)
    if not isinstance(raw, dict):
        raise ValidationError("Request body must be a JSON object")
    try:
        return schema.load(raw)
    except MarshmallowError as exc:
        details = flatten(exc.messages)
        first, problems = next(iter(details.items()))
        raise ValidationError(f"Invalid {first}: {problems[0]}", details=details) from exc


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255 and key.isprintable()):
        raise ValidationError(
            "Idempotency-Key must be 1 to 255 printable characters",
            details={"Idempotency-Key": ["Length must be between 1 and 255."]},
        )
    return key
