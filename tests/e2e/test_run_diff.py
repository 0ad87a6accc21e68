"""GET /runs/:id/diff: a restart compared with its original step by step, and its errors."""

from __future__ import annotations

from typing import Any

from tests.conftest import new_key
from tests.e2e.test_auth_errors import assert_error

STEPS = [
    {"id": "fetch", "action": "transform", "input": {"amount": "{{ input.amount }}", "tags": ["a", "b"]}},
    {"id": "charge", "action": "fail", "if": "{{ input.fail }}", "input": {"message": "card declined"}},
    {"id": "report", "action": "transform", "input": {"total": "{{ steps.fetch.output.amount * 2 }}"}},
]


def _diff(client: Any, headers: dict[str, str], run_id: str, against: str | None) -> Any:
    query = f"?against={against}" if against is not None else ""
    return client.get(f"/api/v1/runs/{run_id}/diff{query}", headers=headers)


def _restart(client: Any, headers: dict[str, str], run_id: str, step: str, override: dict) -> str:
    response = client.post(
        f"/api/v1/runs/{run_id}/restart",
        json={"fromStepId": step, "overrideInput": override},
        headers=headers,
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["data"]["newRunId"]


def test_a_restart_against_its_original_names_each_changed_path(
    worker, client, headers, make_workflow, trigger, wait_run
):
    wid = make_workflow(STEPS)
    original = wait_run(trigger(wid, {"amount": 5, "fail": True})["id"])
    assert original["status"] == "failed"
    fixed = wait_run(_restart(client, headers, original["id"], "fetch", {"amount": 6, "fail": False}))
    assert fixed["status"] == "completed"

    response = _diff(client, headers, fixed["id"], original["id"])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["success"] is True
    diff = body["data"]
    assert set(diff) == {"runId", "againstRunId", "steps"}
    assert (diff["runId"], diff["againstRunId"]) == (fixed["id"], original["id"])
    steps = {s["stepId"]: s for s in diff["steps"]}
    assert [s["stepId"] for s in diff["steps"]] == ["fetch", "charge", "report"]
    for entry in diff["steps"]:
        assert set(entry) == {"stepId", "status", "durationMs", "changes"}
        assert len(entry["durationMs"]) == 2

    fetch = steps["fetch"]
    assert fetch["status"] == ["success", "success"]
    assert fetch["changes"] == [
        {"path": "input.amount", "before": 5, "after": 6},
        {"path": "output.amount", "before": 5, "after": 6},
    ]
    assert steps["charge"]["status"] == ["skipped", "error"]
    error_change = [c for c in steps["charge"]["changes"] if c["path"] == "error"]
    assert error_change and error_change[0]["after"] is None
    assert error_change[0]["before"]["message"] == "card declined"
    assert steps["report"]["status"] == ["success", "skipped"]
    assert {"path": "output", "before": None, "after": {"total": 12}} in steps["report"]["changes"]

    # Restarting the fixed run from its last step reuses the others: they show no change.
    again = wait_run(_restart(client, headers, fixed["id"], "report", {}))
    diff = _diff(client, headers, again["id"], fixed["id"]).get_json()["data"]
    assert [s["changes"] for s in diff["steps"]] == [[], [], []]
    assert diff["steps"][0]["durationMs"][0] == diff["steps"][0]["durationMs"][1]  # the reused step's


def test_diff_errors(worker, client, headers, make_workflow, trigger, wait_run, services):
    wid = make_workflow(STEPS)
    other = make_workflow(STEPS)
    run = wait_run(trigger(wid, {"amount": 1, "fail": False})["id"])
    elsewhere = wait_run(trigger(other, {"amount": 1, "fail": False})["id"])

    error = assert_error(_diff(client, headers, run["id"], None), 400, "VALIDATION_ERROR")
    assert "against" in error["details"]
    error = assert_error(_diff(client, headers, run["id"], elsewhere["id"]), 400, "VALIDATION_ERROR")
    assert "different workflows" in error["message"] and "against" in error["details"]
    unknown = "run_00000000-0000-7000-8000-000000000000"
    assert_error(_diff(client, headers, run["id"], unknown), 404, "NOT_FOUND")
    assert_error(_diff(client, headers, unknown, run["id"]), 404, "NOT_FOUND")
    assert_error(_diff(client, headers, run["id"], "not-a-run"), 404, "NOT_FOUND")
    stranger = {"x-api-key": new_key(services, "stranger")}
    assert_error(_diff(client, stranger, run["id"], run["id"]), 404, "NOT_FOUND")
    # A run compared with itself: every step, no change.
    same = _diff(client, headers, run["id"], run["id"]).get_json()["data"]
    assert all(s["changes"] == [] for s in same["steps"])


def test_openapi_documents_the_diff(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    operation = spec["paths"]["/api/v1/runs/{run_id}/diff"]["get"]
    assert {"200", "400", "404"} <= set(operation["responses"])
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["against"]
    change = spec["components"]["schemas"]["Change"]["properties"]
    assert set(change) == {"path", "before", "after"}
