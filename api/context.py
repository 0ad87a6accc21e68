"""Per-request access to the process services and the authenticated company."""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from flask import current_app, g, request
from marshmallow import Schema
from marshmallow import ValidationError as MarshmallowError

from api.dashboard import sessions as dashboard_sessions
from app import keys, logs
from app.definition import flatten
from app.errors import Forbidden, Unauthorized, ValidationError
from app.services import Services


def services() -> Services:
    return current_app.extensions["baton"]


def authenticate() -> None:
    """``before_request`` for authenticated blueprints: ``x-api-key`` (or, without one, the dashboard
    session cookie) → ``g.principal``, ``g.company_id``."""
    api_key = request.headers.get("x-api-key")
    if api_key is None and request.cookies.get(dashboard_sessions.COOKIE):
        principal = _session_principal()
    else:
        with services().db.session() as session:
            principal = keys.authenticate(session, api_key)
        if principal is None:
            raise Unauthorized("Missing or invalid API key" if api_key is None else "Invalid API key")
    g.principal = principal
    g.company_id = principal.company_id
    logs.bind(company_id=principal.company_id)  # cleared when the request ends


def _session_principal() -> keys.Principal:
    """The signed-in dashboard's key; an unsafe method must carry the session's CSRF token."""
    found = dashboard_sessions.current(services())
    if found is None:
        raise Unauthorized("Dashboard session expired or signed out; sign in again")
    session, principal = found
    if request.method not in dashboard_sessions.SAFE_METHODS and not dashboard_sessions.csrf_ok(session):
        raise Forbidden(f"Missing or invalid {dashboard_sessions.CSRF_HEADER} header")
    return principal


def company_id() -> str:
    return g.company_id


def require(scope: str) -> None:
    """403 unless the request's key holds ``scope`` (``admin`` holds them all)."""
    if not g.principal.allows(scope):
        raise Forbidden(f"This API key lacks the {scope} scope")


# JSON strings (their brackets are text), and every byte that is not a bracket.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\x02\x02")


def nested_deeper_than(data: bytes, max_depth: int) -> bool:
    """Whether JSON text nests deeper than ``max_depth``, counted without recursion or parsing."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if len(brackets) <= max_depth:
        return False
    # Opening brackets count +1 and closing ones -1; the deepest point is the running sum's maximum
    # (C-level iterators throughout, so a 1 MiB body is counted in milliseconds).
    steps = map((0, 1, -1).__getitem__, brackets.translate(_STEP))
    return max(accumulate(steps)) > max_depth


def parse_json(data: bytes) -> Any:
    """JSON text to a value; nesting past ``BATON_JSON_MAX_DEPTH`` is a 400 (ValueError if not JSON)."""
    limit = services().config.json_max_depth
    too_deep = ValidationError(
        f"Request body is nested deeper than {limit} levels",
        details={"body": [f"Nested deeper than {limit} levels."]},
    )
    if nested_deeper_than(data, limit):
        raise too_deep
    try:
        return json.loads(data)
    except RecursionError:
        raise too_deep from None


def json_body(*, required: bool = True) -> Any:
    """The request's JSON body; a clear 400 when it is missing or not JSON ({} when optional and empty)."""
    data = request.get_data(cache=True)
    if not required and not data:
        return {}
    body = None
    if request.is_json:
        try:
            body = parse_json(data)
        except ValueError:
            body = None
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
