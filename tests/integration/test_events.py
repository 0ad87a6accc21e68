"""Run events as the transitions publish them: one pipeline per commit, in commit order, nothing for a
rolled-back transaction, and a Redis outage never fails the transition it follows."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from app import events
from app.config import Config
from app.db import Database
from app.engine import sweeps
from app.engine import transitions as move
from app.engine.reads import lock_run
from app.queue import make_redis
from app.services import Services
from app.timeutil import iso, utcnow
from models.states import RunStatus, StepStatus
from tests.integration.conftest import CHAIN_EVENTS, Engine, failure, retrying, step, success

R, S = RunStatus, StepStatus


def _moves(found: list[dict[str, Any]]) -> list[tuple[str, str | None, str]]:
    return [(f["kind"], f.get("stepId"), f["status"]) for f in found]


def test_a_run_publishes_every_move_in_commit_order(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    chained = e.record(claim, success({"n": 1})).claim
    assert chained is not None
    e.record(chained, success({"n": 2}))
    assert _moves(e.events(run_id)) == [
        ("run", None, "pending"),
        ("step", "a", "queued"),
        ("step", "a", "running"),
        ("run", None, "running"),
        ("step", "a", "success"),
        ("step", "b", "running"),
        ("step", "b", "success"),
        ("run", None, "completed"),
    ]
    run, last_step = e.run(run_id), e.step(run_id, "b")
    final = e.events(run_id, "run")[-1]
    assert final == {
        "kind": "run",
        "runId": run_id,
        "workflowId": run.workflow_id,
        "status": "completed",
        "startedAt": iso(run.started_at),
        "completedAt": iso(run.completed_at),
        "durationMs": run.duration_ms,
        "error": None,
    }
    assert e.events(run_id, "step", "b")[-1] == {
        "kind": "step",
        "runId": run_id,
        "stepId": "b",
        "status": "success",
        "attempt": 1,
        "startedAt": iso(last_step.started_at),
        "completedAt": iso(last_step.completed_at),
        "durationMs": last_step.duration_ms,
        "error": None,
    }


def test_a_retry_shows_the_failed_attempt_then_the_next(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 2))
    e.record(claim, failure("flaky", retriable=True))
    again = e.claim(run_id, "a", 2)
    assert again is not None
    e.record(again, success())
    found = e.events(run_id, "step", "a")
    assert [(f["status"], f["attempt"]) for f in found] == [
        ("queued", 1),
        ("running", 1),
        ("queued", 1),  # attempt 1 failed and the step waits for attempt 2: as GET /runs/:id shows it
        ("running", 2),
        ("success", 2),
    ]
    assert found[2]["error"] == {"code": "HTTP_ERROR", "message": "flaky"}


def test_a_failure_publishes_the_steps_it_skips(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"), step("c"))
    e.record(claim, failure("nope"))
    assert _moves(e.events(run_id))[-4:] == [
        ("step", "a", "error"),
        ("step", "b", "skipped"),
        ("step", "c", "skipped"),
        ("run", None, "failed"),
    ]
    assert e.events(run_id, "run")[-1]["error"] == {"code": "STEP_ERROR", "message": "nope"}


def test_the_dead_worker_sweep_publishes_its_recovery(e: Engine) -> None:
    run_id, _claim = e.start(retrying("a", 2))
    # At this step's own lease expiry, not later: a later pass would take back other tests' steps.
    assert e.sweeping(sweeps.sweep_dead_workers, e.step(run_id, "a").lease_expires_at) >= 1
    assert [(f["status"], f["attempt"]) for f in e.events(run_id, "step", "a")][-1] == ("queued", 1)


def test_a_rolled_back_transaction_publishes_nothing(e: Engine) -> None:
    run_id, _claim = e.start(step("a"))
    before = e.events(run_id)
    with e.services.db.session() as session:
        run = lock_run(session, run_id)
        assert run is not None and move.end_run(session, run, R.CANCELLED, utcnow())
        session.rollback()
    with e.services.db.session() as session:
        run = lock_run(session, run_id)
        assert run is not None and move.end_run(session, run, R.CANCELLED, utcnow())
        # closed without a commit: the outermost transaction ends, its events with it
    assert e.events(run_id) == before
    assert e.run(run_id).status == R.RUNNING


@pytest.fixture
def redis_down(config: Config, engine_services: Services) -> Iterator[Services]:
    """The same PostgreSQL through a database object of its own, whose events go to a Redis that
    refuses connections (a real one, nothing listening), and the engine tier's broker."""
    db = Database(config, pool_size=2)
    dead = make_redis(config.with_overrides(redis_url="redis://127.0.0.1:1/0"))
    services = dataclasses.replace(engine_services, db=db, redis=dead)
    yield services
    db.dispose()


def test_a_redis_outage_never_fails_a_transition(
    e: Engine, redis_down: Services, caplog: pytest.LogCaptureFixture
) -> None:
    workflow_id = e.workflow(step("a"), step("b"))
    down = Engine.__new__(Engine)
    down.services, down.queue, down.company_id = redis_down, e.queue, e.company_id
    with caplog.at_level(logging.WARNING, logger="baton.events"):
        run_id = down.trigger(workflow_id)
        e.queue.take(run_id)
        claim = down.claim(run_id, "a")
        assert claim is not None
        chained = down.record(claim, success()).claim
        assert chained is not None
        down.record(chained, success())
    assert e.run(run_id).status == R.COMPLETED
    assert [r.status for r in [e.step(run_id, "a"), e.step(run_id, "b")]] == [S.SUCCESS, S.SUCCESS]
    assert e.events(run_id) == [], "nothing reached the stream"
    warnings = [r for r in caplog.records if "could not publish" in r.getMessage()]
    assert len(warnings) == 4, "one per commit: trigger, claim, chain, complete"


def test_publishing_is_one_round_trip_per_commit(e: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = events.publisher_for(e.services.db)
    assert publisher is not None
    calls: list[int] = []
    real = publisher.publish

    def counting(noted: list[events.Event]) -> None:
        calls.append(len(noted))
        real(noted)

    monkeypatch.setattr(publisher, "publish", counting)
    run_id, claim = e.start(step("a"), step("b"))
    e.record(claim, success())
    # trigger (run + first step), claim (step + run), chain (a success + b running)
    assert calls == [2, 2, 2]
    assert len(e.events(run_id)) == 6


def test_a_worker_ships_its_commits_events_from_a_thread_in_order_and_flushes_them_on_stop(
    e: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = events.publisher_for(e.services.db)
    assert publisher is not None
    calls: list[int] = []
    real = publisher._send

    def counting(encoded: list[object]) -> None:
        calls.append(len(encoded))
        real(encoded)

    monkeypatch.setattr(publisher, "_send", counting)
    publisher.start_shipping()
    try:
        run_id, claim = e.start(step("a"), step("b"), step("c"))
        b = e.record(claim, success()).claim
        assert b is not None
        c = e.record(b, success()).claim
        assert c is not None
        e.record(c, success())
        deadline = time.monotonic() + 10
        while len(e.events(run_id)) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        publisher.stop_shipping()
    kinds = [(ev["kind"], ev.get("stepId"), ev["status"]) for ev in e.events(run_id)]
    assert kinds == [("run", None, "pending"), ("step", "a", "queued"), *CHAIN_EVENTS]
    assert sum(calls) == 10


def test_stopping_the_shipping_thread_sends_what_it_still_holds(e: Engine) -> None:
    publisher = events.publisher_for(e.services.db)
    assert publisher is not None
    publisher.start_shipping()
    run_ids = [e.trigger(e.workflow(step("a"))) for _ in range(20)]
    publisher.stop_shipping()
    assert all(len(e.events(run_id)) == 2 for run_id in run_ids), "every trigger's two events, once"
    run_id = e.trigger(e.workflow(step("a")))
    assert len(e.events(run_id)) == 2, "published at once again after the stop"
