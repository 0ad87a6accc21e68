"""Batch trigger: per-item results in order, one transaction, runs executed by a real worker,
idempotency shared with the single trigger, the 1,000-item limit and tenant isolation."""

from __future__ import annotations

from typing import Any

from app import events, metrics
from tests.conftest import new_key, wait_for


def _batch(client: Any, headers: dict[str, str], wid: str, items: list[Any]) -> Any:
    return client.post(f"/api/v1/workflows/{wid}/runs/batch", json={"items": items}, headers=headers)


def _workflow(make_workflow: Any) -> str:
    return make_workflow(
        [
            {"id": "first", "action": "transform", "input": {"n": "{{ input.n }}"}},
            {"id": "second", "action": "transform", "input": {"double": "{{ steps.first.output.n * 2 }}"}},
        ]
    )


def test_mixed_items_answer_in_order_and_every_created_run_completes(
    worker, client, headers, make_workflow, wait_run
):
    wid = _workflow(make_workflow)
    first = client.post(
        f"/api/v1/workflows/{wid}/runs",
        json={"input": {"n": 1}},
        headers={**headers, "Idempotency-Key": "k1"},
    )
    assert first.status_code == 202
    items = [
        {"input": {"n": 2}},
        {"input": {"n": 1}, "idempotencyKey": "k1"},  # the single trigger's key, same input
        {"input": {"n": 9}, "idempotencyKey": "k1"},  # same key, different input
        {"input": "not an object"},
        7,
        {"input": {"n": 3}, "idempotencyKey": "k2"},
        {"input": {"n": 3}, "idempotencyKey": "k2"},  # repeated within the batch
        {"input": {"n": 4}, "idempotencyKey": ""},
        {"input": {"n": 5}, "extra": True},
        {"idempotencyKey": "k3"},  # input defaults to {}
    ]
    response = _batch(client, headers, wid, items)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["success"] is True
    results = body["data"]["items"]
    assert [r["status"] for r in results] == [
        "created",
        "replayed",
        "invalid",
        "invalid",
        "invalid",
        "created",
        "replayed",
        "invalid",
        "invalid",
        "created",
    ]
    assert results[1]["runId"] == first.get_json()["data"]["id"]
    assert results[2]["error"]["code"] == "CONFLICT"
    for index in (3, 4, 7, 8):
        assert results[index]["error"]["code"] == "VALIDATION_ERROR", results[index]
        assert results[index]["error"]["message"] and "runId" not in results[index]
    assert results[6]["runId"] == results[5]["runId"]
    created = [results[i]["runId"] for i in (0, 5)]
    assert len({*created, results[1]["runId"]}) == 3

    runs = {run_id: wait_run(run_id) for run_id in created}
    assert {run["status"] for run in runs.values()} == {"completed"}
    assert runs[created[0]]["output"] == {"double": 4} and runs[created[1]]["output"] == {"double": 6}
    assert runs[created[0]]["triggerType"] == "api"
    # The key without input started a run of {} (a template error fails it, which is its own outcome).
    assert wait_run(results[9]["runId"])["input"] == {}


def test_a_single_trigger_replays_a_batch_key(worker, client, headers, make_workflow, wait_run):
    wid = _workflow(make_workflow)
    batch = _batch(client, headers, wid, [{"input": {"n": 5}, "idempotencyKey": "from-batch"}])
    run_id = batch.get_json()["data"]["items"][0]["runId"]
    again = client.post(
        f"/api/v1/workflows/{wid}/runs",
        json={"input": {"n": 5}},
        headers={**headers, "Idempotency-Key": "from-batch"},
    )
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["data"]["id"] == run_id
    other = client.post(
        f"/api/v1/workflows/{wid}/runs",
        json={"input": {"n": 6}},
        headers={**headers, "Idempotency-Key": "from-batch"},
    )
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "CONFLICT"
    assert wait_run(run_id)["status"] == "completed"


def test_a_thousand_items_is_the_limit(worker, client, headers, make_workflow, wait_run):
    wid = make_workflow([{"id": "only", "action": "transform", "input": {}}])
    too_many = _batch(client, headers, wid, [{"input": {}}] * 1001)
    assert too_many.status_code == 400
    error = too_many.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and "items" in error["details"]
    empty = _batch(client, headers, wid, [])
    assert empty.status_code == 400 and empty.get_json()["error"]["code"] == "VALIDATION_ERROR"
    not_a_list = client.post(f"/api/v1/workflows/{wid}/runs/batch", json={"items": {}}, headers=headers)
    assert not_a_list.status_code == 400
    listed = lambda: client.get(f"/api/v1/runs?workflowId={wid}", headers=headers).get_json()["data"]  # noqa: E731
    assert listed() == []  # a refused batch creates nothing

    full = _batch(client, headers, wid, [{"input": {"i": i}} for i in range(1000)])
    assert full.status_code == 202
    results = full.get_json()["data"]["items"]
    assert len(results) == 1000 and {r["status"] for r in results} == {"created"}
    last = results[-1]["runId"]
    assert wait_run(last, timeout=60)["input"] == {"i": 999}

    def all_completed() -> bool:
        runs, cursor = [], None
        while True:
            query = f"/api/v1/runs?workflowId={wid}&status=completed&limit=100"
            page = client.get(query + (f"&cursor={cursor}" if cursor else ""), headers=headers).get_json()
            runs += page["data"]
            cursor = page["meta"]["cursor"]
            if not page["meta"]["hasMore"]:
                return len(runs) == 1000

    wait_for(all_completed, timeout=90, what="the 1,000 batch-triggered runs to complete")


def test_another_company_workflow_is_not_found(client, headers, make_workflow, services):
    wid = _workflow(make_workflow)
    stranger = {"x-api-key": new_key(services, "stranger")}
    response = _batch(client, stranger, wid, [{"input": {}}])
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "NOT_FOUND"
    missing = _batch(client, headers, "wf_missing", [{"input": {}}])
    assert missing.status_code == 404


def test_batch_created_runs_are_published_as_events_and_counted(client, headers, make_workflow, services):
    wid = _workflow(make_workflow)
    items = [{"input": {"n": 1}}, {"input": {"n": 2}}, {"input": 3}]
    response = _batch(client, headers, wid, items)
    run_ids = [r["runId"] for r in response.get_json()["data"]["items"] if r["status"] == "created"]
    assert len(run_ids) == 2
    namespace = services.config.queue_namespace
    for run_id in run_ids:
        history = events.history(services.redis, events.run_stream(namespace, run_id))
        first = [(e.kind, e.payload()["status"]) for e in history[:2]]
        assert first == [("run", "pending"), ("step", "queued")]
    started = metrics.REGISTRY.get_sample_value("baton_runs_started_total", {"workflow_id": wid})
    assert started == 2, "created runs count as started, as single triggers do"
