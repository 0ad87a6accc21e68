"""Runs API (spec: list, get, logs, cancel)."""

from __future__ import annotations

from typing import Any

import redis
from flask import jsonify
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from api import context
from api.dashboard.queries import RunFilters
from api.docs import REPLAYED_HEADERS, errors
from api.pagination import meta, page
from api.schemas.common import ok
from api.schemas.runs import (
    CancelEnvelope,
    DiffQuerySchema,
    ListRunsQuerySchema,
    RestartBodySchema,
    RestartEnvelope,
    ResumeBodySchema,
    RetryBodySchema,
    RunDiffEnvelope,
    RunEnvelope,
    RunListEnvelope,
    RunLogsEnvelope,
    step_view,
)
from app import engine, rundiff
from app.errors import NotFound
from app.ids import RUN_ID
from app.keys import RUNS_READ, RUNS_WRITE
from app.timeutil import iso
from models import Run, RunStatus, StepStatus

blp = Blueprint("runs", __name__, url_prefix="/api/v1/runs", description="Execute and monitor workflow runs")
blp.before_request(context.authenticate)


LIST_COLUMNS = (
    Run.id,
    Run.workflow_id,
    Run.status,
    Run.trigger_type,
    Run.started_at,
    Run.completed_at,
    Run.duration_ms,
    Run.error,
    Run.created_at,
)


def _run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise NotFound("Run not found")
    return run_id


def _visible_steps(rows: list[Any]) -> list[dict[str, Any]]:
    """Steps that have started or been decided; steps still waiting their turn are left out."""
    return [step_view(r) for r in rows if engine.shown_in_results(r.status, r.attempt)]


def run_detail(run: Run, rows: list[Any], restarted: list[str] | None = None) -> dict[str, Any]:
    """A run as ``GET /runs/:id`` shows it; ``restarted``: its children's ids (left out when None)."""
    detail = {
        "id": run.id,
        "workflow_id": run.workflow_id,
        "status": run.status,
        "trigger_type": run.trigger_type,
        "input": run.input,
        "output": run.output,
        "step_results": _visible_steps(rows),
        "started_at": run.started_at,
        "completed_at": run.completed_at,
        "duration_ms": run.duration_ms,
        "error": run.error,
        "created_at": run.created_at,
        "workflow_version": run.workflow_version,
        "restarted_from_run_id": run.restarted_from_run_id,
        "restart_from_step_id": run.restart_from_step_id,
    }
    if restarted is not None:
        detail["restarted_run_ids"] = restarted
    return detail


def run_summary(row: Any) -> dict[str, Any]:
    """A list entry, as ``RunSummarySchema`` dumps it."""
    return {
        "id": row.id,
        "workflowId": row.workflow_id,
        "status": str(row.status),
        "triggerType": str(row.trigger_type),
        "startedAt": iso(row.started_at),
        "completedAt": iso(row.completed_at),
        "durationMs": row.duration_ms,
        "error": _error_view(row.error),
        "createdAt": iso(row.created_at),
    }


def _error_view(error: Any) -> dict[str, Any] | None:
    """``RunErrorSchema``: its code and message, as strings."""
    if not isinstance(error, dict):
        return None
    return {k: None if error[k] is None else str(error[k]) for k in ("code", "message") if k in error}


@blp.route("")
class RunList(MethodView):
    @blp.arguments(ListRunsQuerySchema, location="query", error_status_code=400)
    @blp.response(200, RunListEnvelope)
    @errors(blp, 403)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List runs, newest first, with cursor pagination."""
        context.require(RUNS_READ)
        filters = RunFilters(
            args.get("workflowId"),
            args.get("status"),
            args.get("triggerType"),
            args.get("createdAfter"),
            args.get("createdBefore"),
        )
        # Only what a list entry shows: a run's input and output may be megabytes each.
        query = filters.apply(select(*LIST_COLUMNS).where(Run.company_id == context.company_id()))
        limit = args["limit"]
        with context.services().db.session() as session:
            rows = list(session.execute(page(query, Run.created_at, Run.id, args.get("cursor"), limit)))
        rows, page_meta = meta(rows, limit)
        # Built here, not by the response schema (RunListEnvelope documents the same shape):
        # marshmallow's dump was 40 % of this route's CPU (profiled), and the list is read often.
        return jsonify(ok([run_summary(r) for r in rows], page_meta))


@blp.route("/<string:run_id>")
class RunItem(MethodView):
    @blp.response(200, RunEnvelope)
    @errors(blp, 403, 404)
    def get(self, run_id: str) -> dict[str, Any]:
        """Get a run with its step results."""
        context.require(RUNS_READ)
        with context.services().db.session() as session:
            run = engine.get_run(session, context.company_id(), _run_id(run_id))
            rows = engine.step_runs(session, run.id)
            restarted = engine.restarted_run_ids(session, run)
        return ok(run_detail(run, rows, restarted))


@blp.route("/<string:run_id>/logs")
class RunLogs(MethodView):
    @blp.response(200, RunLogsEnvelope)
    @errors(blp, 403, 404)
    def get(self, run_id: str) -> dict[str, Any]:
        """Execution log: one entry per attempt, plus the attempt in progress."""
        context.require(RUNS_READ)
        with context.services().db.session() as session:
            run = engine.get_run(session, context.company_id(), _run_id(run_id))
            attempts = engine.step_attempts(session, run.id)
            running = [r for r in engine.step_runs(session, run.id) if r.status == StepStatus.RUNNING]
        # By step, then in the order written: a forEach step's item attempts (written as they end,
        # whatever their attempt numbers) come before the step's own entry, as for any other step.
        attempts.sort(key=lambda a: (a.position, a.id))
        logs = [step_view(a) for a in attempts] + [step_view(r) for r in running]
        return ok(
            {
                "id": run.id,
                "workflow_id": run.workflow_id,
                "status": run.status,
                "logs": logs,
                "started_at": run.started_at,
                "completed_at": run.completed_at,
                "duration_ms": run.duration_ms,
                "error": run.error,
            }
        )


@blp.route("/<string:run_id>/diff")
class RunDiff(MethodView):
    @blp.arguments(DiffQuerySchema, location="query", error_status_code=400)
    @blp.response(200, RunDiffEnvelope)
    @errors(blp, 403, 404)
    def get(self, args: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Compare this run with another run of its workflow, step by step: status and duration as
        ``[this, against]``, and each changed JSON path of input, output and error (``before`` is the
        against run's value, ``after`` this run's)."""
        context.require(RUNS_READ)
        with context.services().db.session() as session:
            return ok(rundiff.diff_runs(session, context.company_id(), _run_id(run_id), args["against"]))


_IDEMPOTENCY_DOC = {
    "parameters": [
        {
            "in": "header",
            "name": "Idempotency-Key",
            "schema": {"type": "string"},
            "description": "A repeat with the same key (24 h) returns the first answer, acting once",
        }
    ]
}


@blp.route("/<string:run_id>/cancel")
class RunCancel(MethodView):
    @blp.doc(**_IDEMPOTENCY_DOC)
    @blp.response(200, CancelEnvelope)
    @errors(blp, 403, 404)
    def post(self, run_id: str) -> dict[str, Any]:
        """Cancel a pending or running run; no further step starts."""
        context.require(RUNS_WRITE)
        services = context.services()
        key = context.idempotency_key()
        remembered = services.key("idem", "cancel", context.company_id(), key) if key else None
        if remembered and _remembered(services, remembered) == run_id.encode():
            return ok({"id": run_id, "status": RunStatus.CANCELLED, "message": "Run cancellation requested"})
        run = engine.cancel_run(services, context.company_id(), _run_id(run_id))
        if remembered:
            _remember(services, remembered, run.id)
        return ok({"id": run.id, "status": run.status, "message": "Run cancellation requested"})


def _remembered(services: Any, key: str) -> bytes | None:
    """A cancel's Idempotency-Key (Redis); with Redis down, the database's answer stands."""
    try:
        return services.redis.get(key)
    except redis.RedisError:
        return None


def _remember(services: Any, key: str, run_id: str) -> None:
    try:
        services.redis.set(key, run_id, ex=int(engine.IDEMPOTENCY_TTL.total_seconds()))
    except redis.RedisError:
        pass  # a repeat then finds the run cancelled and answers INVALID_STATE


def _restart(run_id: str, mode: str, args: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Retry or restart: the engine's plan, shaped as the spec's 202 body (or the dry run's 200)."""
    services, key = context.services(), context.idempotency_key()
    plan = engine.plan_restart(
        services,
        context.company_id(),
        _run_id(run_id),
        mode=mode,
        from_step_id=args.get("fromStepId"),
        override_input=args.get("overrideInput"),
        version_choice=args["workflowVersion"],
    )
    base = {
        "originalRunId": plan.original.id,
        "workflowId": plan.original.workflow_id,
        "restartFromStepId": plan.from_step_id,
    }
    if args.get("dryRun"):
        reused = [
            {"stepId": i, "status": plan.old_steps[i].status, "output": plan.old_steps[i].output}
            for i in plan.reused_step_ids
        ]
        dry = {"dryRun": True, "workflowVersion": plan.version, "input": plan.input}
        return ok({**base, **dry, "reusedSteps": reused, "stepsToRun": plan.step_ids_to_run}), 200, {}
    run, created = engine.start_restart(services, plan, key)
    result = {
        **base,
        "newRunId": run.id,
        "restartFromStepId": run.restart_from_step_id or plan.from_step_id,
        "status": RunStatus.PENDING if created else run.status,
        "createdAt": run.created_at,
        "workflowVersion": run.workflow_version,
    }
    return ok(result), 202, {} if created else {"Idempotent-Replayed": "true"}


@blp.route("/<string:run_id>/retry")
class RunRetry(MethodView):
    @blp.doc(requestBody={"content": {"application/json": {"schema": RetryBodySchema}}}, **_IDEMPOTENCY_DOC)
    @blp.response(202, RestartEnvelope, headers=REPLAYED_HEADERS)
    @errors(blp, 403, 404, 409, 413)
    def post(self, run_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Retry a failed run from its first failed step, in a new run; the original input is kept."""
        context.require(RUNS_WRITE)
        return _restart(run_id, "retry", context.load_body(RetryBodySchema(), required=False))


@blp.route("/<string:run_id>/restart")
class RunRestart(MethodView):
    @blp.doc(requestBody={"content": {"application/json": {"schema": RestartBodySchema}}}, **_IDEMPOTENCY_DOC)
    @blp.response(202, RestartEnvelope, headers=REPLAYED_HEADERS)
    @blp.alt_response(
        200, schema=RestartEnvelope, description="dryRun: the plan, nothing created", success=True
    )
    @errors(blp, 403, 404, 409, 413)
    def post(self, run_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Restart a finished run from any step, reusing earlier outputs, optionally with input overrides."""
        context.require(RUNS_WRITE)
        _run_id(run_id)
        return _restart(run_id, "restart", context.load_body(RestartBodySchema()))


@blp.route("/<string:run_id>/resume")
class RunResume(MethodView):
    @blp.doc(requestBody={"content": {"application/json": {"schema": ResumeBodySchema}}})
    @blp.response(200, CancelEnvelope)
    @errors(blp, 403, 404, 413)
    def post(self, run_id: str) -> dict[str, Any]:
        """Answer a suspended run's approval: approve to continue (data becomes the step output)."""
        context.require(RUNS_WRITE)
        _run_id(run_id)
        args = context.load_body(ResumeBodySchema())
        run = engine.resume_run(
            context.services(), context.company_id(), run_id, args["approved"], args["data"]
        )
        message = "Run resumed" if args["approved"] else "Run rejected"
        return ok({"id": run.id, "status": run.status, "message": message})
