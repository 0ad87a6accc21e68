"""Durable delays, approvals (suspend/resume), run timeouts and recovery sweeps."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update

from app import engine
from app.engine import sweeps
from app.timeutil import utcnow
from models import StepRun
from tests.conftest import unreachable


def test_delay_holds_no_thread_and_next_step_follows_on_time(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow(
        [
            {"id": "wait", "action": "delay", "input": {"durationMs": 600}},
            {"id": "after", "action": "http.request", "input": {"url": f"{target.url}/after"}},
        ]
    )
    run = trigger(wid)
    mid = wait_run(run["id"], statuses=("running",))
    assert mid["status"] == "running"
    time.sleep(0.2)
    waiting = client.get(f"/api/v1/runs/{run['id']}", headers=headers).get_json()["data"]
    assert waiting["stepResults"][0]["status"] == "waiting"
    done = wait_run(run["id"])
    assert done["status"] == "completed"
    wait_step = done["stepResults"][0]
    assert wait_step["output"]["delayedMs"] >= 600
    assert wait_step["durationMs"] >= 600


def test_cancel_during_a_delay_stops_the_next_step(
    worker, client, headers, target, make_workflow, trigger, wait_run
):
    wid = make_workflow(
        [
            {"id": "wait", "action": "delay", "input": {"durationMs": 500}},
            {"id": "after", "action": "http.request", "input": {"url": f"{target.url}/after"}},
        ]
    )
    run = trigger(wid)
    wait_run(run["id"], statuses=("running",))
    assert client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers).status_code == 200
    time.sleep(1.0)
    assert target.requests == [], "the step after the delay never starts"
    data = wait_run(run["id"])
    assert data["status"] == "cancelled" and [s["status"] for s in data["stepResults"]] == [
        "skipped",
        "skipped",
    ]


def test_run_timeout_during_a_delay(worker, scheduler, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            {"id": "wait", "action": "delay", "input": {"durationMs": 5000}},
            {"id": "after", "action": "transform"},
        ],
        timeoutMs=1000,
    )
    started = time.monotonic()
    done = wait_run(trigger(wid)["id"], timeout=10)
    assert done["status"] == "timeout"
    assert done["error"]["code"] == "RUN_TIMEOUT"
    assert time.monotonic() - started < 3, "ended on time, not when the delay finished"


def test_approval_suspends_then_resumes(worker, client, headers, make_workflow, trigger, wait_run):
    wid = make_workflow(
        [
            {"id": "approve", "action": "approval", "input": {"question": "Ship it?"}},
            {"id": "ship", "action": "transform", "input": {"by": "{{ steps.approve.output.by }}"}},
        ]
    )
    run = trigger(wid)
    suspended = wait_run(run["id"], statuses=("suspended",))
    assert suspended["stepResults"][0]["status"] == "waiting"
    not_yet = client.post(f"/api/v1/runs/{run['id']}/retry", headers=headers)
    assert not_yet.status_code == 400
    resumed = client.post(
        f"/api/v1/runs/{run['id']}/resume", json={"approved": True, "data": {"by": "ada"}}, headers=headers
    )
    assert resumed.status_code == 200, resumed.get_json()
    done = wait_run(run["id"])
    assert done["status"] == "completed"
    assert done["stepResults"][0]["output"] == {"by": "ada"} and done["output"] == {"by": "ada"}
    again = client.post(f"/api/v1/runs/{run['id']}/resume", json={"approved": True}, headers=headers)
    assert again.status_code == 400 and again.get_json()["error"]["code"] == "INVALID_STATE"


def test_approval_rejected_fails_the_run(worker, client, headers, make_workflow, trigger, wait_run):
    wid = make_workflow([{"id": "approve", "action": "approval"}, {"id": "ship", "action": "transform"}])
    run = trigger(wid)
    wait_run(run["id"], statuses=("suspended",))
    bad = client.post(f"/api/v1/runs/{run['id']}/resume", json={"data": {}}, headers=headers)
    assert bad.status_code == 400 and "approved" in bad.get_json()["error"]["details"]
    client.post(f"/api/v1/runs/{run['id']}/resume", json={"approved": False}, headers=headers)
    done = wait_run(run["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "APPROVAL_REJECTED"
    assert [s["status"] for s in done["stepResults"]] == ["error", "skipped"]


def test_suspended_run_can_be_cancelled(worker, client, headers, make_workflow, trigger, wait_run):
    wid = make_workflow([{"id": "approve", "action": "approval"}, {"id": "ship", "action": "transform"}])
    run = trigger(wid)
    wait_run(run["id"], statuses=("suspended",))
    assert client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers).status_code == 200
    late = client.post(f"/api/v1/runs/{run['id']}/resume", json={"approved": True}, headers=headers)
    assert late.status_code == 400
    assert wait_run(run["id"])["status"] == "cancelled"


def test_approval_timeout(worker, scheduler, make_workflow, trigger, wait_run):
    wid = make_workflow([{"id": "approve", "action": "approval", "input": {"timeoutMs": 300}}])
    done = wait_run(trigger(wid)["id"], timeout=10)
    assert done["status"] == "failed" and done["error"]["code"] == "APPROVAL_TIMEOUT"


def test_sweep_recovers_a_step_whose_worker_died(worker, services, make_workflow, trigger, wait_run):
    """A step left running with an expired lease gets a new attempt (the worker 'died')."""
    wid = make_workflow([{"id": "a", "action": "approval"}, {"id": "b", "action": "transform"}])
    run = trigger(wid)
    wait_run(run["id"], statuses=("suspended",))
    # Simulate a worker that claimed step b and died: lease already expired, run running.
    with services.db.session() as session:
        session.execute(
            update(StepRun)
            .where(StepRun.run_id == run["id"], StepRun.step_id == "a")
            .values(status="success", output={})
        )
        session.execute(
            update(StepRun)
            .where(StepRun.run_id == run["id"], StepRun.step_id == "b")
            .values(
                status="running",
                attempt=1,
                started_at=utcnow(),
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
        from models import Run

        session.execute(update(Run).where(Run.id == run["id"]).values(status="running"))
        session.commit()
    # Sweep now (the session's scheduler thread, if running, may get there first: either way the
    # outcome below is what counts).
    engine.sweep(services)
    done = wait_run(run["id"])
    assert done["status"] == "failed", "maxAttempts 1: WORKER_LOST fails the run"
    assert done["stepResults"][1]["error"]["code"] == "WORKER_LOST"


def test_broker_down_at_trigger_loses_nothing(
    worker, config, services, client, headers, make_workflow, wait_run
):
    """A trigger whose enqueue fails still answers 202; the sweep resends the message later."""
    from app.engine import trigger_run
    from app.engine.states import STUCK_AFTER
    from app.queue import StepQueue, make_broker
    from app.services import Services

    wid = make_workflow([{"id": "a", "action": "transform", "input": {"ok": True}}])
    dead = unreachable(config)
    broken = Services(
        db=services.db, redis=services.redis, queue=StepQueue(make_broker(dead)), namespace=services.namespace
    )
    from app import keys as keys_module
    from models import ApiKey

    prefix = headers["x-api-key"][len(keys_module.KEY_PREFIX) :].split("_", 1)[0]
    with services.db.session() as session:
        company_id = session.execute(select(ApiKey.company_id).where(ApiKey.prefix == prefix)).scalar_one()
    run, created = trigger_run(broken, company_id, wid, {}, "api")
    assert created
    time.sleep(0.3)
    assert client.get(f"/api/v1/runs/{run.id}", headers=headers).get_json()["data"]["status"] == "pending"
    later = utcnow() + STUCK_AFTER + timedelta(seconds=1)
    # The lost-message sweep alone: a full pass at `later` would also find the step's fresh lease
    # "expired" if the worker claimed it in between.
    with services.db.session() as session:
        assert sweeps.sweep_lost_messages(services, session, later) >= 1
    assert wait_run(run.id)["status"] == "completed"
