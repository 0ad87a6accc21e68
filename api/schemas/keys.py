"""Keys API schemas."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from api.schemas.common import Timestamp, envelope
from app.keys import SCOPES


class KeySchema(Schema):
    id = fields.String()
    prefix = fields.String(metadata={"description": "The part after bk_ that names the key; not a secret"})
    name = fields.String()
    scopes = fields.List(fields.String(validate=validate.OneOf(SCOPES)))
    createdAt = Timestamp(attribute="created_at")
    lastUsedAt = Timestamp(attribute="last_used_at", allow_none=True)


class CreatedKeySchema(KeySchema):
    key = fields.String(metadata={"description": "The key itself: shown once, never again"})


class KeyCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(load_default="default", validate=validate.Length(1, 200))
    scopes = fields.List(
        fields.String(validate=validate.OneOf(SCOPES)),
        required=True,
        validate=validate.Length(min=1),
        metadata={"example": ["runs:read", "runs:write"]},
    )


KeyEnvelope = envelope("KeyEnvelope", KeySchema)
CreatedKeyEnvelope = envelope("CreatedKeyEnvelope", CreatedKeySchema)
KeyListEnvelope = envelope("KeyListEnvelope", KeySchema, many=True)
