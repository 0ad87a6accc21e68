"""Secrets API schemas: names and timestamps, never values."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields

from api.schemas.common import Timestamp, envelope


class SecretSchema(Schema):
    name = fields.String(metadata={"example": "SLACK_TOKEN"})
    createdAt = Timestamp(attribute="created_at")
    updatedAt = Timestamp(attribute="updated_at")


class SecretBodySchema(Schema):
    class Meta:
        unknown = RAISE

    # Length and emptiness are checked by app.secrets (one rule for the API and the CLI).
    value = fields.String(required=True, metadata={"description": "The secret; never returned"})


class SecretDeletedSchema(Schema):
    name = fields.String()
    deleted = fields.Boolean()


SecretEnvelope = envelope("SecretEnvelope", SecretSchema)
SecretListEnvelope = envelope("SecretListEnvelope", SecretSchema, many=True)
SecretDeletedEnvelope = envelope("SecretDeletedEnvelope", SecretDeletedSchema)
