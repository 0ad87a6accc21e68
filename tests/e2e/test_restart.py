"""Retry and restart (time travel): new linked runs that reuse earlier step outputs unchanged."""

from __future__ import annotations

import pytest


@pytest.fixture
def three_steps(target, make_workflow):
    """step one calls /one, step two calls /two with input-derived JSON, step three transforms."""
    return make_workflow(
        [
            {"id": "one", "action": "http.request", "input": {"method": "POST", "url": f"{target.url}/one"}},
            {
                "id": "two",
                "action": "http.request",
                "input": {
                    "method": "POST",
                    "url": f"{target.url}/two",
                    "json": {
                        "endpoint": "{{ input.apiEndpoint }}",
                        "from": "{{ steps.one.output.body.token | default('none') }}",
                    },
                },
            },
            {
                "id": "three",
                "action": "transform",
                "input": {"got": "{{ steps.two.output.body.id | default('none') }}"},
            },
        ]
    )


def _paths(target):
    return [r["path"] for r in target.requests]


def test_retry_reuses_step_one_and_completes(worker, client, headers, target, three_steps, trigger, wait_run):
    target.reply(200, {"token": "t-1", "nested": {"list": [1, 2.5, None, "x"]}})
    target.reply(400, {"error": "bad"})
    original = wait_run(trigger(three_steps, {"apiEndpoint": "v1"})["id"])
    assert original["status"] == "failed" and original["error"]["code"] == "STEP_ERROR"
    assert _paths(target) == ["/one", "/two"]

    completed = client.post(f"/api/v1/runs/{original['id']}/retry", headers=headers)
    assert completed.status_code == 202, completed.get_json()
    data = completed.get_json()["data"]
    assert set(data) >= {
        "originalRunId",
        "newRunId",
        "workflowId",
        "restartFromStepId",
        "status",
        "createdAt",
    }
    assert data["originalRunId"] == original["id"] and data["restartFromStepId"] == "two"
    assert data["status"] == "pending" and data["newRunId"] != original["id"]

    target.reply(200, {"id": "crm-9"})
    new = wait_run(data["newRunId"])
    assert new["status"] == "completed", new
    assert _paths(target) == ["/one", "/two", "/two"], "step one must not be called again"
    assert new["restartedFromRunId"] == original["id"]
    reused, redone, last = new["stepResults"]
    assert reused["reused"] is True
    for field in ("output", "input", "startedAt", "completedAt", "durationMs", "attempt", "status"):
        assert reused[field] == original["stepResults"][0][field], field
    assert "reused" not in redone and last["output"] == {"got": "crm-9"}
    assert new["input"] == original["input"]


def test_retry_of_a_completed_run_is_invalid_state(
    worker, client, headers, target, three_steps, trigger, wait_run
):
    done = wait_run(trigger(three_steps, {"apiEndpoint": "v1"})["id"])
    assert done["status"] == "completed"
    response = client.post(f"/api/v1/runs/{done['id']}/retry", headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {
        "success": False,
        "error": {"code": "INVALID_STATE", "message": "Can only retry failed runs"},
    }


def test_restart_from_step_two_with_override(worker, client, headers, target, three_steps, trigger, wait_run):
    target.reply(200, {"token": "t-1"})
    target.reply(200, {"id": "a"})
    original = wait_run(trigger(three_steps, {"apiEndpoint": "v1", "keep": {"x": 1, "y": 2}})["id"])
    assert original["status"] == "completed"

    body = {"fromStepId": "two", "overrideInput": {"apiEndpoint": "v2", "keep": {"y": 3}}}
    response = client.post(f"/api/v1/runs/{original['id']}/restart", json=body, headers=headers)
    assert response.status_code == 202, response.get_json()
    target.reply(200, {"id": "b"})
    new = wait_run(response.get_json()["data"]["newRunId"])
    assert new["status"] == "completed"
    assert new["input"] == {"apiEndpoint": "v2", "keep": {"x": 1, "y": 3}}
    assert target.requests[-1]["json"] == {"endpoint": "v2", "from": "t-1"}
    assert [r["path"] for r in target.requests] == ["/one", "/two", "/two"]
    assert new["restartedFromRunId"] == original["id"] and new["restartFromStepId"] == "two"
    assert new["output"] == {"got": "b"}


def test_restart_errors(worker, client, headers, target, three_steps, trigger, wait_run):
    done = wait_run(trigger(three_steps, {"apiEndpoint": "v1"})["id"])
    url = f"/api/v1/runs/{done['id']}/restart"
    unknown = client.post(url, json={"fromStepId": "invalid-step-id"}, headers=headers)
    assert unknown.status_code == 400
    assert unknown.get_json()["error"] == {
        "code": "INVALID_STEP",
        "message": "Step not found: invalid-step-id",
    }
    missing = client.post(url, json={}, headers=headers)
    assert missing.status_code == 400 and "fromStepId" in missing.get_json()["error"]["details"]
    bad_override = client.post(url, json={"fromStepId": "two", "overrideInput": [1]}, headers=headers)
    assert bad_override.status_code == 400 and bad_override.get_json()["error"]["code"] == "VALIDATION_ERROR"
    assert (
        client.post(
            "/api/v1/runs/run_00000000-0000-0000-0000-000000000000/restart",
            json={"fromStepId": "two"},
            headers=headers,
        ).status_code
        == 404
    )


def test_restart_of_a_running_run_is_invalid_state(
    worker, client, headers, target, three_steps, trigger, wait_run
):
    target.delay_s = 1.0
    run = trigger(three_steps, {"apiEndpoint": "v1"})
    wait_run(run["id"], statuses=("running",))
    response = client.post(f"/api/v1/runs/{run['id']}/restart", json={"fromStepId": "one"}, headers=headers)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "INVALID_STATE"
    target.delay_s = 0
    wait_run(run["id"])


def test_idempotent_restart_and_dry_run(worker, client, headers, target, three_steps, trigger, wait_run):
    done = wait_run(trigger(three_steps, {"apiEndpoint": "v1"})["id"])
    url = f"/api/v1/runs/{done['id']}/restart"
    plan = client.post(url, json={"fromStepId": "three", "dryRun": True}, headers=headers)
    assert plan.status_code == 200
    planned = plan.get_json()["data"]
    assert planned["dryRun"] is True and planned["stepsToRun"] == ["three"]
    assert [s["stepId"] for s in planned["reusedSteps"]] == ["one", "two"]
    assert planned["workflowVersion"] == 1 and "newRunId" not in planned
    runs = client.get(f"/api/v1/runs?workflowId={three_steps}", headers=headers).get_json()["data"]
    assert len(runs) == 1, "a dry run creates nothing"

    key = {"Idempotency-Key": "double-click-1", **headers}
    first = client.post(url, json={"fromStepId": "three"}, headers=key)
    second = client.post(url, json={"fromStepId": "three"}, headers=key)
    assert first.status_code == 202 and second.status_code == 202
    assert first.get_json()["data"]["newRunId"] == second.get_json()["data"]["newRunId"]
    other = client.post(url, json={"fromStepId": "two"}, headers=key)
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "CONFLICT"
    runs = client.get(f"/api/v1/runs?workflowId={three_steps}", headers=headers).get_json()["data"]
    assert len(runs) == 2
    wait_run(first.get_json()["data"]["newRunId"])


def test_workflow_version_original_or_latest(worker, client, headers, target, three_steps, trigger, wait_run):
    done = wait_run(trigger(three_steps, {"apiEndpoint": "v1"})["id"])
    current = client.get(f"/api/v1/workflows/{three_steps}", headers=headers).get_json()["data"]
    steps = current["steps"]
    steps[2]["input"] = {"got": "{{ steps.two.output.body.id | default('none') }}", "version": 2}
    put = client.put(f"/api/v1/workflows/{three_steps}", json={"name": "v2", "steps": steps}, headers=headers)
    assert put.status_code == 200
    url = f"/api/v1/runs/{done['id']}/restart"
    original = client.post(url, json={"fromStepId": "three"}, headers=headers).get_json()["data"]
    latest = client.post(url, json={"fromStepId": "three", "workflowVersion": "latest"}, headers=headers)
    latest = latest.get_json()["data"]
    assert original["workflowVersion"] == 1 and latest["workflowVersion"] == 2
    assert "version" not in wait_run(original["newRunId"])["output"]
    assert wait_run(latest["newRunId"])["output"]["version"] == 2


def test_cancel_with_idempotency_key_answers_the_repeat(
    worker, client, headers, target, three_steps, trigger, wait_run
):
    target.delay_s = 0.5
    run = trigger(three_steps, {"apiEndpoint": "v1"})
    key = {"Idempotency-Key": "cancel-1", **headers}
    first = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=key)
    second = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=key)
    assert first.status_code == 200 and second.status_code == 200
    assert first.get_json() == second.get_json()
    without_key = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers)
    assert without_key.status_code == 400
    target.delay_s = 0
