"""Per-request access to the process services and the authenticated company."""

from __future__ import annotations

from flask import current_app, g, request

from app import keys
from app.engine import Services
from app.errors import Unauthorized


def services() -> Services:
    return current_app.extensions["baton"]


def authenticate() -> None:
    """``before_request`` for authenticated blueprints: ``x-api-key`` → ``g.company_id``."""
    with services().db.session() as session:
        company_id = keys.authenticate(session, request.headers.get("x-api-key"))
    if company_id is None:
        raise Unauthorized(
            "Missing or invalid API key" if request.headers.get("x-api-key") is None else "Invalid API key"
        )
    g.company_id = company_id


def company_id() -> str:
    return g.company_id
