"""The Runs API responses, field for field as the spec shows them (list, get, logs, cancel)."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import requests

from tests import factories
from tests.spec_shapes import DETAIL_KEYS, LIST_ITEM_FIELDS, LIST_ITEM_KEYS, LOGS_KEYS, STEP_KEYS

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RUN_ID = re.compile(r"^run_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
CAMEL = re.compile(r"^[a-z][a-zA-Z]*$")

RUN_STATUSES = {"pending", "running", "completed", "failed", "cancelled", "suspended", "timeout"}
TRIGGER_TYPES = {"api", "webhook", "schedule", "manual"}
CANCEL_MESSAGE = "Run cancellation requested"
INVALID_CANCEL = "Can only cancel running or pending runs"


# --------------------------------------------------------------------------- helpers


def parse_ts(value: str) -> datetime:
    assert TIMESTAMP.match(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def epoch_ms(value: str) -> int:
    delta = parse_ts(value) - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return delta // timedelta(milliseconds=1)


def assert_timing(item: dict[str, Any]) -> None:
    """Timestamps in the spec's format; durationMs is exactly completedAt - startedAt."""
    for name in ("startedAt", "completedAt", "createdAt"):
        if name in item and item[name] is not None:
            assert TIMESTAMP.match(item[name]), (name, item[name])
    if item["startedAt"] is not None and item["completedAt"] is not None:
        assert item["durationMs"] == epoch_ms(item["completedAt"]) - epoch_ms(item["startedAt"]), item
        assert item["durationMs"] >= 0
    else:
        assert item["durationMs"] is None, item


def assert_error_object(error: Any) -> None:
    if error is not None:
        assert set(error) == {"code", "message"}, error
        assert isinstance(error["code"], str) and error["code"]
        assert isinstance(error["message"], str) and error["message"]


def assert_list_item(item: dict[str, Any]) -> None:
    assert set(item) == LIST_ITEM_KEYS, set(item) ^ LIST_ITEM_KEYS
    assert RUN_ID.match(item["id"]), item["id"]
    assert isinstance(item["workflowId"], str) and item["workflowId"]
    assert item["status"] in RUN_STATUSES
    assert item["triggerType"] in TRIGGER_TYPES
    assert TIMESTAMP.match(item["createdAt"])
    assert_timing(item)
    assert_error_object(item["error"])


def assert_step(step: dict[str, Any]) -> None:
    assert set(step) == STEP_KEYS, set(step) ^ STEP_KEYS
    assert isinstance(step["stepId"], str) and step["stepId"]
    assert isinstance(step["attempt"], int) and not isinstance(step["attempt"], bool)
    assert_timing(step)
    assert_error_object(step["error"])


def assert_detail(data: dict[str, Any]) -> None:
    assert DETAIL_KEYS <= set(data), DETAIL_KEYS - set(data)
    # Fields beyond the spec's are allowed, but they follow its camelCase convention.
    assert all(CAMEL.match(key) for key in data), sorted(data)
    assert_list_item({key: data[key] for key in LIST_ITEM_KEYS})
    assert isinstance(data["stepResults"], list)
    for step in data["stepResults"]:
        assert_step(step)


def assert_logs(data: dict[str, Any]) -> None:
    assert set(data) == LOGS_KEYS, set(data) ^ LOGS_KEYS
    assert RUN_ID.match(data["runId"])
    assert data["status"] in RUN_STATUSES
    assert_timing(data)
    assert_error_object(data["error"])
    assert isinstance(data["logs"], list)
    for entry in data["logs"]:
        assert_step(entry)


def ok_data(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["success"] is True
    return body["data"]


def insert_run(services: Any, workflow_id: str, **values: Any) -> str:
    """A run row written directly (no message enqueued), for states a worker would race with."""
    with services.db.session() as session:
        run = factories.run(session, workflow_id, with_steps=False, **values)
        session.commit()
    return run.id


def find(items: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    matches = [item for item in items if item["id"] == run_id]
    assert len(matches) == 1, (run_id, [item["id"] for item in items])
    return matches[0]


# --------------------------------------------------------------------------- completed run


def test_completed_run_shapes_across_list_get_and_logs(
    worker, client, headers, make_workflow, trigger, wait_run
):
    workflow_id = make_workflow(
        [
            {"id": "notify-team", "action": "transform", "input": {"text": "Invoice {{ input.id }} paid!"}},
            {
                "id": "create-contact",
                "action": "transform",
                "input": {"email": "{{ input.email }}", "amount": "{{ input.amount }}"},
            },
        ],
        output={"contactEmail": "{{ steps['create-contact'].output.email }}"},
    )
    run_input = {"id": "in_xxx", "email": "customer@example.com", "amount": 9900}
    created = trigger(workflow_id, run_input)
    assert RUN_ID.match(created["id"])
    assert created["status"] == "pending"
    assert created["triggerType"] == "api"
    assert created["startedAt"] is None and created["completedAt"] is None and created["durationMs"] is None
    done = wait_run(created["id"])

    data = ok_data(client.get(f"/api/v1/runs/{created['id']}", headers=headers))
    assert data == done
    assert_detail(data)
    assert data["id"] == created["id"]
    assert data["workflowId"] == workflow_id
    assert data["status"] == "completed"
    assert data["triggerType"] == "api"
    assert data["input"] == run_input
    assert data["output"] == {"contactEmail": "customer@example.com"}
    assert data["error"] is None
    assert data["createdAt"] == created["createdAt"]
    assert data["startedAt"] is not None and data["completedAt"] is not None
    assert parse_ts(data["createdAt"]) <= parse_ts(data["startedAt"]) <= parse_ts(data["completedAt"])
    assert [s["stepId"] for s in data["stepResults"]] == ["notify-team", "create-contact"]
    notify, contact = data["stepResults"]
    assert notify["status"] == contact["status"] == "success"
    assert notify["attempt"] == contact["attempt"] == 1
    assert notify["input"] == {"text": "Invoice in_xxx paid!"}
    assert notify["output"] == {"text": "Invoice in_xxx paid!"}
    assert contact["input"] == {"email": "customer@example.com", "amount": 9900}
    assert notify["error"] is None and contact["error"] is None
    # Steps lie inside the run and in order.
    assert parse_ts(data["startedAt"]) <= parse_ts(notify["startedAt"])
    assert parse_ts(notify["completedAt"]) <= parse_ts(contact["startedAt"])
    assert parse_ts(contact["completedAt"]) <= parse_ts(data["completedAt"])

    logs = ok_data(client.get(f"/api/v1/runs/{created['id']}/logs", headers=headers))
    assert_logs(logs)
    assert logs["runId"] == created["id"]
    assert logs["workflowId"] == workflow_id
    assert logs["status"] == "completed"
    assert logs["error"] is None
    for name in ("startedAt", "completedAt", "durationMs"):
        assert logs[name] == data[name]
    assert logs["logs"] == data["stepResults"]

    listed = ok_data(client.get("/api/v1/runs", headers=headers))
    item = find(listed, created["id"])
    assert_list_item(item)
    assert item == {key: data[key] for key in LIST_ITEM_KEYS}


def test_failed_run_with_retries_shapes(worker, client, headers, make_workflow, trigger, wait_run):
    workflow_id = make_workflow(
        [
            {"id": "prepare", "action": "transform", "input": {"recordId": "{{ input.recordId }}"}},
            {
                "id": "sync-to-crm",
                "action": "fail",
                "input": {"code": "RATE_LIMIT", "message": "API rate limit exceeded", "retriable": True},
                "retry": {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 0, "maxDelayMs": 0},
            },
            {"id": "never-reached", "action": "transform", "input": {}},
        ]
    )
    run_id = trigger(workflow_id, {"recordId": "123"})["id"]
    done = wait_run(run_id)
    assert done["status"] == "failed", done
    assert_detail(done)
    assert done["error"] == {"code": "STEP_ERROR", "message": "API rate limit exceeded"}
    assert done["output"] is None
    by_id = {s["stepId"]: s for s in done["stepResults"]}
    failed = by_id["sync-to-crm"]
    # The spec's "Failed Step Example": status error, output null, error {code, message}, last attempt.
    assert failed["status"] == "error"
    assert failed["output"] is None
    assert failed["error"] == {"code": "RATE_LIMIT", "message": "API rate limit exceeded"}
    assert failed["attempt"] == 3
    assert failed["input"] == {"code": "RATE_LIMIT", "message": "API rate limit exceeded", "retriable": True}
    assert by_id["prepare"]["status"] == "success"
    assert by_id["prepare"]["output"] == {"recordId": "123"}
    # A step after the failed one never starts: it is shown as skipped, with nothing recorded.
    assert by_id["never-reached"]["status"] == "skipped"
    assert by_id["never-reached"]["startedAt"] is None and by_id["never-reached"]["output"] is None

    logs = ok_data(client.get(f"/api/v1/runs/{run_id}/logs", headers=headers))
    assert_logs(logs)
    assert logs["status"] == "failed"
    assert logs["error"] == done["error"]
    assert [(e["stepId"], e["attempt"], e["status"]) for e in logs["logs"]] == [
        ("prepare", 1, "success"),
        ("sync-to-crm", 1, "error"),
        ("sync-to-crm", 2, "error"),
        ("sync-to-crm", 3, "error"),
    ]
    for entry in logs["logs"][1:]:
        assert entry["error"] == {"code": "RATE_LIMIT", "message": "API rate limit exceeded"}
        assert entry["output"] is None
        assert entry["completedAt"] is not None

    listed = ok_data(client.get("/api/v1/runs", query_string={"status": "failed"}, headers=headers))
    item = find(listed, run_id)
    assert_list_item(item)
    assert item["error"] == {"code": "STEP_ERROR", "message": "API rate limit exceeded"}


def test_spec_python_requests_example_over_http(
    worker, live_server, api_key, make_workflow, trigger, wait_run
):
    """The spec's own ``requests`` example, verbatim, against the API over real HTTP."""
    good = make_workflow([{"id": "ok", "action": "transform", "input": {"a": 1}}])
    bad = make_workflow([{"id": "boom", "action": "fail", "input": {"message": "Connection timeout"}}])
    failed_ids = [trigger(bad)["id"] for _ in range(3)]
    completed_id = trigger(good)["id"]
    for run_id in [*failed_ids, completed_id]:
        wait_run(run_id)

    url = live_server
    response = requests.get(
        url + "/api/v1/runs", params={"status": "failed", "limit": 20}, headers={"x-api-key": api_key}
    )
    data = response.json()

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert set(data) == {"success", "data", "meta"}
    assert data["success"] is True
    assert data["meta"] == {"cursor": None, "hasMore": False}
    assert sorted(item["id"] for item in data["data"]) == sorted(failed_ids)
    for item in data["data"]:
        assert_list_item(item)
        assert item["status"] == "failed"
        assert item["workflowId"] == bad
        assert item["error"] == {"code": "STEP_ERROR", "message": "Connection timeout"}
    # Newest first.
    keys = [(epoch_ms(item["createdAt"]), item["id"]) for item in data["data"]]
    assert keys == sorted(keys, reverse=True)

    response = requests.get(url + "/api/v1/runs", params={"limit": 2}, headers={"x-api-key": api_key})
    page = response.json()
    assert response.status_code == 200
    assert len(page["data"]) == 2 and page["meta"]["hasMore"] is True
    assert isinstance(page["meta"]["cursor"], str)


def test_list_renders_the_spec_example_to_the_letter(client, headers, services, make_workflow):
    """Rows holding the spec's example values render exactly as the spec prints them."""
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    ten_thirty = datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc)
    ten_twenty_five = datetime(2024, 1, 15, 10, 25, tzinfo=timezone.utc)
    first = insert_run(
        services,
        workflow_id,
        status="completed",
        trigger_type="webhook",
        created_at=ten_thirty,
        started_at=ten_thirty,
        completed_at=ten_thirty + timedelta(seconds=5),
        duration_ms=5000,
    )
    second = insert_run(
        services,
        workflow_id,
        status="failed",
        trigger_type="api",
        created_at=ten_twenty_five,
        started_at=ten_twenty_five,
        completed_at=ten_twenty_five + timedelta(seconds=2),
        duration_ms=2000,
        error={"code": "STEP_ERROR", "message": "Connection timeout"},
    )
    response = client.get("/api/v1/runs", headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {
        "success": True,
        "data": [
            {
                "id": first,
                "workflowId": workflow_id,
                "status": "completed",
                "triggerType": "webhook",
                "startedAt": "2024-01-15T10:30:00.000Z",
                "completedAt": "2024-01-15T10:30:05.000Z",
                "durationMs": 5000,
                "error": None,
                "createdAt": "2024-01-15T10:30:00.000Z",
            },
            {
                "id": second,
                "workflowId": workflow_id,
                "status": "failed",
                "triggerType": "api",
                "startedAt": "2024-01-15T10:25:00.000Z",
                "completedAt": "2024-01-15T10:25:02.000Z",
                "durationMs": 2000,
                "error": {"code": "STEP_ERROR", "message": "Connection timeout"},
                "createdAt": "2024-01-15T10:25:00.000Z",
            },
        ],
        "meta": {"cursor": None, "hasMore": False},
    }
    # The key order of the spec is kept too.
    assert tuple(response.get_json()["data"][0]) == LIST_ITEM_FIELDS


def test_timestamps_render_milliseconds_of_sub_millisecond_values(client, headers, services, make_workflow):
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    created = datetime(2024, 2, 29, 23, 59, 59, 987_654, tzinfo=timezone.utc)
    run_id = insert_run(
        services,
        workflow_id,
        status="completed",
        created_at=created,
        started_at=datetime(2024, 3, 1, 0, 0, 0, 5_000, tzinfo=timezone.utc),
        completed_at=datetime(2024, 3, 1, 0, 0, 1, 4_000, tzinfo=timezone.utc),
        duration_ms=999,
    )
    data = ok_data(client.get(f"/api/v1/runs/{run_id}", headers=headers))
    assert data["createdAt"] == "2024-02-29T23:59:59.987Z"
    assert data["startedAt"] == "2024-03-01T00:00:00.005Z"
    assert data["completedAt"] == "2024-03-01T00:00:01.004Z"
    assert_detail(data)


def test_pending_run_shapes(client, headers, services, make_workflow):
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    run_id = insert_run(services, workflow_id, input={"type": "invoice.paid"}, trigger_type="manual")
    data = ok_data(client.get(f"/api/v1/runs/{run_id}", headers=headers))
    assert_detail(data)
    assert data["status"] == "pending"
    assert data["triggerType"] == "manual"
    assert data["input"] == {"type": "invoice.paid"}
    assert data["output"] is None and data["error"] is None
    assert data["startedAt"] is None and data["completedAt"] is None and data["durationMs"] is None
    assert data["stepResults"] == []
    logs = ok_data(client.get(f"/api/v1/runs/{run_id}/logs", headers=headers))
    assert_logs(logs)
    assert logs["runId"] == run_id and logs["status"] == "pending" and logs["logs"] == []


def test_trigger_types_are_reported(client, headers, services, make_workflow):
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    ids = {kind: insert_run(services, workflow_id, trigger_type=kind) for kind in sorted(TRIGGER_TYPES)}
    listed = ok_data(client.get("/api/v1/runs", headers=headers))
    for kind, run_id in ids.items():
        assert find(listed, run_id)["triggerType"] == kind
    response = client.post(
        f"/api/v1/workflows/{workflow_id}/runs",
        json={"input": {"x": 1}, "triggerType": "manual"},
        headers=headers,
    )
    manual = ok_data(response, 202)
    assert manual["triggerType"] == "manual"
    assert manual["input"] == {"x": 1}


def test_runs_of_a_deleted_workflow_stay_readable(client, headers, services, make_workflow):
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    run_id = insert_run(services, workflow_id, status="failed", error={"code": "STEP_ERROR", "message": "x"})
    assert client.delete(f"/api/v1/workflows/{workflow_id}", headers=headers).status_code == 200
    data = ok_data(client.get(f"/api/v1/runs/{run_id}", headers=headers))
    assert data["workflowId"] == workflow_id and data["status"] == "failed"
    logs = ok_data(client.get(f"/api/v1/runs/{run_id}/logs", headers=headers))
    assert logs["runId"] == run_id
    listed = ok_data(client.get("/api/v1/runs", query_string={"workflowId": workflow_id}, headers=headers))
    assert [item["id"] for item in listed] == [run_id]


# --------------------------------------------------------------------------- cancel


def test_cancel_pending_run_response_and_effect(client, headers, services, make_workflow):
    workflow_id = make_workflow([{"id": "step", "action": "transform", "input": {}}])
    run_id = insert_run(services, workflow_id)
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {
        "success": True,
        "data": {"id": run_id, "status": "cancelled", "message": CANCEL_MESSAGE},
    }
    data = ok_data(client.get(f"/api/v1/runs/{run_id}", headers=headers))
    assert_detail(data)
    assert data["status"] == "cancelled"
    assert data["completedAt"] is not None
    assert services.is_cancel_requested(run_id)
    listed = ok_data(client.get("/api/v1/runs", query_string={"status": "cancelled"}, headers=headers))
    assert [item["id"] for item in listed] == [run_id]


def test_cancel_running_run_over_http(worker, live_server, api_key, target, make_workflow, wait_run):
    """Cancel over real HTTP while the first step is executing: no later step starts."""
    target.delay_s = 1.0
    workflow_id = make_workflow(
        [
            {"id": "slow-call", "action": "http.request", "input": {"method": "GET", "url": target.url}},
            {"id": "after", "action": "transform", "input": {"never": True}},
        ]
    )
    auth = {"x-api-key": api_key}
    response = requests.post(
        f"{live_server}/api/v1/workflows/{workflow_id}/runs", json={"input": {"k": "v"}}, headers=auth
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["data"]["id"]
    running = wait_run(run_id, statuses=("running",))
    assert_detail(running)
    assert running["startedAt"] is not None
    assert running["completedAt"] is None and running["durationMs"] is None

    response = requests.post(f"{live_server}/api/v1/runs/{run_id}/cancel", headers=auth)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "data": {"id": run_id, "status": "cancelled", "message": CANCEL_MESSAGE},
    }

    # The step in flight finishes and is recorded; nothing after it runs; the run stays cancelled.
    deadline = time.monotonic() + 20
    while True:
        data = requests.get(f"{live_server}/api/v1/runs/{run_id}", headers=auth).json()["data"]
        steps = {s["stepId"]: s for s in data["stepResults"]}
        if steps.get("slow-call", {}).get("status") not in (None, "running"):
            break
        assert time.monotonic() < deadline, data
        time.sleep(0.05)
    assert_detail(data)
    assert data["status"] == "cancelled"
    assert data["completedAt"] is not None
    assert_timing(data)
    assert steps["after"]["status"] == "skipped"
    assert steps["after"]["output"] is None
    assert len(target.requests) == 1

    response = requests.post(f"{live_server}/api/v1/runs/{run_id}/cancel", headers=auth)
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": {"code": "INVALID_STATE", "message": INVALID_CANCEL},
    }


def test_cancel_completed_run_is_invalid_state(worker, client, headers, make_workflow, trigger, wait_run):
    workflow_id = make_workflow([{"id": "only", "action": "transform", "input": {"v": 1}}])
    run_id = trigger(workflow_id)["id"]
    done = wait_run(run_id)
    assert done["status"] == "completed"
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {
        "success": False,
        "error": {"code": "INVALID_STATE", "message": INVALID_CANCEL},
    }
    after = ok_data(client.get(f"/api/v1/runs/{run_id}", headers=headers))
    assert after == done
