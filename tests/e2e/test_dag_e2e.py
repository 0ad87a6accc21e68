"""Parallel steps (``needs``) through the API and a real worker: a diamond's branches overlap, a
cycle is refused naming its steps, a restart from one branch re-runs it and what needs it only."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _diamond(target: Any) -> list[dict[str, Any]]:
    """a → (b, c) → d; a, b and c each call the target (1 s each), d joins their outputs."""

    def call(step_id: str, **extra: Any) -> dict[str, Any]:
        return {"id": step_id, "action": "http.request", "input": {"url": f"{target.url}/{step_id}"}, **extra}

    return [
        call("a"),
        call("b"),
        call("c", needs=["a"]),
        {
            "id": "d",
            "action": "transform",
            "needs": ["b", "c"],
            "input": {"b": "{{ steps.b.output.status }}", "c": "{{ steps.c.output.status }}"},
        },
    ]


def test_a_diamond_runs_its_branches_at_once(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    target.delay_s = 1.0
    wid = make_workflow(_diamond(target))
    done = wait_run(trigger(wid)["id"], timeout=30)
    target.delay_s = 0
    assert done["status"] == "completed", done
    a, b, c, d = done["stepResults"]
    assert [s["stepId"] for s in (a, b, c, d)] == ["a", "b", "c", "d"], "definition order"
    assert _at(b["startedAt"]) < _at(c["completedAt"]) and _at(c["startedAt"]) < _at(b["completedAt"]), (
        "b and c overlap"
    )
    assert _at(b["startedAt"]) >= _at(a["completedAt"]) and _at(d["startedAt"]) >= _at(c["completedAt"])
    assert done["output"] == {"b": 200, "c": 200}
    print(f"\ndiamond of three 1 s calls: {done['durationMs']} ms (a chain would take 3,000+)")
    assert sorted(r["path"] for r in target.requests) == ["/a", "/b", "/c"]

    # Restart from c: c and d run again, a and b are reused (no second call to them).
    before = len(target.requests)
    response = client.post(f"/api/v1/runs/{done['id']}/restart", json={"fromStepId": "c"}, headers=headers)
    assert response.status_code == 202, response.get_json()
    again = wait_run(response.get_json()["data"]["newRunId"], timeout=30)
    assert again["status"] == "completed", again
    assert [r["path"] for r in target.requests[before:]] == ["/c"]
    reused = [s["stepId"] for s in again["stepResults"] if s.get("reused")]
    assert reused == ["a", "b"]


def test_a_restart_dry_run_lists_the_branch_and_its_descendants(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    done = wait_run(trigger(make_workflow(_diamond(target)))["id"], timeout=30)
    body = {"fromStepId": "c", "dryRun": True}
    response = client.post(f"/api/v1/runs/{done['id']}/restart", json=body, headers=headers)
    assert response.status_code == 200, response.get_json()
    data = response.get_json()["data"]
    assert data["stepsToRun"] == ["c", "d"]
    assert [s["stepId"] for s in data["reusedSteps"]] == ["a", "b"]


def test_a_cycle_is_refused_naming_its_steps(client, headers):
    steps = [
        {"id": "a", "action": "transform", "needs": ["c"]},
        {"id": "b", "action": "transform"},
        {"id": "c", "action": "transform"},
    ]
    response = client.post("/api/v1/workflows", json={"name": "loop", "steps": steps}, headers=headers)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert "cycle" in error["message"] and all(name in error["message"] for name in ("a", "b", "c"))
    unknown = [{"id": "a", "action": "transform", "needs": ["nope"]}]
    response = client.post("/api/v1/workflows", json={"name": "x", "steps": unknown}, headers=headers)
    assert response.status_code == 400 and "nope" in response.get_json()["error"]["message"]


def test_a_failed_branch_fails_the_run_after_the_other_branch(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    steps = [
        {"id": "start", "action": "transform"},
        {"id": "boom", "action": "fail", "input": {"code": "NOPE", "message": "no way"}},
        {"id": "other", "action": "http.request", "needs": ["start"], "input": {"url": f"{target.url}/o"}},
        {"id": "join", "action": "transform", "needs": ["boom", "other"]},
    ]
    done = wait_run(trigger(make_workflow(steps))["id"], timeout=30)
    assert done["status"] == "failed" and done["error"] == {"code": "STEP_ERROR", "message": "no way"}
    assert [s["status"] for s in done["stepResults"]] == ["success", "error", "success", "skipped"]
    assert [r["path"] for r in target.requests] == ["/o"], "the other branch still ran"

    response = client.post(f"/api/v1/runs/{done['id']}/retry", headers=headers)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["data"]["restartFromStepId"] == "boom"
    retried = wait_run(response.get_json()["data"]["newRunId"], timeout=30)
    assert [s["status"] for s in retried["stepResults"]] == ["success", "error", "success", "skipped"]
    assert [s["stepId"] for s in retried["stepResults"] if s.get("reused")] == ["start", "other"]
    assert len(target.requests) == 1, "the branch that succeeded is reused, not called again"
