"""Workflows API: define workflows and trigger runs of them."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from api import context
from api.docs import errors, replayed
from api.pagination import meta, page
from api.runs import run_detail
from api.schemas.common import ok
from api.schemas.runs import RunEnvelope
from api.schemas.workflows import (
    BatchResultEnvelope,
    BatchTriggerDocSchema,
    BatchTriggerSchema,
    DeletedEnvelope,
    ListWorkflowsQuerySchema,
    TriggerSchema,
    WorkflowCreateSchema,
    WorkflowEnvelope,
    WorkflowListEnvelope,
)
from api.webhooks import DeliveryListEnvelope, deliveries_query
from app import engine, workflows
from app.keys import RUNS_WRITE, WORKFLOWS_WRITE
from app.services import Services
from models import WebhookDelivery, Workflow

blp = Blueprint(
    "workflows", __name__, url_prefix="/api/v1/workflows", description="Define workflows and trigger runs"
)
blp.before_request(context.authenticate)


def _definition_doc() -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": WorkflowCreateSchema}}}
    }


@blp.route("")
class WorkflowList(MethodView):
    @blp.doc(**_definition_doc())
    @blp.response(201, WorkflowEnvelope)
    @errors(blp, 403, 409, 413)
    def post(self) -> tuple[dict[str, Any], int]:
        """Create a workflow (version 1)."""
        context.require(WORKFLOWS_WRITE)
        with context.services().db.session() as session:
            workflow, definition = workflows.create(
                session, context.company_id(), context.json_body(), context.services().config
            )
            return ok(workflows.view(session, workflow, definition)), 201

    @blp.arguments(ListWorkflowsQuerySchema, location="query", error_status_code=400)
    @blp.response(200, WorkflowListEnvelope)
    @errors(blp)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List workflows, newest first."""
        query = select(Workflow).where(
            Workflow.company_id == context.company_id(), Workflow.deleted_at.is_(None)
        )
        with context.services().db.session() as session:
            rows = list(
                session.execute(
                    page(query, Workflow.created_at, Workflow.id, args.get("cursor"), args["limit"])
                ).scalars()
            )
            rows, page_meta = meta(rows, args["limit"])
            data = [workflows.view(session, w, workflows.current_definition(session, w)) for w in rows]
        return ok(data, page_meta)


@blp.route("/<string:workflow_id>")
class WorkflowItem(MethodView):
    @blp.response(200, WorkflowEnvelope)
    @errors(blp, 404)
    def get(self, workflow_id: str) -> dict[str, Any]:
        """Get a workflow's current version."""
        with context.services().db.session() as session:
            workflow = engine.get_workflow(session, context.company_id(), workflow_id)
            return ok(workflows.view(session, workflow, workflows.current_definition(session, workflow)))

    @blp.doc(**_definition_doc())
    @blp.response(200, WorkflowEnvelope)
    @errors(blp, 403, 404, 413)
    def put(self, workflow_id: str) -> dict[str, Any]:
        """Replace the definition: a new immutable version; running runs keep theirs."""
        context.require(WORKFLOWS_WRITE)
        with context.services().db.session() as session:
            workflow, definition = workflows.replace(
                session, context.company_id(), workflow_id, context.json_body(), context.services().config
            )
            return ok(workflows.view(session, workflow, definition))

    @blp.response(200, DeletedEnvelope)
    @errors(blp, 403, 404)
    def delete(self, workflow_id: str) -> dict[str, Any]:
        """Delete a workflow; its runs stay readable."""
        context.require(WORKFLOWS_WRITE)
        with context.services().db.session() as session:
            workflow = workflows.delete(session, context.company_id(), workflow_id)
        return ok({"id": workflow.id, "deleted": True})


@blp.route("/<string:workflow_id>/runs")
class WorkflowRuns(MethodView):
    @blp.doc(
        requestBody={"content": {"application/json": {"schema": TriggerSchema}}},
        parameters=[
            {
                "in": "header",
                "name": "Idempotency-Key",
                "schema": {"type": "string"},
                "description": "Repeat-safe trigger: the same key returns the same run for 24 h",
            }
        ],
    )
    @blp.response(202, RunEnvelope)
    @replayed(blp, RunEnvelope, "the run the first request with this Idempotency-Key started")
    @errors(blp, 403, 404, 409, 413)
    def post(self, workflow_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Trigger a run (trigger type ``api``); 202 with the run, 200 for an idempotent repeat."""
        context.require(RUNS_WRITE)
        args = context.load_body(TriggerSchema(), required=False)
        key = context.idempotency_key()
        services = context.services()
        run, created = engine.trigger_run(
            services,
            context.company_id(),
            workflow_id,
            args["input"],
            args["triggerType"],
            idempotency_key=key,
        )
        if created:
            return ok(run_detail(run, [])), 202, {}
        return replay_view(services, context.company_id(), run.id), 200, REPLAY_HEADERS


REPLAY_HEADERS = {"Idempotent-Replayed": "true"}


def replay_view(services: Services, company_id: str, run_id: str) -> dict[str, Any]:
    """The answer to an idempotent repeat: the run the first request started, as it is now."""
    with services.db.session() as session:
        run = engine.get_run(session, company_id, run_id)
        rows = engine.step_runs(session, run.id)
    return ok(run_detail(run, rows))


@blp.route("/<string:workflow_id>/runs/batch")
class WorkflowRunsBatch(MethodView):
    @blp.doc(
        requestBody={"required": True, "content": {"application/json": {"schema": BatchTriggerDocSchema}}}
    )
    @blp.response(202, BatchResultEnvelope)
    @errors(blp, 403, 404, 413)
    def post(self, workflow_id: str) -> tuple[dict[str, Any], int]:
        """Trigger up to 1,000 runs at once; each item's result in order: created, replayed or invalid."""
        context.require(RUNS_WRITE)
        args = context.load_body(BatchTriggerSchema())
        results = engine.trigger_batch(context.services(), context.company_id(), workflow_id, args["items"])
        return ok({"items": [r.view() for r in results]}), 202


@blp.route("/<string:workflow_id>/deliveries")
class WorkflowDeliveries(MethodView):
    @blp.arguments(ListWorkflowsQuerySchema, location="query", error_status_code=400)
    @blp.response(200, DeliveryListEnvelope)
    @errors(blp, 404)
    def get(self, args: dict[str, Any], workflow_id: str) -> dict[str, Any]:
        """Webhook delivery log, newest first: what a sender sent, and why it was refused."""
        with context.services().db.session() as session:
            workflow = engine.get_workflow(session, context.company_id(), workflow_id)
            query = deliveries_query(context.company_id(), workflow.key)
            rows = list(
                session.execute(
                    page(
                        query,
                        WebhookDelivery.created_at,
                        WebhookDelivery.id,
                        args.get("cursor"),
                        args["limit"],
                    )
                ).scalars()
            )
        rows, page_meta = meta(rows, args["limit"])
        return ok(rows, page_meta)
