"""The Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from flask_smorest import Api
from sqlalchemy.exc import DataError
from werkzeug.exceptions import HTTPException

from api.schemas.common import ErrorEnvelopeSchema, Timestamp
from app.config import Config
from app.definition import flatten
from app.errors import BatonError
from app.services import Services

logger = logging.getLogger("baton.api")

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "VALIDATION_ERROR",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
}


class BatonApi(Api):
    """flask-smorest's Api with every error rendered as the spec's envelope."""

    ERROR_SCHEMA = ErrorEnvelopeSchema

    def handle_http_exception(self, error: HTTPException) -> Any:
        data = getattr(error, "data", None) or {}
        status = error.code or 500
        code = _HTTP_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR")
        body: dict[str, Any] = {"code": code, "message": error.description or error.name}
        if status == 404:
            body["message"] = "Not found"
        elif status == 413:
            body["message"] = "Request body exceeds 1 MiB"
        elif status == 400 and not data:
            body["message"] = "Malformed request"
        messages = data.get("messages")
        if messages:
            # webargs nests messages by location: {"query": {"limit": [...]}}
            details: dict[str, list[str]] = {}
            for location_messages in messages.values():
                details.update(flatten(location_messages))
            status, body["code"] = 400, "VALIDATION_ERROR"
            first, problems = next(iter(details.items()))
            body["message"] = f"Invalid {first}: {problems[0]}"
            body["details"] = details
        if status >= 500:
            body = {"code": "INTERNAL_ERROR", "message": "Internal server error"}
        headers = dict(data.get("headers") or {})
        if status == 405:
            # Keep Werkzeug's Allow header (RFC 9110 requires it on a 405).
            headers.update({k: v for k, v in error.get_headers() if k.lower() == "allow"})
        return jsonify({"success": False, "error": body}), status, headers


def _handle_baton_error(error: BatonError) -> Any:
    return jsonify(error.to_dict()), error.status, error.headers


def _handle_unexpected(error: Exception) -> Any:
    if isinstance(error, HTTPException):
        raise error
    if isinstance(error, DataError):
        # Values PostgreSQL cannot store (a NUL character, an out-of-range number) are bad input.
        return jsonify(
            {
                "success": False,
                "error": {
                    "code": "VALIDATION_ERROR",
                    "message": "Request contains a value that cannot be stored (for example a NUL character)",
                },
            }
        ), 400
    logger.exception("unhandled error")
    return jsonify(
        {"success": False, "error": {"code": "INTERNAL_ERROR", "message": "Internal server error"}}
    ), 500


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
    from api import register

    register(api)
    app.register_error_handler(BatonError, _handle_baton_error)
    app.register_error_handler(Exception, _handle_unexpected)
    return app
