"""Bulk actions: cancel or retry the runs a filter (or a list of ids) selects, in the background."""

from __future__ import annotations

from typing import Any

from flask import jsonify
from flask.views import MethodView
from flask_smorest import Blueprint

from api import context
from api.docs import REPLAYED_HEADERS, errors
from api.schemas.bulk import (
    BulkAcceptedEnvelope,
    BulkBodySchema,
    BulkDryRunEnvelope,
    BulkProgressEnvelope,
    BulkRetryBodySchema,
)
from api.schemas.common import ok
from app import bulk, engine
from app.errors import NotFound
from app.ids import BULK_ID
from app.keys import RUNS_READ, RUNS_WRITE
from app.timeutil import iso
from models import BulkAction, BulkKind

blp = Blueprint(
    "bulk",
    __name__,
    url_prefix="/api/v1",
    description="Cancel or retry many runs at once; the action runs in the background",
)
blp.before_request(context.authenticate)

_IDEMPOTENCY_DOC = {
    "parameters": [
        {
            "in": "header",
            "name": "Idempotency-Key",
            "schema": {"type": "string"},
            "description": "A repeat with the same key (24 h) answers with the same bulk action, acting once",
        }
    ]
}


def accepted(action: BulkAction) -> dict[str, Any]:
    return {"id": action.id, "action": action.action, "status": action.status}


def progress(action: BulkAction) -> dict[str, Any]:
    return {**accepted(action), "total": action.total, "done": action.done, "failed": action.failed}


def _request(kind: BulkKind, args: dict[str, Any]) -> tuple[bulk.Selection, dict[str, Any]]:
    """The selection, and the request as the action keeps it (times in the API's form)."""
    request: dict[str, Any] = {"action": kind.value}
    if "runIds" in args:
        ids = tuple(dict.fromkeys(args["runIds"]))  # each once, in the order given
        selection = bulk.Selection(
            kind, run_ids=ids, workflow_version=args.get("workflowVersion", "original")
        )
        request["runIds"] = list(ids)
    else:
        given = args["filter"]
        selection = bulk.Selection(
            kind,
            workflow_id=given.get("workflowId"),
            status=given.get("status"),
            trigger_type=given.get("triggerType"),
            created_after=given.get("createdAfter"),
            created_before=given.get("createdBefore"),
            workflow_version=args.get("workflowVersion", "original"),
        )
        request["filter"] = {k: iso(v) if k.startswith("created") else v for k, v in given.items()}
    if kind == BulkKind.RETRY:
        request["workflowVersion"] = selection.workflow_version
    return selection, request


def _post(kind: BulkKind, args: dict[str, Any]) -> Any:
    services, company_id = context.services(), context.company_id()
    selection, request = _request(kind, args)
    if args["dryRun"]:
        count, sample = bulk.preview(services, company_id, selection)
        # Its own shape, not the 202's: a response object passes the 202's schema by.
        return jsonify(BulkDryRunEnvelope().dump(ok({"count": count, "sampleRunIds": sample})))
    action, created = bulk.create(
        services,
        company_id,
        selection,
        request,
        idempotency_key=context.idempotency_key(),
        fingerprint=engine.request_hash(request),
    )
    return ok(accepted(action)), 202, {} if created else {"Idempotent-Replayed": "true"}


def _doc(schema: type) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        **_IDEMPOTENCY_DOC,
    }


@blp.route("/runs/bulk/cancel")
class BulkCancel(MethodView):
    @blp.doc(**_doc(BulkBodySchema))
    @blp.response(202, BulkAcceptedEnvelope, headers=REPLAYED_HEADERS)
    @blp.alt_response(
        200, schema=BulkDryRunEnvelope, description="dryRun: the count, nothing done", success=True
    )
    @errors(blp, 403, 409, 413)
    def post(self) -> Any:
        """Cancel every pending, running or suspended run the filter (or the id list) selects."""
        context.require(RUNS_WRITE)
        return _post(BulkKind.CANCEL, context.load_body(BulkBodySchema()))


@blp.route("/runs/bulk/retry")
class BulkRetry(MethodView):
    @blp.doc(**_doc(BulkRetryBodySchema))
    @blp.response(202, BulkAcceptedEnvelope, headers=REPLAYED_HEADERS)
    @blp.alt_response(
        200, schema=BulkDryRunEnvelope, description="dryRun: the count, nothing done", success=True
    )
    @errors(blp, 403, 409, 413)
    def post(self) -> Any:
        """Retry every failed or timed-out run the filter (or the id list) selects, each in a new run
        linked to it (as ``POST /runs/:id/retry``)."""
        context.require(RUNS_WRITE)
        return _post(BulkKind.RETRY, context.load_body(BulkRetryBodySchema()))


@blp.route("/bulk-actions/<string:bulk_id>")
class BulkActionItem(MethodView):
    @blp.response(200, BulkProgressEnvelope)
    @errors(blp, 403, 404)
    def get(self, bulk_id: str) -> dict[str, Any]:
        """A bulk action's progress: runs selected, acted on, and not acted on."""
        context.require(RUNS_READ)
        if not BULK_ID.match(bulk_id):
            raise NotFound("Bulk action not found")
        return ok(progress(bulk.get(context.services(), context.company_id(), bulk_id)))
