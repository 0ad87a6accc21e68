"""Execution semantics end to end: per-step retry, non-retriable failures, if/skip, cancel, timeouts."""

from __future__ import annotations

import time

FAST_RETRY = {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 50, "maxDelayMs": 50}


def _logs(client, headers, run_id):
    return client.get(f"/api/v1/runs/{run_id}/logs", headers=headers).get_json()["data"]["logs"]


def test_503_503_200_completes_at_attempt_3(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    target.reply(503)
    target.reply(503)
    target.reply(200, {"id": 7})
    wid = make_workflow(
        [{"id": "call", "action": "http.request", "input": {"url": f"{target.url}/x"}, "retry": FAST_RETRY}]
    )
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "completed", done
    assert done["stepResults"][0]["attempt"] == 3 and done["stepResults"][0]["output"]["body"] == {"id": 7}
    logs = _logs(client, headers, done["id"])
    assert [(e["stepId"], e["attempt"], e["status"]) for e in logs] == [
        ("call", 1, "error"),
        ("call", 2, "error"),
        ("call", 3, "success"),
    ]
    assert logs[0]["error"]["code"] == "HTTP_ERROR" and "503" in logs[0]["error"]["message"]
    assert logs[2]["error"] is None and len(target.requests) == 3


def test_400_fails_at_once_with_step_error(worker, client, headers, target, make_workflow, trigger, wait_run):
    target.reply(400, {"error": "bad request"})
    wid = make_workflow(
        [
            {
                "id": "call",
                "action": "http.request",
                "input": {"url": f"{target.url}/x"},
                "retry": FAST_RETRY,
            },
            {"id": "after", "action": "transform"},
        ]
    )
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "failed"
    assert done["error"]["code"] == "STEP_ERROR" and "400" in done["error"]["message"]
    assert len(target.requests) == 1, "a 400 is not retried"
    call, after = done["stepResults"]
    assert call["status"] == "error" and call["attempt"] == 1 and after["status"] == "skipped"
    assert len(_logs(client, headers, done["id"])) == 1


def test_exhausted_retries_fail_at_the_last_attempt(worker, target, make_workflow, trigger, wait_run):
    for _ in range(3):
        target.reply(503)
    wid = make_workflow(
        [{"id": "call", "action": "http.request", "input": {"url": f"{target.url}/x"}, "retry": FAST_RETRY}]
    )
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "failed" and done["stepResults"][0]["attempt"] == 3
    assert len(target.requests) == 3


def test_retry_after_is_honoured(worker, target, make_workflow, trigger, wait_run):
    target.reply(429, {"slow": "down"}, {"Retry-After": "1"})
    target.reply(200, {"ok": 1})
    wid = make_workflow(
        [
            {
                "id": "call",
                "action": "http.request",
                "input": {"url": f"{target.url}/x"},
                "retry": {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 10, "maxDelayMs": 5000},
            }
        ]
    )
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "completed"
    gap = target.requests[1]["at"] - target.requests[0]["at"]
    assert gap >= 0.9, f"second attempt came {gap:.3f}s after the 429 with Retry-After: 1"


def test_if_false_skips_and_run_continues(worker, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            {"id": "maybe", "action": "fail", "if": "{{ input.email is defined }}"},
            {"id": "always", "action": "transform", "input": {"n": "{{ input.n }}", "o": "{{ input.obj }}"}},
        ]
    )
    done = wait_run(trigger(wid, {"n": 5, "obj": {"a": [1]}})["id"])
    assert done["status"] == "completed"
    assert [s["status"] for s in done["stepResults"]] == ["skipped", "success"]
    assert done["output"] == {"n": 5, "o": {"a": [1]}}, "native values, last executed step's output"


def test_fail_action_and_template_errors(worker, make_workflow, trigger, wait_run):
    failing = make_workflow(
        [{"id": "boom", "action": "fail", "input": {"code": "NOPE", "message": "no way"}}]
    )
    done = wait_run(trigger(failing)["id"])
    assert done["status"] == "failed" and done["error"] == {"code": "STEP_ERROR", "message": "no way"}
    assert done["stepResults"][0]["error"] == {"code": "NOPE", "message": "no way"}

    broken = make_workflow([{"id": "t", "action": "transform", "input": {"x": "{{ input.missing.deeper }}"}}])
    done = wait_run(trigger(broken)["id"])
    assert done["status"] == "failed" and done["stepResults"][0]["error"]["code"] == "TEMPLATE_ERROR"


def test_cancel_while_step_one_executes(worker, client, headers, target, make_workflow, trigger, wait_run):
    target.delay_s = 1.0
    wid = make_workflow(
        [
            {"id": "slow", "action": "http.request", "input": {"url": f"{target.url}/one"}},
            {"id": "next", "action": "http.request", "input": {"url": f"{target.url}/two"}},
        ]
    )
    run = trigger(wid)
    deadline = time.monotonic() + 10
    while not target.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert target.requests, "step one never reached its target"
    cancel = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers)
    assert cancel.status_code == 200
    assert cancel.get_json() == {
        "success": True,
        "data": {"id": run["id"], "status": "cancelled", "message": "Run cancellation requested"},
    }
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = client.get(f"/api/v1/runs/{run['id']}", headers=headers).get_json()["data"]
        if data["stepResults"][0]["status"] == "success":
            break
        time.sleep(0.02)
    time.sleep(1.0)  # time enough for step two, were it (wrongly) started
    data = client.get(f"/api/v1/runs/{run['id']}", headers=headers).get_json()["data"]
    assert data["status"] == "cancelled"
    assert data["stepResults"][0]["status"] == "success", "step one's result is recorded"
    assert data["stepResults"][1]["status"] == "skipped"
    assert [r["path"] for r in target.requests] == ["/one"], "step two never started"
    again = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers)
    assert again.status_code == 400
    target.delay_s = 0


def test_cancel_during_retry_backoff(worker, client, headers, target, make_workflow, trigger, wait_run):
    target.reply(503)
    wid = make_workflow(
        [
            {
                "id": "call",
                "action": "http.request",
                "input": {"url": f"{target.url}/x"},
                "retry": {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 800, "maxDelayMs": 800},
            }
        ]
    )
    run = trigger(wid)
    deadline = time.monotonic() + 10
    while len(_logs(client, headers, run["id"])) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers).status_code == 200
    time.sleep(1.5)
    assert len(target.requests) == 1, "no attempt after cancel"
    assert wait_run(run["id"])["status"] == "cancelled"


def test_completed_run_cannot_be_cancelled(worker, client, headers, make_workflow, trigger, wait_run):
    done = wait_run(trigger(make_workflow([{"id": "a", "action": "transform"}]))["id"])
    response = client.post(f"/api/v1/runs/{done['id']}/cancel", headers=headers)
    assert response.status_code == 400
    assert response.get_json()["error"] == {
        "code": "INVALID_STATE",
        "message": "Can only cancel running or pending runs",
    }


def test_step_timeout_is_retried_under_the_policy(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    target.delay_s = 1.5
    retry = {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 10, "maxDelayMs": 10}
    wid = make_workflow(
        [
            {
                "id": "slow",
                "action": "http.request",
                "input": {"url": f"{target.url}/x"},
                "timeoutMs": 300,
                "retry": retry,
            }
        ]
    )
    done = wait_run(trigger(wid)["id"])
    target.delay_s = 0
    assert done["status"] == "failed"
    assert done["stepResults"][0]["error"]["code"] == "STEP_TIMEOUT"
    assert done["stepResults"][0]["durationMs"] < 1400
    logs = _logs(client, headers, done["id"])
    assert [(e["attempt"], e["error"]["code"]) for e in logs] == [(1, "STEP_TIMEOUT"), (2, "STEP_TIMEOUT")]


def test_python_action_timeout_interrupts_the_step(worker, make_workflow, trigger, wait_run):
    from workers.actions import action

    @action("test.sleep")
    def sleep(ctx, params):
        for _ in range(300):
            time.sleep(0.01)
        return {"slept": True}

    wid = make_workflow([{"id": "zz", "action": "test.sleep", "timeoutMs": 200}])
    done = wait_run(trigger(wid)["id"])
    assert done["status"] == "failed"
    assert done["stepResults"][0]["error"]["code"] == "STEP_TIMEOUT"


def test_idempotency_key_on_trigger(worker, client, headers, make_workflow):
    wid = make_workflow([{"id": "a", "action": "transform"}])
    url = f"/api/v1/workflows/{wid}/runs"
    key = {"Idempotency-Key": "order-1", **headers}
    first = client.post(url, json={"input": {"n": 1}}, headers=key)
    second = client.post(url, json={"input": {"n": 1}}, headers=key)
    assert first.status_code == 202 and second.status_code == 200
    assert first.get_json()["data"]["id"] == second.get_json()["data"]["id"]
    conflict = client.post(url, json={"input": {"n": 2}}, headers=key)
    assert conflict.status_code == 409 and conflict.get_json()["error"]["code"] == "CONFLICT"
    runs = client.get(f"/api/v1/runs?workflowId={wid}", headers=headers).get_json()["data"]
    assert len(runs) == 1


def test_concurrent_idempotent_triggers_make_one_run(worker, live_server, headers, make_workflow):
    import concurrent.futures

    import requests

    wid = make_workflow([{"id": "a", "action": "transform"}])

    def post(_):
        return requests.post(
            f"{live_server}/api/v1/workflows/{wid}/runs",
            json={"input": {}},
            headers={"Idempotency-Key": "same", **headers},
            timeout=10,
        )

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(20)))
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["data"]["id"] for r in responses}) == 1
    assert sum(r.status_code == 202 for r in responses) == 1
