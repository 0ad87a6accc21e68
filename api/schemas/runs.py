"""Runs API schemas, field for field as the spec."""

from __future__ import annotations

from datetime import timezone
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from api.pagination import MAX_CURSOR_CHARS
from api.schemas.common import AnyJSON, Timestamp, envelope
from app.engine.states import attempt_made
from app.ids import WORKFLOW_ID
from models import RUN_STATUSES, TRIGGER_TYPES


class RunErrorSchema(Schema):
    code = fields.String()
    message = fields.String()


class RunSummarySchema(Schema):
    id = fields.String()
    workflowId = fields.String(attribute="workflow_id")
    status = fields.String()
    triggerType = fields.String(attribute="trigger_type")
    startedAt = Timestamp(attribute="started_at", allow_none=True)
    completedAt = Timestamp(attribute="completed_at", allow_none=True)
    durationMs = fields.Integer(attribute="duration_ms", allow_none=True)
    error = fields.Nested(RunErrorSchema, allow_none=True)
    createdAt = Timestamp(attribute="created_at")


class StepResultSchema(Schema):
    stepId = fields.String(attribute="step_id")
    status = fields.String()
    startedAt = Timestamp(attribute="started_at", allow_none=True)
    completedAt = Timestamp(attribute="completed_at", allow_none=True)
    durationMs = fields.Integer(attribute="duration_ms", allow_none=True)
    input = AnyJSON()
    output = AnyJSON()
    error = fields.Nested(RunErrorSchema, allow_none=True)
    attempt = fields.Integer()
    reused = fields.Boolean(metadata={"description": "Present (true) on steps copied from the original run"})
    index = fields.Integer(
        metadata={
            "description": "Logs only, present on a forEach item's attempt: the item's position in the "
            "list (attempt is then the item's attempt); the step's own entry follows its items"
        }
    )


class RunDetailSchema(Schema):
    id = fields.String()
    workflowId = fields.String(attribute="workflow_id")
    status = fields.String()
    triggerType = fields.String(attribute="trigger_type")
    input = AnyJSON()
    output = AnyJSON()
    stepResults = fields.List(fields.Nested(StepResultSchema), attribute="step_results")
    startedAt = Timestamp(attribute="started_at", allow_none=True)
    completedAt = Timestamp(attribute="completed_at", allow_none=True)
    durationMs = fields.Integer(attribute="duration_ms", allow_none=True)
    error = fields.Nested(RunErrorSchema, allow_none=True)
    createdAt = Timestamp(attribute="created_at")
    workflowVersion = fields.Integer(attribute="workflow_version")
    restartedFromRunId = fields.String(attribute="restarted_from_run_id", allow_none=True)
    restartFromStepId = fields.String(attribute="restart_from_step_id", allow_none=True)
    restartedRunIds = fields.List(
        fields.String(),
        attribute="restarted_run_ids",
        metadata={"description": "Runs retried or restarted from this one, newest first"},
    )


class RunLogsSchema(Schema):
    runId = fields.String(attribute="id")
    workflowId = fields.String(attribute="workflow_id")
    status = fields.String()
    logs = fields.List(fields.Nested(StepResultSchema))
    startedAt = Timestamp(attribute="started_at", allow_none=True)
    completedAt = Timestamp(attribute="completed_at", allow_none=True)
    durationMs = fields.Integer(attribute="duration_ms", allow_none=True)
    error = fields.Nested(RunErrorSchema, allow_none=True)


class CancelResultSchema(Schema):
    id = fields.String()
    status = fields.String()
    message = fields.String()


class RunFilterFields(Schema):
    """The runs filter shared by ``GET /runs`` and the bulk actions."""

    workflowId = fields.String(validate=validate.Regexp(WORKFLOW_ID, error="Not a workflow id"))
    status = fields.String(validate=validate.OneOf(RUN_STATUSES))
    triggerType = fields.String(validate=validate.OneOf(TRIGGER_TYPES))
    createdAfter = fields.AwareDateTime(
        default_timezone=timezone.utc,
        metadata={"description": "ISO 8601 (UTC unless an offset is given); runs created at or after it"},
    )
    createdBefore = fields.AwareDateTime(
        default_timezone=timezone.utc,
        metadata={"description": "ISO 8601 (UTC unless an offset is given); runs created before it"},
    )


class ListRunsQuerySchema(RunFilterFields):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 100), strict=False)
    cursor = fields.String(validate=validate.Length(1, MAX_CURSOR_CHARS))


class RetryBodySchema(Schema):
    class Meta:
        unknown = RAISE

    workflowVersion = fields.String(load_default="original", validate=validate.OneOf(["original", "latest"]))


class RestartBodySchema(RetryBodySchema):
    fromStepId = fields.String(required=True, validate=validate.Length(1, 64))
    overrideInput = fields.Dict(keys=fields.String(), load_default=dict)
    dryRun = fields.Boolean(load_default=False)


class ResumeBodySchema(Schema):
    class Meta:
        unknown = RAISE

    approved = fields.Boolean(required=True)
    data = fields.Dict(keys=fields.String(), load_default=dict)


class ReusedStepSchema(Schema):
    stepId = fields.String()
    status = fields.String()
    output = AnyJSON()


class RestartResultSchema(Schema):
    originalRunId = fields.String()
    newRunId = fields.String()
    workflowId = fields.String()
    restartFromStepId = fields.String()
    status = fields.String()
    createdAt = Timestamp()
    workflowVersion = fields.Integer()
    dryRun = fields.Boolean(metadata={"description": "Only on a dry run: the plan, nothing created"})
    input = AnyJSON()
    reusedSteps = fields.List(fields.Nested(ReusedStepSchema))
    stepsToRun = fields.List(fields.String())


class DiffQuerySchema(Schema):
    against = fields.String(
        required=True,
        validate=validate.Length(1, 100),
        metadata={"description": "The run to compare with (a run of the same workflow)"},
    )


class ChangeSchema(Schema):
    path = fields.String(
        metadata={
            "description": 'Where the two differ: input, output or error, then .key, ["any key"] or [index]',
            "example": "output.body.items[2].id",
        }
    )
    before = AnyJSON(metadata={"description": "The value in the `against` run (null when absent)"})
    after = AnyJSON(metadata={"description": "The value in this run (null when absent)"})


class StepDiffSchema(Schema):
    stepId = fields.String()
    status = fields.List(
        fields.String(allow_none=True),
        metadata={"description": "[this run's, the against run's]; null where the run has no such step"},
    )
    durationMs = fields.List(
        fields.Integer(allow_none=True), metadata={"description": "[this run's, the against run's]"}
    )
    changes = fields.List(fields.Nested(ChangeSchema))
    changesTruncated = fields.Boolean(
        metadata={"description": "Present (true) when the step has more changed paths than listed (200)"}
    )


class RunDiffSchema(Schema):
    runId = fields.String()
    againstRunId = fields.String()
    steps = fields.List(fields.Nested(StepDiffSchema))


RunListEnvelope = envelope("RunListEnvelope", RunSummarySchema, many=True, meta=True)
RunEnvelope = envelope("RunEnvelope", RunDetailSchema)
RunLogsEnvelope = envelope("RunLogsEnvelope", RunLogsSchema)
CancelEnvelope = envelope("CancelEnvelope", CancelResultSchema)
RestartEnvelope = envelope("RestartEnvelope", RestartResultSchema)
RunDiffEnvelope = envelope("RunDiffEnvelope", RunDiffSchema)


def step_view(row: Any) -> dict[str, Any]:
    """A step row as the spec shows it; ``attempt`` is the number of the last attempt made."""
    view = {
        "step_id": row.step_id,
        "status": row.status,
        "started_at": row.started_at,
        "completed_at": row.completed_at,
        "duration_ms": row.duration_ms,
        "input": row.input,
        "output": row.output,
        "error": row.error,
        "attempt": attempt_made(row.status, row.attempt),
    }
    if getattr(row, "reused", False):
        view["reused"] = True  # only on copied steps, so ordinary results keep the spec's exact shape
    index = getattr(row, "item_index", None)
    if index is not None:
        view["index"] = index  # only on forEach items' attempts, for the same reason
    return view
