"""The side-effect guard: http.request sends ``Idempotency-Key: <run id>:<step id>``, the same on
every attempt of the step; a step may set its own (a template) or none, a header it sets itself
wins, and steps a restart reuses never call out again."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.test_auth_errors import assert_error

FAST_RETRY = {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 10, "maxDelayMs": 10}


def _call(target: Any, step_id: str = "charge", **extra: Any) -> dict[str, Any]:
    input_ = {
        "method": "POST",
        "url": f"{target.url}/{step_id}",
        "json": {"amount": 5},
        **extra.pop("input", {}),
    }
    return {"id": step_id, "action": "http.request", "input": input_, **extra}


def _key(request: dict[str, Any]) -> str | None:
    """The request's Idempotency-Key, whatever the case of its name; None when it has none."""
    found = [value for name, value in request["headers"].items() if name.lower() == "idempotency-key"]
    assert len(found) <= 1, request["headers"]
    return found[0] if found else None


def _keys(target: Any, path: str | None = None) -> list[str | None]:
    return [_key(r) for r in target.requests if path is None or r["path"] == path]


def test_every_attempt_of_a_step_sends_the_same_key(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow([_call(target, retry=FAST_RETRY)])
    target.reply(503)
    target.reply(500)
    run = wait_run(trigger(wid)["id"])
    assert run["status"] == "completed" and run["stepResults"][0]["attempt"] == 3
    assert _keys(target) == [f"{run['id']}:charge"] * 3


def test_each_step_and_each_run_has_its_own_key(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow([_call(target, "reserve"), _call(target, "charge")])
    first, second = (wait_run(trigger(wid)["id"]) for _ in range(2))
    assert _keys(target) == [f"{first['id']}:reserve", f"{first['id']}:charge"] + [
        f"{second['id']}:reserve",
        f"{second['id']}:charge",
    ]


def test_a_step_may_set_its_own_key_or_none(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            _call(target, "custom", input={"idempotencyKey": "order-{{ input.orderId }}"}, retry=FAST_RETRY),
            _call(target, "off", input={"idempotencyKey": False}),
            _call(target, "default", input={"idempotencyKey": True}),
            _call(target, "number", input={"idempotencyKey": "{{ input.orderId }}"}),
        ]
    )
    target.reply(503)
    run = wait_run(trigger(wid, {"orderId": 42})["id"])
    assert run["status"] == "completed"
    assert _keys(target, "/custom") == ["order-42", "order-42"]
    assert _keys(target, "/off") == [None]
    assert _keys(target, "/default") == [f"{run['id']}:default"]
    assert _keys(target, "/number") == ["42"]


def test_a_header_the_step_sets_itself_wins(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            _call(target, "plain", input={"headers": {"idempotency-key": "mine-1"}}),
            _call(
                target, "both", input={"headers": {"Idempotency-Key": "mine-2"}, "idempotencyKey": "other"}
            ),
        ]
    )
    run = wait_run(trigger(wid)["id"])
    assert run["status"] == "completed"
    assert _keys(target) == ["mine-1", "mine-2"]  # one header each (_key checks)


def test_a_key_that_renders_to_no_string_fails_the_step(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow([_call(target, input={"idempotencyKey": "{{ input.key }}"})])
    run = wait_run(trigger(wid, {"key": {"not": "a string"}})["id"])
    assert run["status"] == "failed"
    assert run["stepResults"][0]["error"]["code"] == "INVALID_INPUT"
    assert "idempotencyKey" in run["stepResults"][0]["error"]["message"]
    assert target.requests == []


def test_reused_steps_of_a_restart_never_call_out_again(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow(
        [
            _call(target, "charge"),
            {"id": "ship", "action": "fail", "if": "{{ input.fail }}", "input": {"message": "no stock"}},
            _call(target, "notify"),
        ]
    )
    original = wait_run(trigger(wid, {"fail": True})["id"])
    assert original["status"] == "failed"
    assert [r["path"] for r in target.requests] == ["/charge"]

    for body in ({"fromStepId": "ship", "overrideInput": {"fail": False}}, None):
        path = "restart" if body else "retry"
        response = client.post(f"/api/v1/runs/{original['id']}/{path}", json=body or {}, headers=headers)
        assert response.status_code == 202, response.get_json()
        restarted = wait_run(response.get_json()["data"]["newRunId"])
        if body:
            assert restarted["status"] == "completed"
            assert restarted["stepResults"][0]["reused"] is True
    # The charge ran once, in the original; the restart only notified (with its own run's key).
    assert [r["path"] for r in target.requests] == ["/charge", "/notify"]
    assert _keys(target, "/charge") == [f"{original['id']}:charge"]

    # Restarting from the charge itself calls out again, under the new run's key.
    response = client.post(
        f"/api/v1/runs/{original['id']}/restart",
        json={"fromStepId": "charge", "overrideInput": {"fail": False}},
        headers=headers,
    )
    again = wait_run(response.get_json()["data"]["newRunId"])
    assert _keys(target, "/charge") == [f"{original['id']}:charge", f"{again['id']}:charge"]


@pytest.mark.parametrize("value", [5, "", {"a": 1}, None, "x" * 256, "line\nbreak", ["k"]])
def test_an_invalid_idempotency_key_option_is_refused_when_the_workflow_is_saved(
    client, headers, target, value
):
    body = {"name": "bad", "steps": [_call(target, input={"idempotencyKey": value})]}
    error = assert_error(
        client.post("/api/v1/workflows", json=body, headers=headers), 400, "VALIDATION_ERROR"
    )
    assert "steps.0.input.idempotencyKey" in error["details"], error
    assert "idempotencyKey must be false" in error["details"]["steps.0.input.idempotencyKey"][0]


def test_the_option_is_only_http_requests(client, headers):
    body = {"name": "ok", "steps": [{"id": "t", "action": "transform", "input": {"idempotencyKey": 5}}]}
    assert client.post("/api/v1/workflows", json=body, headers=headers).status_code == 201
