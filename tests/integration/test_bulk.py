"""Bulk actions driven by hand: the selection snapshot, chunks under a lease, a run acted on once
however often a chunk is gone through, refusals counted as failed, the stalled-action sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from dramatiq import Message
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from app import bulk, engine
from app.queue import STEPS_QUEUE, StepQueue
from app.services import Services
from app.timeutil import utcnow
from models import BulkAction, BulkActionRun, BulkKind, BulkStatus, Run
from tests import factories
from tests.integration.conftest import Engine, step

FAILED_SECOND = {"a": {"status": "success"}, "b": {"status": "error"}}


@pytest.fixture
def b(e: Engine, queue: Any) -> Iterator[Engine]:
    """The engine fixture; the bulk messages a test sends are dropped afterwards (the engine tier
    reads only step messages from its queue)."""
    yield e
    queue.clear()


def _bulk_messages(services: Services) -> list[str]:
    ids = services.redis.lrange(f"{services.namespace}:{STEPS_QUEUE}", 0, -1)
    found = []
    for data in services.redis.hmget(f"{services.namespace}:{STEPS_QUEUE}.msgs", ids) if ids else []:
        message = Message.decode(data)
        if message.actor_name == bulk.BULK_ACTOR:
            found.append(message.args[0])
    return found


def _failed_runs(e: Engine, workflow_id: str, count: int) -> list[str]:
    start = utcnow() - timedelta(hours=1)
    with e.services.db.session() as session:
        ids = [
            factories.run(
                session, workflow_id, "failed", FAILED_SECOND, created_at=start + timedelta(seconds=i)
            ).id
            for i in range(count)
        ]
        session.commit()
    return ids


def _row(e: Engine, bulk_id: str) -> BulkAction:
    with e.services.db.session() as session:
        return session.get(BulkAction, bulk_id)


def _children(e: Engine, run_ids: list[str]) -> dict[str, list[Run]]:
    with e.services.db.session() as session:
        rows = session.execute(select(Run).where(Run.restarted_from_run_id.in_(run_ids))).scalars()
        found: dict[str, list[Run]] = {r: [] for r in run_ids}
        for row in rows:
            found[row.restarted_from_run_id].append(row)
    return found


def _retry(e: Engine, workflow_id: str, **kwargs: Any) -> BulkAction:
    selection = bulk.Selection(BulkKind.RETRY, workflow_id=workflow_id, status="failed")
    action, created = bulk.create(
        e.services, e.company_id, selection, {"filter": {"workflowId": workflow_id}}, **kwargs
    )
    assert created
    return action


def _until_finished(e: Engine, bulk_id: str, **kwargs: Any) -> int:
    """Call ``process`` as the messages it hands over would be, until the action ends; how many."""
    calls = 0
    while _row(e, bulk_id).status == BulkStatus.RUNNING:
        bulk.process(e.services, bulk_id, **kwargs)
        calls += 1
        assert calls < 100
    return calls


def test_the_selection_is_fixed_when_the_action_is_accepted(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    runs = _failed_runs(b, wid, 4)
    b.make_run(wid, "completed")
    action = _retry(b, wid)
    assert action.total == 4 and action.status == BulkStatus.RUNNING
    assert _bulk_messages(b.services) == [action.id]
    late = _failed_runs(b, wid, 1)  # failed after the action was accepted: not part of it
    assert [i.run_id for i in bulk.items(b.services, action.id)] == runs  # oldest first
    _until_finished(b, action.id)
    done = _row(b, action.id)
    assert (done.status, done.total, done.done, done.failed) == (BulkStatus.COMPLETED, 4, 4, 0)
    assert done.completed_at is not None and done.lease_token is None
    assert not _children(b, late)[late[0]]


def test_chunks_hand_over_to_new_messages_and_each_run_is_retried_once(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    runs = _failed_runs(b, wid, 7)
    action = _retry(b, wid)
    b.queue.clear()
    first = bulk.process(b.services, action.id, budget_s=0, chunk=3)
    assert (first.acted, first.handed_over, first.finished) == (3, True, False)
    assert _bulk_messages(b.services) == [action.id]  # the next message, for the rest
    row = _row(b, action.id)
    assert (row.done, row.next_position, row.lease_token) == (3, 3, None)
    calls = _until_finished(b, action.id, budget_s=0, chunk=3)
    assert calls == 3  # 3 + 1 more runs, then the call that finds none left
    children = _children(b, runs)
    assert all(len(kids) == 1 for kids in children.values()), children
    for [child] in children.values():
        # As POST /runs/:id/retry: from the first failed step, linked to the original.
        assert child.restart_from_step_id == "b" and child.company_id == b.company_id
    items = bulk.items(b.services, action.id)
    assert {i.state for i in items} == {"done"}
    assert [i.result_run_id for i in items] == [children[r][0].id for r in runs]


def test_a_chunk_gone_through_again_after_a_lost_commit_makes_no_second_run(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    runs = _failed_runs(b, wid, 3)
    action = _retry(b, wid)
    bulk.process(b.services, action.id)
    made = {r: [k.id for k in kids] for r, kids in _children(b, runs).items()}
    # As if the chunk's commit had been lost after the new runs were made (a worker killed there).
    with b.services.db.session() as session:
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == action.id)
            .values(status=BulkStatus.RUNNING, done=0, next_position=0, completed_at=None)
        )
        session.execute(
            update(BulkActionRun)
            .where(BulkActionRun.bulk_action_id == action.id)
            .values(state="pending", result_run_id=None)
        )
        session.commit()
    bulk.process(b.services, action.id)
    assert {r: [k.id for k in kids] for r, kids in _children(b, runs).items()} == made
    row = _row(b, action.id)
    assert (row.status, row.done, row.failed) == (BulkStatus.COMPLETED, 3, 0)


def test_a_message_finding_the_lease_held_does_nothing(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    runs = _failed_runs(b, wid, 2)
    action = _retry(b, wid)
    with b.services.db.session() as session:
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == action.id)
            .values(lease_token="someone-else", lease_expires_at=utcnow() + timedelta(seconds=30))
        )
        session.commit()
    assert bulk.process(b.services, action.id).acted == 0
    assert not any(_children(b, runs).values())
    # Once that lease has expired (its holder died), the next message carries on.
    with b.services.db.session() as session:
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == action.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert bulk.process(b.services, action.id).finished
    assert all(len(kids) == 1 for kids in _children(b, runs).values())


def test_runs_that_changed_after_selection_count_as_failed_or_done(b: Engine) -> None:
    wid = b.workflow(step("a"))
    live = [b.make_run(wid, "pending") for _ in range(3)]
    selection = bulk.Selection(BulkKind.CANCEL, run_ids=tuple(live))
    action, _ = bulk.create(b.services, b.company_id, selection, {"runIds": live})
    assert action.total == 3
    with b.services.db.session() as session:  # one finished, one was cancelled by someone else
        session.execute(update(Run).where(Run.id == live[0]).values(status="completed"))
        session.commit()
    b.cancel(live[1])
    bulk.process(b.services, action.id)
    row = _row(b, action.id)
    assert (row.status, row.total, row.done, row.failed) == (BulkStatus.COMPLETED, 3, 2, 1)
    outcome = {i.run_id: (str(i.state), i.error) for i in bulk.items(b.services, action.id)}
    assert outcome[live[0]] == (
        "failed",
        {"code": "INVALID_STATE", "message": "Can only cancel running or pending runs"},
    )
    assert outcome[live[1]] == ("done", None) and outcome[live[2]] == ("done", None)
    assert b.run(live[2]).status == "cancelled"


def test_an_internal_error_fails_the_action(b: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    wid = b.workflow(step("a"), step("b"))
    _failed_runs(b, wid, 1)
    action = _retry(b, wid)

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(bulk, "_next_items", broken)
    bulk.process(b.services, action.id)
    row = _row(b, action.id)
    assert row.status == BulkStatus.FAILED and row.error["code"] == "INTERNAL_ERROR"
    assert row.completed_at is not None


def test_the_sweep_resends_a_stalled_action_and_leaves_a_held_one(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    _failed_runs(b, wid, 2)
    stalled, held = _retry(b, wid), _retry(b, wid)
    b.queue.clear()  # both messages lost
    later = utcnow() + bulk.STALLED_AFTER + timedelta(seconds=1)
    with b.services.db.session() as session:
        session.execute(
            update(BulkAction)
            .where(BulkAction.id == held.id)
            .values(lease_token="alive", lease_expires_at=later + timedelta(seconds=30))
        )
        session.commit()
    mine = {stalled.id, held.id}

    def sent() -> list[str]:
        return [i for i in _bulk_messages(b.services) if i in mine]  # other tests' actions aside

    bulk.sweep(b.services, now=utcnow())
    assert sent() == []  # not stalled yet
    bulk.sweep(b.services, now=later)
    assert sent() == [stalled.id]
    bulk.sweep(b.services, now=later)
    assert sent() == [stalled.id]  # moved on by the sweep: not sent again at once
    bulk.process(b.services, stalled.id)
    assert _row(b, stalled.id).status == BulkStatus.COMPLETED
    b.queue.clear()
    # Once the holder's lease has expired it is sent again; a finished action never is.
    bulk.sweep(b.services, now=later + bulk.STALLED_AFTER * 3)
    assert sent() == [held.id]
    with b.services.db.session() as session:  # over: no later sweep of the session sends it
        session.execute(update(BulkAction).where(BulkAction.id == held.id).values(status=BulkStatus.FAILED))
        session.commit()


def test_an_action_whose_message_the_broker_refused_is_sent_by_the_next_sweep(
    b: Engine, broker_down: Services
) -> None:
    wid = b.workflow(step("a"), step("b"))
    _failed_runs(b, wid, 1)
    selection = bulk.Selection(BulkKind.RETRY, workflow_id=wid, status="failed")
    down = dataclasses.replace(broker_down, queue=StepQueue(broker_down.queue.broker))
    action, created = bulk.create(down, b.company_id, selection, {})
    assert created and _row(b, action.id).status == BulkStatus.RUNNING
    assert action.id not in _bulk_messages(b.services)
    bulk.sweep(b.services)  # at once: the refused send marked it stalled
    assert action.id in _bulk_messages(b.services)
    bulk.process(b.services, action.id)
    assert _row(b, action.id).status == BulkStatus.COMPLETED


def test_the_same_key_returns_the_same_action(b: Engine) -> None:
    wid = b.workflow(step("a"), step("b"))
    _failed_runs(b, wid, 2)
    selection = bulk.Selection(BulkKind.RETRY, workflow_id=wid, status="failed")
    first, created = bulk.create(
        b.services, b.company_id, selection, {}, idempotency_key="k", fingerprint="f"
    )
    again, replayed = bulk.create(
        b.services, b.company_id, selection, {}, idempotency_key="k", fingerprint="f"
    )
    assert created and not replayed and again.id == first.id
    with b.services.db.session() as session:
        count = session.execute(select(BulkAction.id).where(BulkAction.company_id == b.company_id)).all()
    assert len(count) == 1


def test_an_outage_midway_keeps_the_runs_before_it_and_the_redelivery_acts_once(
    b: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    wid = b.workflow(step("a"), step("b"))
    runs = _failed_runs(b, wid, 6)
    action = _retry(b, wid)
    real = engine.start_restart
    broken = {runs[2]}

    def flaky(services: Services, plan: Any, key: str | None = None) -> Any:
        if plan.original.id in broken:
            broken.clear()
            raise OperationalError("INSERT", {}, Exception("connection lost"))
        return real(services, plan, key)

    monkeypatch.setattr(engine, "start_restart", flaky)
    with pytest.raises(OperationalError):  # the message is redelivered by the broker's Retries
        bulk.process(b.services, action.id)
    row = _row(b, action.id)
    assert (row.done, row.next_position, row.lease_token) == (2, 2, None)  # the runs before it
    bulk.process(b.services, action.id)
    row = _row(b, action.id)
    assert (row.status, row.done, row.failed) == (BulkStatus.COMPLETED, 6, 0)
    assert all(len(kids) == 1 for kids in _children(b, runs).values())


def test_a_bulk_retry_on_the_embedded_sqlite_database(
    engine_services: Services, queue: Any, tmp_path: Any
) -> None:
    from app.db import Database
    from app.migrate import upgrade

    db = Database(engine_services.config.with_overrides(database_url=None, var_dir=tmp_path))
    try:
        upgrade(db)
        services = dataclasses.replace(engine_services, db=db)
        with db.session() as session:
            company_id = factories.company(session).id
            workflow = factories.workflow(session, company_id, [step("a"), step("b")])
            start = utcnow() - timedelta(minutes=5)
            runs = [
                factories.run(
                    session, workflow, "failed", FAILED_SECOND, created_at=start + timedelta(seconds=i)
                ).id
                for i in range(3)
            ]
            session.commit()
        selection = bulk.Selection(BulkKind.RETRY, workflow_id=workflow.id, status="failed")
        assert bulk.preview(services, company_id, selection) == (3, runs)
        action, _ = bulk.create(services, company_id, selection, {})
        assert action.total == 3
        assert bulk.process(services, action.id).finished
        with db.session() as session:
            row = session.get(BulkAction, action.id)
            assert (row.status, row.done, row.failed) == (BulkStatus.COMPLETED, 3, 0)
            children = session.execute(
                select(Run.restarted_from_run_id).where(Run.restarted_from_run_id.is_not(None))
            )
            assert sorted(children.scalars()) == sorted(runs)
    finally:
        queue.clear()
        db.dispose()


def test_the_scheduler_leader_sweeps_stalled_bulk_actions(b: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import scheduler

    monkeypatch.setattr(scheduler, "sweep", lambda services: {})  # the run sweeps have tests of their own
    monkeypatch.setattr(scheduler.schedules, "fire_due", lambda services: 0)
    wid = b.workflow(step("a"), step("b"))
    _failed_runs(b, wid, 1)
    action = _retry(b, wid)
    b.queue.clear()  # its message lost
    with b.services.db.session() as session:
        stalled_at = utcnow() - bulk.STALLED_AFTER - timedelta(seconds=1)
        session.execute(update(BulkAction).where(BulkAction.id == action.id).values(updated_at=stalled_at))
        session.commit()
    leader = scheduler.Scheduler(b.services)
    counts = leader.run_once()
    leader._release()
    assert counts is not None and counts["bulkResent"] >= 1
    assert action.id in _bulk_messages(b.services)
    bulk.process(b.services, action.id)
    assert _row(b, action.id).status == BulkStatus.COMPLETED
