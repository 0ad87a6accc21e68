"""Webhooks: a signed delivery starts a run (trigger type ``webhook``), once per delivery id."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import redis
from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from sqlalchemy import select

from api import context
from api.schemas.common import Timestamp, envelope, ok
from app import engine, ratelimit, secrets, webhooks
from app.errors import NotFound, Unauthorized
from app.ids import WORKFLOW_ID, new_id
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
    workflow: Workflow,
    delivery_id: str | None,
    verified: bool,
    reason: str | None,
    run_id: str | None,
    duplicate: bool,
    status_code: int,
    row_id: str | None = None,
) -> None:
    with context.services().db.session() as session:
        session.add(
            WebhookDelivery(
                id=row_id or new_id("dlv"),
                company_id=workflow.company_id,
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


REJECTIONS_LOGGED = 10  # per workflow and minute, each in full; past that they are only counted
COUNT_WINDOW_S = 60


def _log_rejected(workflow: Workflow, delivery_id: str | None, reason: str) -> None:
    """A refused delivery: the first few of a minute are logged in full, the rest counted in Redis and
    shown by one summary row (rewritten at 1, 2, 4, 8… so a flood costs a handful of writes)."""
    services = context.services()
    key = services.key("webhook-rejected", workflow.id, str(int(time.time() // COUNT_WINDOW_S)))
    try:
        count = int(services.redis.pipeline().incr(key).expire(key, 2 * COUNT_WINDOW_S).execute()[0])
    except redis.RedisError:
        count = 1  # uncounted: log it in full
    if count <= REJECTIONS_LOGGED:
        _log(workflow, delivery_id, False, reason, None, False, 401)
        return
    more = count - REJECTIONS_LOGGED
    if more & (more - 1) == 0:
        _summarize(workflow, f"{key}:row", more, reason)


def _summarize(workflow: Workflow, row_key: str, more: int, reason: str) -> None:
    """Write (or rewrite) this minute's summary row of counted rejections."""
    services = context.services()
    text = f"at least {more} more rejected deliveries this minute were counted, not logged (last: {reason})"
    row_id = services.redis.get(row_key)
    if row_id is None:
        row_id = new_id("dlv")
        services.redis.set(row_key, row_id, ex=2 * COUNT_WINDOW_S)
        _log(workflow, None, False, text[:500], None, False, 401, row_id=row_id)
        return
    with services.db.session() as session:
        row = session.get(WebhookDelivery, row_id.decode() if isinstance(row_id, bytes) else row_id)
        if row is not None:
            row.reason = text[:500]
            session.commit()


@blp.route("/<string:workflow_id>")
class WebhookDeliveryView(MethodView):
    @blp.doc(security=[], requestBody={"content": {"application/json": {"schema": {"type": "object"}}}})
    @blp.response(202, DeliveryResultEnvelope)
    def post(self, workflow_id: str) -> tuple[dict[str, Any], int]:
        """Receive a delivery: verify its signature, then start one run per delivery id (202; repeat 200)."""
        ratelimit.check_webhook(workflow_id)  # anonymous: limited per workflow (429), before any query
        # Parsed before the workflow is looked up: a too-deep body is the same 400 for every id.
        body = request.get_data(cache=True)
        run_input = _input(body)
        services = context.services()
        with services.db.session() as session:
            workflow = session.get(Workflow, workflow_id) if WORKFLOW_ID.match(workflow_id) else None
            if workflow is None or workflow.deleted_at is not None:
                raise NotFound("Workflow not found")
            definition = engine.definition_for(session, workflow.id, workflow.current_version)
        config = (definition.get("triggers") or {}).get("webhook")
        if not config:
            raise NotFound("Workflow has no webhook trigger")
        config = secrets.resolve_webhook(services, workflow.company_id, config)  # stored encrypted
        try:
            delivery_id = webhooks.verify(config, dict(request.headers), body, run_input)
        except webhooks.WebhookRejected as exc:
            _log_rejected(workflow, request.headers.get("webhook-id"), str(exc))
            raise Unauthorized(f"Webhook signature rejected: {exc}") from None
        # Without a sender id, the body's hash stands in: an identical retry is still one run.
        key = f"webhook:{delivery_id or hashlib.sha256(body).hexdigest()}"
        run, created = engine.trigger_run(
            services,
            workflow.company_id,
            workflow.id,
            run_input,
            "webhook",
            idempotency_key=key[:255],
            fingerprint="webhook",
        )
        status = 202 if created else 200
        _log(workflow, delivery_id, True, None, run.id, not created, status)
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


def deliveries_query(company_id: str, workflow_id: str) -> Any:
    return select(WebhookDelivery).where(
        WebhookDelivery.company_id == company_id, WebhookDelivery.workflow_id == workflow_id
    )
