"""Bulk actions: the request bodies and the answers (DESIGN §12, "Workflow power")."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from api.schemas.common import envelope
from api.schemas.runs import RunFilterFields
from app.bulk import MAX_RUN_IDS
from app.ids import RUN_ID
from models import RUN_STATUSES, BulkKind, BulkStatus


class BulkFilterSchema(RunFilterFields):
    class Meta:
        unknown = RAISE

    status = fields.String(
        validate=validate.OneOf(RUN_STATUSES),
        metadata={"description": "cancel: pending, running or suspended; retry: failed or timeout"},
    )


class BulkBodySchema(Schema):
    class Meta:
        unknown = RAISE

    filter = fields.Nested(
        BulkFilterSchema,
        metadata={"description": "Runs matching every field given (at least one); or use runIds"},
    )
    runIds = fields.List(
        fields.String(validate=validate.Regexp(RUN_ID, error="Not a run id")),
        validate=validate.Length(1, MAX_RUN_IDS),
        metadata={"description": f"Up to {MAX_RUN_IDS} run ids; or use filter"},
    )
    dryRun = fields.Boolean(
        load_default=False, metadata={"description": "Count the runs and show the first ids; act on none"}
    )

    @validates_schema
    def _one_selection(self, data: dict[str, Any], **_: Any) -> None:
        if ("filter" in data) == ("runIds" in data):
            raise ValidationError("Give either filter or runIds", "filter")
        if "filter" in data and not data["filter"]:
            raise ValidationError(
                "Give at least one of workflowId, status, triggerType, createdAfter, createdBefore", "filter"
            )


class BulkRetryBodySchema(BulkBodySchema):
    workflowVersion = fields.String(
        load_default="original",
        validate=validate.OneOf(["original", "latest"]),
        metadata={"description": "Retry on each run's own version (default) or its workflow's latest"},
    )


class BulkDryRunSchema(Schema):
    count = fields.Integer(metadata={"description": "Runs the action would take"})
    sampleRunIds = fields.List(
        fields.String(), metadata={"description": "The first of them, in the order the action takes them"}
    )


class BulkAcceptedSchema(Schema):
    id = fields.String(metadata={"example": "bulk_0190f5c3-…"})
    action = fields.String(validate=validate.OneOf([k.value for k in BulkKind]))
    status = fields.String(validate=validate.OneOf([s.value for s in BulkStatus]))


class BulkProgressSchema(BulkAcceptedSchema):
    total = fields.Integer(metadata={"description": "Runs the action selected when it was accepted"})
    done = fields.Integer(metadata={"description": "Runs cancelled, or retried (each in a new linked run)"})
    failed = fields.Integer(metadata={"description": "Runs it could not act on (e.g. finished meanwhile)"})


BulkDryRunEnvelope = envelope("BulkDryRunEnvelope", BulkDryRunSchema)
BulkAcceptedEnvelope = envelope("BulkAcceptedEnvelope", BulkAcceptedSchema)
BulkProgressEnvelope = envelope("BulkProgressEnvelope", BulkProgressSchema)
