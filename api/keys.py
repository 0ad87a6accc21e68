"""Keys API: a company's admin lists, creates, rotates and revokes its API keys."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from api import context
from api.docs import errors
from api.schemas.common import ok
from api.schemas.keys import CreatedKeyEnvelope, KeyCreateSchema, KeyEnvelope, KeyListEnvelope
from app import keys
from models import ApiKey

blp = Blueprint("keys", __name__, url_prefix="/api/v1/keys", description="Manage API keys (admin scope)")
blp.before_request(context.authenticate)


def key_view(row: ApiKey, key: str | None = None) -> dict[str, Any]:
    """A key's public fields; the key itself only right after it was made."""
    view = {
        "id": row.id,
        "prefix": row.prefix,
        "name": row.name,
        "scopes": keys.scope_list(row),
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
    }
    if key is not None:
        view["key"] = key
    return view


@blp.route("")
class KeyList(MethodView):
    @blp.response(200, KeyListEnvelope)
    @errors(blp, 403)
    def get(self) -> dict[str, Any]:
        """List the company's active keys, newest first (never the key or its hash)."""
        context.require(keys.ADMIN)
        with context.services().db.session() as session:
            rows = keys.list_keys(session, context.company_id())
        return ok([key_view(r) for r in rows])

    @blp.doc(requestBody={"required": True, "content": {"application/json": {"schema": KeyCreateSchema}}})
    @blp.response(201, CreatedKeyEnvelope)
    @errors(blp, 403, 413)
    def post(self) -> tuple[dict[str, Any], int]:
        """Create a key with the given scopes; the key is in ``data.key``, shown this once."""
        context.require(keys.ADMIN)
        args = context.load_body(KeyCreateSchema())
        with context.services().db.session() as session:
            row, key = keys.issue_key(session, context.company_id(), args["name"], args["scopes"])
            session.commit()
            return ok(key_view(row, key)), 201


@blp.route("/<string:key_id>/rotate")
class KeyRotate(MethodView):
    @blp.response(201, CreatedKeyEnvelope)
    @errors(blp, 403, 404)
    def post(self, key_id: str) -> tuple[dict[str, Any], int]:
        """Replace a key: a new key with the same name and scopes; the old one stops working."""
        context.require(keys.ADMIN)
        with context.services().db.session() as session:
            row, key = keys.rotate_key(session, context.company_id(), key_id)
            return ok(key_view(row, key)), 201


@blp.route("/<string:key_id>")
class KeyItem(MethodView):
    @blp.response(200, KeyEnvelope)
    @errors(blp, 403, 404)
    def delete(self, key_id: str) -> dict[str, Any]:
        """Revoke a key: every process refuses it within a second."""
        context.require(keys.ADMIN)
        with context.services().db.session() as session:
            row = keys.revoke_key(session, context.company_id(), key_id)
            return ok(key_view(row))
