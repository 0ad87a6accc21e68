"""Fan-out: ``forEach`` runs a step once per item (``item`` and ``index`` in its templates), at most
``maxParallel`` at a time; its output is the items' outputs in order; each item attempt shows in
the logs; one item failing for good fails the step (after its retries) and the run (STEP_ERROR)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.definition import validate_definition
from tests import factories
from tests.e2e.test_auth_errors import assert_error
from tests.spec_shapes import STEP_KEYS
from workers import executor
from workers.middleware import LeaseHeartbeat, StepTimeLimit

FAST_RETRY = {"maxAttempts": 3, "backoff": "fixed", "initialDelayMs": 10, "maxDelayMs": 10}


class CountingTarget:
    """A threaded HTTP target that holds each request ~50 ms and counts how many are in flight at
    once; it answers ``{"path", "item"}`` (the JSON body's ``item``)."""

    def __init__(self, hold_s: float = 0.05) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.keys: dict[str, str | None] = {}
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"null")
                with target.lock:
                    target.in_flight += 1
                    target.most = max(target.most, target.in_flight)
                    target.keys[self.path] = self.headers.get("Idempotency-Key")
                try:
                    time.sleep(hold_s)  # the work the target does: what makes requests overlap
                finally:
                    with target.lock:
                        target.in_flight -= 1
                payload = json.dumps({"path": self.path, "item": (body or {}).get("item")}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # 100 items may connect at once; none is refused
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def counting() -> Iterator[CountingTarget]:
    server = CountingTarget()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _logs(client: Any, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/runs/{run_id}/logs", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]["logs"]


def _call(url: str, **extra: Any) -> dict[str, Any]:
    """An http.request step over ``input.orders``."""
    step_input = {"method": "POST", "url": url + "/{{ index }}", "json": {"item": "{{ item }}"}}
    return {
        "id": "fan",
        "action": "http.request",
        "forEach": "{{ input.orders }}",
        "input": {**step_input, **extra.pop("input", {})},
        **extra,
    }


def test_100_items_run_at_most_10_at_a_time_and_the_output_keeps_their_order(
    worker, client, headers, counting, make_workflow, trigger, wait_run
):
    wid = make_workflow(
        [
            _call(counting.url, maxParallel=10),
            {"id": "after", "action": "transform", "input": {"n": "{{ steps.fan.output | length }}"}},
        ]
    )
    items = [f"item-{i}" for i in range(100)]
    run = wait_run(trigger(wid, {"orders": items})["id"], timeout=60)

    assert run["status"] == "completed", (run["error"], run["stepResults"])
    assert 1 < counting.most <= 10, counting.most  # the target's own count of overlapping requests
    fan = run["stepResults"][0]
    assert fan["status"] == "success" and fan["attempt"] == 1
    assert [entry["body"] for entry in fan["output"]] == [
        {"path": f"/{i}", "item": items[i]} for i in range(100)
    ]
    assert fan["input"] == {"forEach": items}
    assert run["output"] == {"n": 100}  # the next step sees the list
    # Each item's own Idempotency-Key: <run id>:<step id>:<index>.
    assert counting.keys == {f"/{i}": f"{run['id']}:fan:{i}" for i in range(100)}

    logs = _logs(client, headers, run["id"])
    items_logged = [entry for entry in logs if entry["stepId"] == "fan" and "index" in entry]
    assert sorted(entry["index"] for entry in items_logged) == list(range(100))
    assert all(entry["status"] == "success" and entry["attempt"] == 1 for entry in items_logged)
    assert items_logged[0]["input"]["json"] == {"item": items[items_logged[0]["index"]]}
    # The step's own entry follows its items', and keeps the spec's exact shape (no index).
    own = [entry for entry in logs if "index" not in entry]
    assert [entry["stepId"] for entry in own] == ["fan", "after"]
    assert logs.index(own[0]) == 100
    assert all(set(entry) == STEP_KEYS for entry in own), own
    assert all(set(entry) == STEP_KEYS | {"index"} for entry in items_logged)


def test_an_item_is_retried_on_its_own_and_keeps_its_key(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow([_call(target.url, maxParallel=1, retry=FAST_RETRY)])
    target.reply(503)
    target.reply(429, headers={"Retry-After": "0"})
    run = wait_run(trigger(wid, {"orders": ["a", "b", "c"]})["id"])

    assert run["status"] == "completed", (run["error"], run["stepResults"])
    assert [entry["status"] for entry in run["stepResults"][0]["output"]] == [200, 200, 200]
    assert run["stepResults"][0]["attempt"] == 1  # the step ran once; its first item three times
    assert [r["path"] for r in target.requests] == ["/0", "/0", "/0", "/1", "/2"]
    keys = [r["headers"]["Idempotency-Key"] for r in target.requests]
    assert keys == [f"{run['id']}:fan:0"] * 3 + [f"{run['id']}:fan:1", f"{run['id']}:fan:2"]

    logs = _logs(client, headers, run["id"])
    seen = [(entry.get("index"), entry["attempt"], entry["status"]) for entry in logs]
    assert seen == [
        (0, 1, "error"),
        (0, 2, "error"),
        (0, 3, "success"),
        (1, 1, "success"),
        (2, 1, "success"),
        (None, 1, "success"),
    ]
    assert logs[0]["error"]["code"] == "HTTP_ERROR"


def test_an_item_failing_after_its_retries_fails_the_step_and_no_item_starts_after(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow([_call(target.url, maxParallel=1, retry=FAST_RETRY)])
    for _ in range(3):
        target.reply(503)
    run = wait_run(trigger(wid, {"orders": ["a", "b", "c"]})["id"])

    assert run["status"] == "failed"
    assert run["error"]["code"] == "STEP_ERROR"
    step = run["stepResults"][0]
    assert step["status"] == "error" and step["attempt"] == 1  # the item's retries, not the step's
    assert step["error"]["code"] == "HTTP_ERROR"
    assert step["error"]["message"].startswith("forEach item 0 failed after 3 attempts: ")
    assert run["error"]["message"] == step["error"]["message"]
    assert [r["path"] for r in target.requests] == ["/0"] * 3
    seen = [(entry.get("index"), entry["attempt"]) for entry in _logs(client, headers, run["id"])]
    assert seen == [(0, 1), (0, 2), (0, 3), (None, 1)]


def test_a_non_retriable_item_error_fails_the_step_at_once(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow([_call(target.url, maxParallel=1, retry=FAST_RETRY)])
    target.reply(200)
    target.reply(400)
    run = wait_run(trigger(wid, {"orders": ["a", "b", "c"]})["id"])

    assert run["status"] == "failed" and run["error"]["code"] == "STEP_ERROR"
    assert run["stepResults"][0]["error"]["message"].startswith("forEach item 1 failed after 1 attempt: ")
    assert [r["path"] for r in target.requests] == ["/0", "/1"]
    seen = [(entry.get("index"), entry["status"]) for entry in _logs(client, headers, run["id"])]
    assert seen == [(0, "success"), (1, "error"), (None, "error")]


def test_items_and_index_in_templates_and_an_empty_list(make_workflow, worker, trigger, wait_run):
    wid = make_workflow(
        [
            {
                "id": "double",
                "action": "transform",
                "forEach": "{{ input.numbers }}",
                "maxParallel": 3,
                "input": {"value": "{{ item * 2 }}", "at": "{{ index }}", "from": "{{ input.label }}"},
            }
        ]
    )
    run = wait_run(trigger(wid, {"numbers": [5, 6, 7, 8], "label": "x"})["id"])
    assert run["status"] == "completed"
    assert run["output"] == [{"value": v * 2, "at": i, "from": "x"} for i, v in enumerate([5, 6, 7, 8])]

    empty = wait_run(trigger(wid, {"numbers": [], "label": "x"})["id"])
    assert empty["status"] == "completed"
    assert empty["stepResults"][0]["output"] == []
    assert empty["output"] == []


@pytest.mark.parametrize(
    ("items", "kind"), [({"a": 1}, "object"), ("abc", "string"), (None, "null"), (3, "number")]
)
def test_a_for_each_that_is_no_list_is_a_step_error(make_workflow, worker, trigger, wait_run, items, kind):
    wid = make_workflow([{"id": "each", "action": "transform", "forEach": "{{ input.orders }}"}])
    run = wait_run(trigger(wid, {"orders": items})["id"])
    assert run["status"] == "failed" and run["error"]["code"] == "STEP_ERROR"
    error = run["stepResults"][0]["error"]
    assert error == {
        "code": "FOREACH_ERROR",
        "message": f"forEach must render to a list; it rendered to a {kind}",
    }


def test_a_for_each_that_does_not_render_is_a_template_error(make_workflow, worker, trigger, wait_run):
    wid = make_workflow([{"id": "each", "action": "transform", "forEach": "{{ input.missing.deeper }}"}])
    run = wait_run(trigger(wid, {})["id"])
    assert run["status"] == "failed"
    assert run["stepResults"][0]["error"]["code"] == "TEMPLATE_ERROR"
    assert "forEach" in run["stepResults"][0]["error"]["message"]


def test_the_idempotency_key_option_works_per_item(worker, target, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            _call(target.url, input={"idempotencyKey": "order-{{ item.id }}-{{ index }}", "json": {}}),
            {**_call(target.url, input={"idempotencyKey": False}), "id": "off"},
        ]
    )
    run = wait_run(trigger(wid, {"orders": [{"id": "x"}, {"id": "y"}]})["id"])
    assert run["status"] == "completed"
    keys = {(r["path"], r["headers"].get("Idempotency-Key")) for r in target.requests}
    assert keys == {("/0", "order-x-0"), ("/1", "order-y-1"), ("/0", None), ("/1", None)}


def test_items_each_get_the_step_timeout_not_the_whole_fan_out(
    worker, target, make_workflow, trigger, wait_run
):
    """Four items of 0.3 s one at a time outlast the step's 1 s timeoutMs; each is well within it."""
    target.delay_s = 0.3
    wid = make_workflow([_call(target.url, maxParallel=1, timeoutMs=1000)])
    run = wait_run(trigger(wid, {"orders": [1, 2, 3, 4]})["id"])
    assert run["status"] == "completed", run["stepResults"][0]
    assert len(run["stepResults"][0]["output"]) == 4


def test_no_item_starts_after_the_run_is_cancelled(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    target.delay_s = 0.2
    wid = make_workflow([_call(target.url, maxParallel=1)])
    run_id = trigger(wid, {"orders": list(range(20))})["id"]
    deadline = time.monotonic() + 20
    while not target.requests:
        assert time.monotonic() < deadline, "the first item never reached the target"
        time.sleep(0.01)
    assert client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers).status_code == 200
    cancelled_at = time.monotonic()

    def step() -> dict[str, Any]:
        data = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        return data["stepResults"][0]

    while step()["status"] == "running":  # items in flight finish, then the step records
        assert time.monotonic() < deadline, step()
        time.sleep(0.02)
    result = step()
    assert result["status"] == "error" and result["error"]["code"] == "RUN_ENDED", result
    assert wait_run(run_id)["status"] == "cancelled"
    # At most the one item that had passed its check when the cancel landed starts after it.
    assert len([r for r in target.requests if r["at"] > cancelled_at]) <= 1
    assert len(target.requests) < 20


@pytest.mark.parametrize(
    ("step", "field", "hint"),
    [
        ({"forEach": "{{ input.orders }}", "maxParallel": 0}, "maxParallel", "greater than or equal to 1"),
        ({"forEach": "{{ input.orders }}", "maxParallel": 101}, "maxParallel", "less than or equal to 100"),
        ({"forEach": "{{ input.orders }}", "maxParallel": "5"}, "maxParallel", "integer"),
        ({"forEach": "{{ input.orders }}", "maxParallel": 2.5}, "maxParallel", "integer"),
        ({"maxParallel": 5}, "maxParallel", "needs forEach"),
        ({"forEach": ["a", "b"]}, "forEach", "template string"),
        ({"forEach": 5}, "forEach", "template string"),
        ({"forEach": "input.orders"}, "forEach", "template string"),
        ({"forEach": "{{ input.orders"}, "forEach", "template syntax error"),
    ],
)
def test_bad_for_each_fields_are_refused_naming_the_field(client, headers, step, field, hint):
    body = {"name": "bad", "steps": [{"id": "s", "action": "transform", **step}]}
    error = assert_error(
        client.post("/api/v1/workflows", json=body, headers=headers), 400, "VALIDATION_ERROR"
    )
    assert list(error["details"]) == [f"steps.0.{field}"], error
    assert hint in error["details"][f"steps.0.{field}"][0], error


def test_a_step_without_for_each_stores_no_new_fields():
    import workers.actions  # noqa: F401  (registers the built-in actions the validation names)

    step = validate_definition({"name": "plain", "steps": [{"id": "s", "action": "transform"}]})["steps"][0]
    assert "forEach" not in step and "maxParallel" not in step
    fan = {"id": "s", "action": "transform", "forEach": "{{ input.orders }}"}
    assert "maxParallel" not in validate_definition({"name": "fan", "steps": [fan]})["steps"][0]


class RecordingLeases(LeaseHeartbeat):
    """The real heartbeat (nothing started), noting each time the executor holds a step's lease."""

    def __init__(self, services: Any) -> None:
        super().__init__(services)
        self.holds: list[tuple[str, float]] = []

    def hold(self, claim: Any) -> None:
        self.holds.append((claim.step_id, time.monotonic()))
        super().hold(claim)


def test_a_long_fan_out_holds_its_lease_again_as_its_items_progress(
    services, client, headers, target, make_workflow
):
    """The heartbeat caps a lease at timeoutMs + LEASE_GRACE after the step was last held: the
    fan-out holds it again as items progress, so the cap counts from the latest progress."""
    target.delay_s = 0.3
    wid = make_workflow([{**_call(target.url, maxParallel=1, timeoutMs=1000), "id": "call"}])
    with services.db.session() as session:
        run_id = factories.run(session, wid, "pending", input={"orders": [1, 2, 3, 4]}).id
        session.commit()
    leases = RecordingLeases(services)
    executor.execute_step(services, leases, StepTimeLimit(), run_id, "call", 1)

    data = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
    assert data["status"] == "completed", data["stepResults"]
    assert [step for step, _ in leases.holds][:1] == ["call"]  # the claim's own hold, then progress
    assert len(leases.holds) >= 3, leases.holds
    assert leases.held() == []  # released when the step was recorded
