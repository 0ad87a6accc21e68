"""Bulk cancel and retry over the API: dry run, the background action and its progress, links like
a single retry's, idempotency, validation, scopes and tenant isolation (in-process API and worker)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from app.keys import RUNS_READ, RUNS_WRITE
from app.timeutil import iso, utcnow
from tests import factories
from tests.conftest import new_key, wait_for
from tests.e2e.test_auth_errors import assert_error

UUID = "00000000-0000-7000-8000-000000000000"
STEPS = [
    {"id": "first", "action": "transform", "input": {"n": 1}},
    {"id": "second", "action": "transform", "input": {"n": "{{ input.n | default(0) }}"}},
]


def _runs(services: Any, workflow_id: str, status: str, count: int, **fields: Any) -> list[str]:
    """``count`` runs in ``status`` written by the factory (no message sent), oldest first."""
    ids = []
    start = utcnow() - timedelta(minutes=10)
    with services.db.session() as session:
        for i in range(count):
            steps = (
                {"first": {"status": "success"}, "second": {"status": "error"}}
                if status == "failed"
                else None
            )
            created = fields.pop("created_at", None) or start + timedelta(seconds=i)
            ids.append(factories.run(session, workflow_id, status, steps, created_at=created, **fields).id)
        session.commit()
    return ids


def _post(client: Any, headers: dict[str, str], action: str, body: Any, **extra: str) -> Any:
    return client.post(f"/api/v1/runs/bulk/{action}", json=body, headers={**headers, **extra})


def _wait_done(client: Any, headers: dict[str, str], bulk_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        response = client.get(f"/api/v1/bulk-actions/{bulk_id}", headers=headers)
        assert response.status_code == 200, response.get_json()
        data = response.get_json()["data"]
        return data if data["status"] != "running" else None

    return wait_for(finished, 30, f"bulk action {bulk_id} to finish")


def test_bulk_retry_dry_run_then_retries_each_failed_run_in_a_linked_run(
    worker, client, headers, make_workflow, services, wait_run
):
    wid = make_workflow(STEPS)
    other = make_workflow(STEPS)
    failed = _runs(services, wid, "failed", 5)
    _runs(services, wid, "completed", 2)  # not retriable: never selected
    _runs(services, other, "failed", 1)  # another workflow
    body = {"filter": {"workflowId": wid, "status": "failed"}}

    dry = _post(client, headers, "retry", {**body, "dryRun": True})
    assert dry.status_code == 200, dry.get_json()
    assert dry.get_json() == {"success": True, "data": {"count": 5, "sampleRunIds": failed}}
    assert (
        _post(client, headers, "retry", {"filter": {"workflowId": wid}, "dryRun": True}).get_json()["data"][
            "count"
        ]
        == 5
    )  # without a status: the statuses a retry applies to

    response = _post(client, headers, "retry", body)
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()["data"]
    assert set(accepted) == {"id", "action", "status"}
    assert accepted["action"] == "retry" and accepted["status"] == "running"
    assert accepted["id"].startswith("bulk_")

    progress = _wait_done(client, headers, accepted["id"])
    assert progress == {
        "id": accepted["id"],
        "action": "retry",
        "status": "completed",
        "total": 5,
        "done": 5,
        "failed": 0,
    }
    for run_id in failed:
        original = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        [child_id] = original["restartedRunIds"]
        child = wait_run(child_id)
        # Linked exactly as POST /runs/:id/retry links it: from the first failed step, first reused.
        assert child["restartedFromRunId"] == run_id and child["restartFromStepId"] == "second"
        assert child["status"] == "completed"
        assert [s.get("reused", False) for s in child["stepResults"]] == [True, False]
    # The retried runs are failed still: a second bulk retry would retry them again (a new action).
    assert _post(client, headers, "retry", {**body, "dryRun": True}).get_json()["data"]["count"] == 5


def test_bulk_cancel_by_ids_cancels_only_the_companys_live_runs(
    worker, client, headers, make_workflow, services
):
    wid = make_workflow(STEPS)
    pending = _runs(services, wid, "pending", 3)
    finished = _runs(services, wid, "completed", 1)
    stranger = new_key(services, "stranger")
    foreign_wid = client.post(
        "/api/v1/workflows", json={"name": "x", "steps": STEPS}, headers={"x-api-key": stranger}
    ).get_json()["data"]["id"]
    foreign = _runs(services, foreign_wid, "pending", 1)
    ids = [*pending, *finished, *foreign, pending[0]]

    dry = _post(client, headers, "cancel", {"runIds": ids, "dryRun": True}).get_json()["data"]
    assert dry == {"count": 3, "sampleRunIds": pending}
    response = _post(client, headers, "cancel", {"runIds": ids})
    assert response.status_code == 202, response.get_json()
    progress = _wait_done(client, headers, response.get_json()["data"]["id"])
    assert (progress["status"], progress["total"], progress["done"], progress["failed"]) == (
        "completed",
        3,
        3,
        0,
    )
    for run_id in pending:
        assert (
            client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]["status"] == "cancelled"
        )
    assert (
        client.get(f"/api/v1/runs/{finished[0]}", headers=headers).get_json()["data"]["status"] == "completed"
    )
    foreign_run = client.get(f"/api/v1/runs/{foreign[0]}", headers={"x-api-key": stranger}).get_json()["data"]
    assert foreign_run["status"] == "pending"
    # Another company can neither read this action nor see it exists.
    assert_error(
        client.get(f"/api/v1/bulk-actions/{progress['id']}", headers={"x-api-key": stranger}),
        404,
        "NOT_FOUND",
    )


def test_bulk_cancel_by_filter_of_trigger_type_and_time_window(
    worker, client, headers, make_workflow, services
):
    wid = make_workflow(STEPS)
    old, inside, late = (_runs(services, wid, "running", 1) for _ in range(3))
    with services.db.session() as session:
        from models import Run

        now = utcnow()
        for run_id, minutes, trigger in (
            (old[0], 120, "webhook"),
            (inside[0], 30, "webhook"),
            (late[0], 30, "api"),
        ):
            row = session.get(Run, run_id)
            row.created_at, row.trigger_type = now - timedelta(minutes=minutes), trigger
        session.commit()
    window = {
        "createdAfter": iso(now - timedelta(hours=1)),
        "createdBefore": iso(now),
        "triggerType": "webhook",
    }
    dry = _post(client, headers, "cancel", {"filter": window, "dryRun": True}).get_json()["data"]
    assert dry == {"count": 1, "sampleRunIds": inside}
    response = _post(client, headers, "cancel", {"filter": {**window, "status": "running"}})
    assert _wait_done(client, headers, response.get_json()["data"]["id"])["done"] == 1
    statuses = {
        r: client.get(f"/api/v1/runs/{r}", headers=headers).get_json()["data"]["status"]
        for r in (*old, *inside, *late)
    }
    assert statuses == {old[0]: "running", inside[0]: "cancelled", late[0]: "running"}


def test_the_same_idempotency_key_answers_with_the_same_action_and_acts_once(
    worker, client, headers, make_workflow, services
):
    wid = make_workflow(STEPS)
    failed = _runs(services, wid, "failed", 3)
    body = {"runIds": failed}
    first = _post(client, headers, "retry", body, **{"Idempotency-Key": "nightly-fix"})
    again = _post(client, headers, "retry", body, **{"Idempotency-Key": "nightly-fix"})
    assert first.status_code == again.status_code == 202
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    bulk_id = first.get_json()["data"]["id"]
    assert again.get_json()["data"]["id"] == bulk_id
    _wait_done(client, headers, bulk_id)
    third = _post(client, headers, "retry", body, **{"Idempotency-Key": "nightly-fix"})
    assert third.get_json()["data"] == {"id": bulk_id, "action": "retry", "status": "completed"}
    for run_id in failed:
        original = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        assert len(original["restartedRunIds"]) == 1
    # The key with another body is a conflict; a dry run ignores the key.
    assert_error(
        _post(client, headers, "retry", {"runIds": failed[:1]}, **{"Idempotency-Key": "nightly-fix"}),
        409,
        "CONFLICT",
    )
    dry = _post(client, headers, "retry", {**body, "dryRun": True}, **{"Idempotency-Key": "nightly-fix"})
    assert dry.status_code == 200 and dry.get_json()["data"]["count"] == 3
    # Keys belong to a company: another company's same key makes its own (empty) action.
    stranger = {"x-api-key": new_key(services, "stranger")}
    theirs = _post(client, stranger, "retry", body, **{"Idempotency-Key": "nightly-fix"})
    assert theirs.status_code == 202 and theirs.get_json()["data"]["id"] != bulk_id
    assert _wait_done(client, stranger, theirs.get_json()["data"]["id"])["total"] == 0


def test_an_empty_selection_is_an_action_completed_at_once(client, headers, make_workflow):
    wid = make_workflow(STEPS)
    response = _post(client, headers, "cancel", {"filter": {"workflowId": wid}})
    assert response.status_code == 202
    bulk_id = response.get_json()["data"]["id"]
    data = client.get(f"/api/v1/bulk-actions/{bulk_id}", headers=headers).get_json()["data"]
    assert data == {
        "id": bulk_id,
        "action": "cancel",
        "status": "completed",
        "total": 0,
        "done": 0,
        "failed": 0,
    }


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("retry", {}, "filter"),
        ("retry", {"filter": {}}, "filter"),
        ("retry", {"filter": {"status": "failed"}, "runIds": [f"run_{UUID}"]}, "filter"),
        ("retry", {"filter": {"status": "completed"}}, "filter.status"),
        ("cancel", {"filter": {"status": "failed"}}, "filter.status"),
        ("cancel", {"filter": {"status": "nope"}}, "filter.status"),
        ("cancel", {"filter": {"workflowId": "not-an-id"}}, "filter.workflowId"),
        ("cancel", {"filter": {"createdAfter": "yesterday"}}, "filter.createdAfter"),
        ("cancel", {"filter": {"flavour": "x"}}, "filter.flavour"),
        ("cancel", {"runIds": []}, "runIds"),
        ("cancel", {"runIds": ["run_nope"]}, "runIds.0"),
        ("cancel", {"runIds": "run_x"}, "runIds"),
        ("cancel", {"filter": {"status": "running"}, "workflowVersion": "latest"}, "workflowVersion"),
        ("retry", {"filter": {"status": "failed"}, "workflowVersion": "newest"}, "workflowVersion"),
        ("retry", {"filter": {"status": "failed"}, "dryRun": "maybe"}, "dryRun"),
    ],
)
def test_a_bad_body_is_a_validation_error_naming_the_field(client, headers, action, body, field):
    error = assert_error(_post(client, headers, action, body), 400, "VALIDATION_ERROR")
    assert field in error["details"], error


def test_more_than_a_thousand_run_ids_is_refused(client, headers):
    ids = [f"run_00000000-0000-7000-8000-{i:012d}" for i in range(1001)]
    error = assert_error(_post(client, headers, "cancel", {"runIds": ids}), 400, "VALIDATION_ERROR")
    assert "runIds" in error["details"]


def test_scopes_and_unknown_actions(client, services):
    from app import keys

    with services.db.session() as session:
        company = factories.company(session)
        reader_key = keys.create_key(session, company, "r", [RUNS_READ])
        writer_key = keys.create_key(session, company, "w", [RUNS_WRITE])
        session.commit()
    body = {"filter": {"status": "failed"}}
    assert_error(_post(client, {"x-api-key": reader_key}, "retry", body), 403, "FORBIDDEN")
    assert_error(_post(client, {"x-api-key": reader_key}, "cancel", {"bad": 1}), 403, "FORBIDDEN")
    accepted = _post(client, {"x-api-key": writer_key}, "retry", body)
    assert accepted.status_code == 202
    bulk_id = accepted.get_json()["data"]["id"]
    assert_error(
        client.get(f"/api/v1/bulk-actions/{bulk_id}", headers={"x-api-key": writer_key}), 403, "FORBIDDEN"
    )
    assert client.get(f"/api/v1/bulk-actions/{bulk_id}", headers={"x-api-key": reader_key}).status_code == 200
    for missing in ("bulk_00000000-0000-7000-8000-000000000000", "nope", bulk_id + "x"):
        assert_error(
            client.get(f"/api/v1/bulk-actions/{missing}", headers={"x-api-key": reader_key}), 404, "NOT_FOUND"
        )
    assert_error(
        client.post("/api/v1/runs/bulk/restart", json=body, headers={"x-api-key": writer_key}),
        404,
        "NOT_FOUND",
    )


def test_openapi_documents_the_bulk_routes(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    for path in ("/api/v1/runs/bulk/cancel", "/api/v1/runs/bulk/retry"):
        operation = spec["paths"][path]["post"]
        assert {"200", "202", "400", "403", "409"} <= set(operation["responses"])
        assert "requestBody" in operation
    assert {"200", "404"} <= set(spec["paths"]["/api/v1/bulk-actions/{bulk_id}"]["get"]["responses"])
    progress = spec["components"]["schemas"]["BulkProgress"]["properties"]
    assert set(progress) == {"id", "action", "status", "total", "done", "failed"}
