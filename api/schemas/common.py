"""Shared fields and the two envelopes of the spec."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields

from app.timeutil import iso


class Timestamp(fields.Field):
    """UTC timestamp rendered as ``2024-01-15T10:30:00.000Z``."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return iso(value)


class AnyJSON(fields.Raw):
    """Any JSON value."""


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"example": "NOT_FOUND"})
    message = fields.String(required=True, metadata={"example": "Run not found"})
    details = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Field path → messages (validation errors only)"},
    )


class ErrorEnvelopeSchema(Schema):
    success = fields.Boolean(required=True, metadata={"example": False})
    error = fields.Nested(ErrorBodySchema, required=True)


class ListMetaSchema(Schema):
    cursor = fields.String(allow_none=True, metadata={"description": "Pass as ?cursor= for the next page"})
    hasMore = fields.Boolean()


def envelope(
    name: str, data: type[Schema] | Schema, *, many: bool = False, meta: bool = False
) -> type[Schema]:
    """A ``{"success": true, "data": …}`` schema (with ``meta`` for lists)."""
    attrs: dict[str, fields.Field] = {
        "success": fields.Boolean(dump_default=True),
        "data": fields.Nested(data, many=many),
    }
    if meta:
        attrs["meta"] = fields.Nested(ListMetaSchema)
    return Schema.from_dict(attrs, name=name)


def ok(data: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True, "data": data}
    if meta is not None:
        body["meta"] = meta
    return body
