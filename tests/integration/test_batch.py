"""trigger_batch: one commit for every new run, their first steps sent after it; expired keys; a
broker that is down; a concurrent request that takes a key first."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app import engine
from app.engine import batch, sweeps
from app.engine.batch import trigger_batch
from app.engine.states import STUCK_AFTER
from app.services import Services
from app.timeutil import utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, step, unique

R, S = RunStatus, StepStatus


def test_new_runs_are_pending_with_their_first_step_queued_and_sent(e: Engine) -> None:
    wid = e.workflow(step("a"), step("b"), step("c"), timeoutMs=60_000)
    results = trigger_batch(e.services, e.company_id, wid, [{"input": {"i": i}} for i in range(3)])
    assert [r.status for r in results] == ["created"] * 3
    for index, result in enumerate(results):
        run = e.run(result.run_id)
        assert (run.status, run.input, run.trigger_type, run.workflow_version) == (
            R.PENDING,
            {"i": index},
            "api",
            1,
        )
        assert run.deadline_at == run.created_at + timedelta(milliseconds=60_000)
        assert e.statuses(run.id) == [S.QUEUED, S.PENDING, S.PENDING]
        a = e.step(run.id, "a")
        assert (a.attempt, a.queued_at, a.reused) == (1, run.created_at, False)
        assert [(m.step_id, m.attempt, m.delayed) for m in e.sent(run.id)] == [("a", 1, False)]
        assert [ev["status"] for ev in e.events(run.id)] == ["pending", "queued"]


def test_an_expired_key_makes_a_new_run_and_releases_the_old_one(e: Engine) -> None:
    wid = e.workflow(step("a"))
    key = unique()
    old = e.trigger(wid, {"n": 1}, idempotency_key=key)
    with e.services.db.session() as session:
        session.execute(
            update(Run)
            .where(Run.id == old)
            .values(created_at=utcnow() - engine.IDEMPOTENCY_TTL - timedelta(seconds=1))
        )
        session.commit()
    [result] = trigger_batch(e.services, e.company_id, wid, [{"input": {"n": 2}, "idempotencyKey": key}])
    assert result.status == "created" and result.run_id != old
    assert e.run(old).idempotency_key is None
    assert e.run(result.run_id).idempotency_key == key


def test_a_key_taken_by_a_concurrent_commit_is_replayed(e: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unique index refuses the whole pass; the next pass sees the key as used."""
    wid = e.workflow(step("a"))
    key = unique()
    taken: list[str] = []
    insert = batch.insert_new_runs

    def another_request_commits_first(*args: Any) -> None:  # between this pass's read and its insert
        if not taken:
            taken.append(e.trigger(wid, {"n": 1}, idempotency_key=key))
        insert(*args)

    monkeypatch.setattr(batch, "insert_new_runs", another_request_commits_first)
    items = [{"input": {"n": 0}}, {"input": {"n": 1}, "idempotencyKey": key}]
    results = trigger_batch(e.services, e.company_id, wid, items)
    assert [r.status for r in results] == ["created", "replayed"]
    assert results[1].run_id == taken[0]
    with e.services.db.session() as session:
        count = session.execute(select(func.count()).select_from(Run).where(Run.workflow_id == wid)).scalar()
    assert count == 2, "the refused pass was rolled back"


def test_a_batch_with_the_broker_down_is_committed_and_left_to_the_sweep(
    e: Engine, broker_down: Services
) -> None:
    wid = e.workflow(step("a"), step("b"))
    before = utcnow()
    results = trigger_batch(broker_down, e.company_id, wid, [{"input": {}}, {"input": {"x": 1}}])
    run_ids = [r.run_id for r in results]
    assert [r.status for r in results] == ["created", "created"]
    for run_id in run_ids:
        assert e.sent(run_id) == []
        row = e.step(run_id, "a")
        assert row.status == S.QUEUED
        assert row.queued_at <= before - STUCK_AFTER + timedelta(seconds=1), "backdated for the next sweep"
    e.sweeping(sweeps.sweep_lost_messages, utcnow())
    for run_id in run_ids:
        assert [(m.step_id, m.attempt) for m in e.sent(run_id)] == [("a", 1)]
    with e.services.db.session() as session:
        pending = session.execute(
            select(func.count())
            .select_from(StepRun)
            .where(StepRun.run_id.in_(run_ids), StepRun.step_id == "b")
        ).scalar()
    assert pending == 2
