"""Webhooks: a signed delivery starts a run (trigger type ``webhook``), once per delivery id."""

from __future__ import annotations

import time
from typing import Any

import redis
from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from sqlalchemy import select

from api import context
from api.docs import public_errors, replayed
from api.schemas.common import Timestamp, envelope, ok
from app import engine, ratelimit, secrets, webhooks
from app.errors import Unauthorized
from app.ids import WORKFLOW_ID, new_id
from app.services import Services
from app.timeutil import utcnow
from models import WebhookDelivery, Workflow

blp = Blueprint("webhooks", __name__, url_prefix="/api/v1/webhooks", description="Signed webhook deliveries")


class DeliveryResultSchema(Schema):
    runId = fields.String()
    workflowId = fields.String()
    deliveryId = fields.String(allow_none=True)
    duplicate = fields.Boolean()


DeliveryResultEnvelope = envelope("DeliveryResultEnvelope", DeliveryResultSchema)


def _input(body: bytes) -> Any:
    """A JSON body is the run input; anything else is wrapped with its content type."""
    try:
        parsed = context.parse_json(body) if body else {}
        if isinstance(parsed, dict):
            return parsed
        return {"body": parsed, "contentType": request.content_type or ""}
    except ValueError:
        return {"body": body.decode("utf-8", errors="replace"), "contentType": request.content_type or ""}


def _log(
    services: Services,
    workflow: Workflow,
    delivery_id: str | None,
    verified: bool,
    reason: str | None,
    run_id: str | None,
    duplicate: bool,
    status_code: int,
    row_id: str | None = None,
) -> None:
    with services.db.session() as session:
        session.add(
            WebhookDelivery(
                id=row_id or new_id("dlv"),
                company_id=workflow.company_id,
                workflow_key=workflow.key,
                workflow_id=workflow.id,
                created_at=utcnow(),
                delivery_id=delivery_id,
                verified=verified,
                reason=reason,
                run_id=run_id,
                duplicate=duplicate,
                status_code=status_code,
            )
        )
        session.commit()


REFUSED = "Invalid webhook signature"  # every refusal, whatever its reason: no existence oracle
REJECTIONS_LOGGED = 10  # per workflow and minute, each in full; past that they are only counted
COUNT_WINDOW_S = 60


def _targets(services: Services, workflow_id: str) -> list[tuple[Workflow, dict[str, Any]]]:
    """The live workflows of that id with a webhook trigger, each with its secrets resolved."""
    # A malformed id still costs the one query a real one does (and never reaches SQL as written).
    lookup = workflow_id if WORKFLOW_ID.match(workflow_id) else ""
    found = []
    with services.db.session() as session:
        query = select(Workflow).where(Workflow.id == lookup, Workflow.deleted_at.is_(None))
        for workflow in session.execute(query).scalars():
            definition = engine.definition_for(session, workflow.key, workflow.current_version)
            config = (definition.get("triggers") or {}).get("webhook")
            if config:
                found.append((workflow, config))
    # Stored encrypted: the references are resolved only for verification.
    return [(w, secrets.resolve_webhook(services, w.company_id, c)) for w, c in found]


Match = tuple[Workflow, dict[str, Any], str | None]  # the workflow, its trigger, the delivery id


def _match(
    targets: list[tuple[Workflow, dict[str, Any]]], body: bytes, run_input: Any
) -> tuple[Match | None, list[tuple[Workflow, str]]]:
    """The workflow whose secret verifies the delivery (or None), and why the others refused it."""
    headers = dict(request.headers)
    refusals = []
    for workflow, config in targets:
        try:
            return (workflow, config, webhooks.verify(config, headers, body, run_input)), refusals
        except webhooks.WebhookRejected as exc:
            refusals.append((workflow, str(exc)))
    if not targets:
        webhooks.verify_nothing(headers, body, run_input)  # the same work as a refused signature
    return None, refusals


def _refuse(services: Services, workflow_id: str, refusals: list[tuple[Workflow, str]]) -> Unauthorized:
    """Count the refusal (for every id alike) and log it for the workflows it was meant for: the
    first few of a minute in full, the rest in one summary row (rewritten at 1, 2, 4, 8… more)."""
    key = services.key("webhook-rejected", workflow_id, str(int(time.time() // COUNT_WINDOW_S)))
    try:
        count = int(services.redis.pipeline().incr(key).expire(key, 2 * COUNT_WINDOW_S).execute()[0])
    except redis.RedisError:
        count = 1  # uncounted: log it in full
    more = count - REJECTIONS_LOGGED
    for workflow, reason in refusals:
        if more <= 0:
            _log(services, workflow, request.headers.get("webhook-id"), False, reason, None, False, 401)
        elif more & (more - 1) == 0:
            _summarize(services, workflow, f"{key}:row:{workflow.company_id}", more, reason)
    return Unauthorized(REFUSED)


def _summarize(services: Services, workflow: Workflow, row_key: str, more: int, reason: str) -> None:
    """Write (or rewrite) this minute's summary row of counted rejections."""
    summary = f"at least {more} more rejected deliveries this minute were counted, not logged"
    summary += f" (last: {reason})"
    row_id = services.redis.get(row_key)
    if row_id is None:
        row_id = new_id("dlv")
        services.redis.set(row_key, row_id, ex=2 * COUNT_WINDOW_S)
        _log(services, workflow, None, False, summary[:500], None, False, 401, row_id=row_id)
        return
    with services.db.session() as session:
        row = session.get(WebhookDelivery, row_id.decode() if isinstance(row_id, bytes) else row_id)
        if row is not None:
            row.reason = summary[:500]
            session.commit()


@blp.route("/<string:workflow_id>")
class WebhookDeliveryView(MethodView):
    @blp.doc(security=[], requestBody={"content": {"application/json": {"schema": {"type": "object"}}}})
    @blp.response(202, DeliveryResultEnvelope)
    @replayed(blp, DeliveryResultEnvelope, "the run the first delivery started (duplicate: true)")
    @public_errors(blp, 400, 401, 413, 429, 503)
    def post(self, workflow_id: str) -> tuple[dict[str, Any], int]:
        """Receive a delivery: verify its signature, then start one run per signed delivery (202; 200)."""
        ratelimit.check_webhook(workflow_id)  # anonymous: limited per workflow (429), before any query
        # Parsed before the workflow is looked up: a too-deep body is the same 400 for every id.
        body = request.get_data(cache=True)
        run_input = _input(body)
        services = context.services()
        match, refusals = _match(_targets(services, workflow_id), body, run_input)
        if match is None:
            raise _refuse(services, workflow_id, refusals)
        workflow, config, delivery_id = match
        run, created = engine.trigger_run(
            services,
            workflow.company_id,
            workflow.id,
            run_input,
            "webhook",
            idempotency_key=webhooks.dedupe_key(config, delivery_id, body),
            fingerprint="webhook",
        )
        status = 202 if created else 200
        _log(services, workflow, delivery_id, True, None, run.id, not created, status)
        return ok(
            {"runId": run.id, "workflowId": workflow.id, "deliveryId": delivery_id, "duplicate": not created}
        ), status


class DeliverySchema(Schema):
    id = fields.String()
    receivedAt = Timestamp(attribute="created_at")
    deliveryId = fields.String(attribute="delivery_id", allow_none=True)
    verified = fields.Boolean()
    reason = fields.String(allow_none=True)
    runId = fields.String(attribute="run_id", allow_none=True)
    duplicate = fields.Boolean()
    statusCode = fields.Integer(attribute="status_code")


DeliveryListEnvelope = envelope("DeliveryListEnvelope", DeliverySchema, many=True, meta=True)


def deliveries_query(company_id: str, workflow_key: str) -> Any:
    return select(WebhookDelivery).where(
        WebhookDelivery.company_id == company_id, WebhookDelivery.workflow_key == workflow_key
    )
