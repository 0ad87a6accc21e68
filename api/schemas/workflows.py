"""Workflows API schemas."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from api.pagination import MAX_CURSOR_CHARS
from api.schemas.common import AnyJSON, Timestamp, envelope
from app.definition import DefinitionSchema


class WorkflowSchema(Schema):
    id = fields.String()
    name = fields.String()
    version = fields.Integer()
    description = fields.String()
    steps = fields.List(AnyJSON())
    output = AnyJSON()
    timeoutMs = fields.Integer()
    triggers = AnyJSON()
    createdAt = Timestamp(attribute="created_at")
    updatedAt = Timestamp(attribute="updated_at")
    nextRunAt = Timestamp(
        attribute="next_run_at", allow_none=True, metadata={"description": "Next schedule fire time (UTC)"}
    )


class WorkflowCreateSchema(DefinitionSchema):
    """A workflow definition (DESIGN §4), with an optional caller-chosen id."""

    id = fields.String(
        metadata={"description": "Optional; generated when absent", "example": "wf_invoice-paid"}
    )


class DeletedSchema(Schema):
    id = fields.String()
    deleted = fields.Boolean()


class ListWorkflowsQuerySchema(Schema):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 100))
    cursor = fields.String(validate=validate.Length(1, MAX_CURSOR_CHARS))


class TriggerSchema(Schema):
    class Meta:
        unknown = RAISE

    input = fields.Dict(load_default=dict)
    triggerType = fields.String(load_default="api", validate=validate.OneOf(["api", "manual"]))


WorkflowEnvelope = envelope("WorkflowEnvelope", WorkflowSchema)
WorkflowListEnvelope = envelope("WorkflowListEnvelope", WorkflowSchema, many=True, meta=True)
DeletedEnvelope = envelope("DeletedEnvelope", DeletedSchema)
