"""Workflows API schemas."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from api.pagination import MAX_CURSOR_CHARS
from api.schemas.common import AnyJSON, Timestamp, envelope
from app.definition import DefinitionSchema
from app.engine.batch import MAX_ITEMS as BATCH_MAX_ITEMS


class WorkflowSchema(Schema):
    id = fields.String()
    name = fields.String()
    version = fields.Integer()
    description = fields.String()
    steps = fields.List(AnyJSON())
    output = AnyJSON()
    timeoutMs = fields.Integer()
    triggers = AnyJSON()
    concurrency = AnyJSON(metadata={"description": "{key, limit}: at most limit runs of a key at once"})
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


# The trigger types a caller may name (webhooks and schedules set theirs).
CALLER_TRIGGER_TYPES = ("api", "manual")


class TriggerSchema(Schema):
    class Meta:
        unknown = RAISE

    input = fields.Dict(load_default=dict)
    triggerType = fields.String(load_default="api", validate=validate.OneOf(CALLER_TRIGGER_TYPES))


class BatchItemSchema(Schema):
    """One run of a batch trigger (documentation: each item is checked on its own, never the batch)."""

    input = fields.Dict(metadata={"description": "The run input (default {})"})
    idempotencyKey = fields.String(
        validate=validate.Length(1, 255),
        metadata={"description": "As the single trigger's Idempotency-Key: a repeat within 24 h replays"},
    )


class BatchTriggerSchema(Schema):
    """Loads the envelope of a batch; the items themselves are checked one by one."""

    class Meta:
        unknown = RAISE

    items = fields.List(AnyJSON(), required=True, validate=validate.Length(1, BATCH_MAX_ITEMS))


class BatchTriggerDocSchema(Schema):
    items = fields.List(
        fields.Nested(BatchItemSchema),
        required=True,
        validate=validate.Length(1, BATCH_MAX_ITEMS),
        metadata={"description": f"1 to {BATCH_MAX_ITEMS} runs to start"},
    )


class BatchErrorSchema(Schema):
    code = fields.String(metadata={"example": "VALIDATION_ERROR"})
    message = fields.String()


class BatchItemResultSchema(Schema):
    status = fields.String(
        validate=validate.OneOf(["created", "replayed", "invalid"]),
        metadata={"description": "created, replayed (the key's run, same input) or invalid"},
    )
    runId = fields.String(metadata={"description": "created and replayed items"})
    error = fields.Nested(BatchErrorSchema, metadata={"description": "invalid items"})


class BatchResultSchema(Schema):
    items = fields.List(fields.Nested(BatchItemResultSchema), metadata={"description": "In request order"})


BatchResultEnvelope = envelope("BatchResultEnvelope", BatchResultSchema)
WorkflowEnvelope = envelope("WorkflowEnvelope", WorkflowSchema)
WorkflowListEnvelope = envelope("WorkflowListEnvelope", WorkflowSchema, many=True, meta=True)
DeletedEnvelope = envelope("DeletedEnvelope", DeletedSchema)
