"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from flask_smorest import Api
from werkzeug.exceptions import HTTPException

from api.schemas.common import ErrorEnvelopeSchema, Timestamp
from app.config import Config
from app.definition import flatten
from app.errors import (
    BatonError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ValidationError,
    error_for,
    for_status,
)
from app.services import Services

logger = logging.getLogger("baton.api")


class BatonApi(Api):
    """flask-smorest's Api with every error rendered as the spec's envelope."""

    ERROR_SCHEMA = ErrorEnvelopeSchema

    def handle_http_exception(self, error: HTTPException) -> Any:
        """Werkzeug's and webargs' errors become the Baton error of their status."""
        return _handle_baton_error(_as_baton_error(error))


def _as_baton_error(error: HTTPException) -> BatonError:
    data = getattr(error, "data", None) or {}
    cls = for_status(error.code or 500)
    headers = dict(data.get("headers") or {})
    if cls is MethodNotAllowed:
        # Keep Werkzeug's Allow header (RFC 9110 requires it on a 405).
        headers.update({k: v for k, v in error.get_headers() if k.lower() == "allow"})
    messages = data.get("messages")
    if messages:
        # webargs nests messages by location: {"query": {"limit": [...]}}
        details: dict[str, list[str]] = {}
        for location_messages in messages.values():
            details.update(flatten(location_messages))
        first, problems = next(iter(details.items()))
        return ValidationError(f"Invalid {first}: {problems[0]}", details=details, headers=headers)
    if cls in (NotFound, PayloadTooLarge, InternalError):
        return cls(headers=headers)  # their own words, never a stack trace or a URL
    if cls is ValidationError and not data:
        return cls("Malformed request", headers=headers)
    return cls(error.description or error.name, headers=headers)


def _handle_baton_error(error: BatonError) -> Any:
    return jsonify(error.to_dict()), error.status, error.headers


def _handle_unexpected(error: Exception) -> Any:
    if isinstance(error, HTTPException):
        raise error
    return _handle_baton_error(error_for(error))


def create_app(config: Config | None = None, services: Services | None = None) -> Flask:
    """Build the API app; ``services`` lets tests and ``baton dev`` share connections."""
    import workers.actions  # noqa: F401  (registers the built-in actions)
    from app.services import build_services

    config = config or Config.from_env()
    app = Flask("baton")
    app.config.update(
        SECRET_KEY=config.secret_key,
        MAX_CONTENT_LENGTH=config.max_content_length,
        API_TITLE="Baton",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "info": {"description": "Execute workflows and monitor their execution progress."},
            "components": {
                "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
            },
            "security": [{"apiKey": []}],
        },
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.json.compact = True
    app.extensions["baton"] = services or build_services(config)
    app.extensions["baton_config"] = config
    api = BatonApi(app)
    api.register_field(Timestamp, "string", "date-time")
    from api import metrics, register

    metrics.init_app(app, api)  # first: its timer starts before the other hooks run
    register(api)
    from api import dashboard

    dashboard.register(app)
    from app import ratelimit

    ratelimit.init_app(app, config)
    app.register_error_handler(BatonError, _handle_baton_error)
    app.register_error_handler(Exception, _handle_unexpected)
    from api import list_route, trigger_route

    # Last: each answers its route's common case before the rest of the app.
    list_route.install(app)
    trigger_route.install(app)
    return app
