"""Secrets API: write-only values, usable in templates as ``{{ secrets.NAME }}``."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from api import context
from api.docs import errors
from api.schemas.common import ok
from api.schemas.secrets import (
    SecretBodySchema,
    SecretDeletedEnvelope,
    SecretEnvelope,
    SecretListEnvelope,
)
from app import secrets
from app.keys import SECRETS_WRITE

blp = Blueprint("secrets", __name__, url_prefix="/api/v1/secrets", description="Encrypted secrets")
blp.before_request(context.authenticate)


@blp.route("")
class SecretList(MethodView):
    @blp.response(200, SecretListEnvelope)
    @errors(blp, 403)
    def get(self) -> dict[str, Any]:
        """List the company's secrets: names and timestamps, never values."""
        context.require(SECRETS_WRITE)
        with context.services().db.session() as session:
            return ok(secrets.list_(session, context.company_id()))


@blp.route("/<string:name>")
class SecretItem(MethodView):
    @blp.doc(requestBody={"required": True, "content": {"application/json": {"schema": SecretBodySchema}}})
    @blp.response(200, SecretEnvelope)
    @errors(blp, 403, 413)
    def put(self, name: str) -> dict[str, Any]:
        """Create or replace a secret; the value is encrypted at rest and never returned."""
        context.require(SECRETS_WRITE)
        secrets.check_name(name)
        body = context.load_body(SecretBodySchema())
        services = context.services()
        with services.db.session() as session:
            return ok(secrets.put(session, services.config, context.company_id(), name, body["value"]))

    @blp.response(200, SecretDeletedEnvelope)
    @errors(blp, 403, 404)
    def delete(self, name: str) -> dict[str, Any]:
        """Delete a secret; templates that use it then fail with TEMPLATE_ERROR."""
        context.require(SECRETS_WRITE)
        with context.services().db.session() as session:
            secrets.delete(session, context.company_id(), name)
        return ok({"name": name, "deleted": True})
