"""Concurrency keys through the API and a real worker: runs of one key never overlap and start in
arrival order; other keys are not held back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from models import Run


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_one_at_a_time_in_order(runs: list[dict[str, Any]]) -> None:
    """Each run started after the one triggered before it completed (from the step timestamps)."""
    spans = [
        (_at(r["stepResults"][0]["startedAt"]), _at(r["stepResults"][-1]["completedAt"]), r["id"])
        for r in runs
    ]
    for (_, done, before), (start, _, after) in zip(spans, spans[1:], strict=False):
        assert start >= done, f"{after} started at {start} before {before} completed at {done}"


def test_fifty_runs_of_one_key_never_overlap_and_keep_their_order(
    worker, services, client, headers, target, make_workflow, trigger, wait_run
):
    target.delay_s = 0.02
    wid = make_workflow(
        [
            {"id": "call", "action": "http.request", "input": {"url": f"{target.url}/{{{{ input.n }}}}"}},
            {"id": "after", "action": "transform", "input": {"n": "{{ input.n }}"}},
        ],
        concurrency={"key": "{{ input.customerId }}", "limit": 1},
    )
    ids = [trigger(wid, {"customerId": "acme", "n": n})["id"] for n in range(50)]
    other = trigger(wid, {"customerId": "other", "n": 99})["id"]
    assert wait_run(other, timeout=30)["status"] == "completed", "another key is not held back"
    runs = [wait_run(run_id, timeout=60) for run_id in ids]
    target.delay_s = 0
    assert all(r["status"] == "completed" for r in runs), [r["status"] for r in runs]
    assert_one_at_a_time_in_order(runs)
    acme = [r["path"] for r in target.requests if r["path"] != "/99"]
    assert acme == [f"/{n}" for n in range(50)], "the target saw them in arrival order"
    with services.db.session() as session:
        held = session.execute(
            select(func.count()).select_from(Run).where(Run.id.in_(ids), Run.slot.is_not(None))
        ).scalar_one()
    assert held == 0, "every slot was freed"


def test_a_trigger_whose_key_does_not_render_is_a_400(client, headers, make_workflow):
    wid = make_workflow(
        [{"id": "a", "action": "transform"}], concurrency={"key": "{{ input.customer.id }}", "limit": 1}
    )
    response = client.post(f"/api/v1/workflows/{wid}/runs", json={"input": {}}, headers=headers)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and "concurrency.key" in error["message"]


def test_a_bad_concurrency_is_refused_naming_the_field(client, headers):
    for concurrency, field in (
        ({"limit": 0}, "concurrency.limit"),
        ({"key": "x"}, "concurrency.limit"),
        ({"limit": 1, "keys": "x"}, "concurrency.keys"),
        ({"limit": 1, "key": "{{ input. }}"}, "concurrency.key"),
    ):
        body = {"name": "c", "steps": [{"id": "a", "action": "transform"}], "concurrency": concurrency}
        response = client.post("/api/v1/workflows", json=body, headers=headers)
        assert response.status_code == 400, concurrency
        error = response.get_json()["error"]
        assert error["code"] == "VALIDATION_ERROR" and field in error["details"], (concurrency, error)


def test_the_workflow_shows_its_concurrency_and_its_steps_needs(client, headers):
    body = {
        "name": "shown",
        "steps": [{"id": "a", "action": "transform"}, {"id": "b", "action": "transform", "needs": []}],
        "concurrency": {"key": "{{ input.k }}", "limit": 2},
    }
    created = client.post("/api/v1/workflows", json=body, headers=headers).get_json()["data"]
    read = client.get(f"/api/v1/workflows/{created['id']}", headers=headers).get_json()["data"]
    for data in (created, read):
        assert data["concurrency"] == {"key": "{{ input.k }}", "limit": 2}
        assert "needs" not in data["steps"][0] and data["steps"][1]["needs"] == []
