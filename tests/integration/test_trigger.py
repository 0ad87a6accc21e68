"""trigger_run: one commit, then the first step's message; idempotency; a broker that is down."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import DataError

from app import engine, workflows
from app.engine import sweeps
from app.engine.states import STUCK_AFTER
from app.engine.trigger import insert_run, request_hash
from app.errors import Conflict, NotFound, ValidationError
from app.services import Services
from app.timeutil import utcnow
from models import Run, Workflow
from models.states import RunStatus, StepStatus
from tests import factories
from tests.integration.conftest import Engine, blocked_on_locks, step, unique, wait_for

R, S = RunStatus, StepStatus


def trigger(e: Engine, workflow_id: str, run_input: Any = None, **kwargs: Any) -> tuple[Run, bool]:
    return engine.trigger_run(e.services, e.company_id, workflow_id, run_input or {}, "api", **kwargs)


def test_a_trigger_commits_a_pending_run_and_sends_its_first_step(e: Engine) -> None:
    wid = e.workflow(step("a"), step("b"), timeoutMs=60_000)
    before = utcnow()
    run, created = trigger(e, wid, {"n": 1})
    assert created
    stored = e.run(run.id)
    assert (stored.status, stored.input, stored.trigger_type, stored.workflow_version) == (
        R.PENDING,
        {"n": 1},
        "api",
        1,
    )
    assert stored.started_at is None and stored.restarted_from_run_id is None
    assert stored.deadline_at == stored.created_at + timedelta(milliseconds=60_000)
    assert before <= stored.created_at <= utcnow()
    a, b = e.step(run.id, "a"), e.step(run.id, "b")
    assert (a.status, a.attempt, a.queued_at, a.reused) == (S.QUEUED, 1, stored.created_at, False)
    assert (b.status, b.attempt, b.queued_at) == (S.PENDING, 0, None)
    [sent] = e.sent(run.id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("a", 1, False)


def test_a_workflow_without_timeout_gives_no_deadline(e: Engine) -> None:
    run, _ = trigger(e, e.workflow(step("a")))
    assert e.run(run.id).deadline_at is None


@pytest.mark.parametrize("bad", [[1, 2], "text", 3, None])
def test_the_input_must_be_an_object(e: Engine, bad: Any) -> None:
    wid = e.workflow(step("a"))
    with pytest.raises(ValidationError, match="input must be a JSON object"):
        engine.trigger_run(e.services, e.company_id, wid, bad, "api")


def test_an_unknown_deleted_or_foreign_workflow_is_not_found(e: Engine) -> None:
    with pytest.raises(NotFound):
        trigger(e, "wf_does-not-exist")
    with pytest.raises(NotFound):
        trigger(e, "not a workflow id")
    wid = e.workflow(step("a"))
    with pytest.raises(NotFound):
        engine.trigger_run(e.services, "co_someone_else", wid, {}, "api")
    with e.services.db.session() as session:
        workflows.delete(session, e.company_id, wid)
    with pytest.raises(NotFound):
        trigger(e, wid)


def test_a_new_version_is_used_by_new_runs_only(e: Engine) -> None:
    wid = e.workflow(step("a"))
    first, _ = trigger(e, wid)
    with e.services.db.session() as session:
        workflows.replace(session, e.company_id, wid, {"name": "v2", "steps": [step("x"), step("y")]})
    second, _ = trigger(e, wid)
    assert e.run(first.id).workflow_version == 1 and e.run(second.id).workflow_version == 2
    assert [r.step_id for r in _steps(e, second.id)] == ["x", "y"]
    assert [r.step_id for r in _steps(e, first.id)] == ["a"]


def _steps(e: Engine, run_id: str) -> list:
    with e.services.db.session() as session:
        return engine.step_runs(session, run_id)


# ------------------------------------------------------------------ idempotency


def test_a_repeat_with_the_same_key_returns_the_same_run(e: Engine) -> None:
    wid = e.workflow(step("a"))
    key = unique()
    first, created = trigger(e, wid, {"n": 1}, idempotency_key=key)
    again, created_again = trigger(e, wid, {"n": 1}, idempotency_key=key)
    assert created and not created_again
    assert again.id == first.id
    assert e.run(first.id).idempotency_key == key
    assert len(e.sent(first.id)) == 1, "a repeat sends nothing"


def test_the_same_key_with_another_body_is_a_conflict(e: Engine) -> None:
    wid = e.workflow(step("a"))
    key = unique()
    trigger(e, wid, {"n": 1}, idempotency_key=key)
    with pytest.raises(Conflict, match="different request body"):
        trigger(e, wid, {"n": 2}, idempotency_key=key)


def test_a_fingerprint_replaces_the_body_hash(e: Engine) -> None:
    wid = e.workflow(step("a"))
    key = unique()
    first, _ = trigger(e, wid, {"delivery": 1}, idempotency_key=key, fingerprint="evt_1")
    again, created = trigger(
        e, wid, {"delivery": 1, "retried": True}, idempotency_key=key, fingerprint="evt_1"
    )
    assert again.id == first.id and not created


def test_keys_are_per_workflow(e: Engine) -> None:
    key = unique()
    one, _ = trigger(e, e.workflow(step("a")), idempotency_key=key)
    other, created = trigger(e, e.workflow(step("a")), idempotency_key=key)
    assert created and other.id != one.id


def test_an_expired_key_makes_a_new_run_and_releases_the_old_one(e: Engine) -> None:
    wid = e.workflow(step("a"))
    key = unique()
    old, _ = trigger(e, wid, {"n": 1}, idempotency_key=key)
    with e.services.db.session() as session:
        session.execute(
            update(Run)
            .where(Run.id == old.id)
            .values(created_at=utcnow() - engine.IDEMPOTENCY_TTL - timedelta(seconds=1))
        )
        session.commit()
    new, created = trigger(e, wid, {"n": 2}, idempotency_key=key)
    assert created and new.id != old.id
    assert e.run(old.id).idempotency_key is None
    assert e.run(new.id).idempotency_key == key


def test_a_concurrent_request_with_the_same_key_gets_the_run_that_won(e: Engine) -> None:
    """The loser of the unique index finds the winner's run after its commit fails."""
    wid = e.workflow(step("a"))
    won_id = race_for_a_key(e, wid)
    with e.services.db.session() as session:
        ids = session.execute(select(Run.id).where(Run.workflow_id == wid)).scalars().all()
    assert ids == [won_id], "the loser's run was rolled back"


# ------------------------------------------------------------------ the broker is down


def test_a_trigger_with_the_broker_down_is_committed_and_left_to_the_sweep(
    e: Engine, broker_down: Services
) -> None:
    wid = e.workflow(step("a"))
    before = utcnow()
    run, created = engine.trigger_run(broker_down, e.company_id, wid, {}, "api")
    assert created and e.sent(run.id) == []
    row = e.step(run.id, "a")
    assert row.status == S.QUEUED
    assert row.queued_at <= before - STUCK_AFTER + timedelta(seconds=1), "backdated: due for the next sweep"
    e.sweeping(sweeps.sweep_lost_messages, utcnow())
    assert [(m.step_id, m.attempt) for m in e.sent(run.id)] == [("a", 1)]


def test_an_approval_whose_next_message_cannot_be_sent_is_still_answered(
    e: Engine, broker_down: Services
) -> None:
    run_id = e.suspend(step("ok", "approval"), step("b"))
    engine.resume_run(broker_down, e.company_id, run_id, True, None)
    assert e.run(run_id).status == R.RUNNING
    assert e.step(run_id, "b").status == S.QUEUED
    assert e.sent(run_id) == []


# ------------------------------------------------------------------ a version this process knows


def test_a_known_version_triggers_with_one_connection_and_no_orm_statement(e: Engine) -> None:
    """After the first trigger of a version, the next is the one planned statement (it runs on the
    driver's connection, so SQLAlchemy sees a checkout and no statement of its own)."""
    wid = e.workflow(step("a"), step("b"), timeoutMs=60_000)
    trigger(e, wid)
    statements: list[str] = []
    checkouts: list[int] = []
    sa_engine = e.services.db.engine

    def on_statement(*args: Any) -> None:
        statements.append(args[2])

    def on_checkout(*_: Any) -> None:
        checkouts.append(1)

    event.listen(sa_engine, "before_cursor_execute", on_statement)
    event.listen(sa_engine.pool, "checkout", on_checkout)
    try:
        run, created = trigger(e, wid, {"n": 2})
    finally:
        event.remove(sa_engine, "before_cursor_execute", on_statement)
        event.remove(sa_engine.pool, "checkout", on_checkout)
    assert created and statements == [] and len(checkouts) == 1
    stored = e.run(run.id)
    assert (stored.status, stored.input, stored.workflow_version) == (R.PENDING, {"n": 2}, 1)
    assert stored.deadline_at == stored.created_at + timedelta(milliseconds=60_000)
    a, b = e.step(run.id, "a"), e.step(run.id, "b")
    assert (a.position, a.status, a.attempt, a.queued_at, a.reused) == (
        0,
        S.QUEUED,
        1,
        stored.created_at,
        False,
    )
    assert (b.position, b.status, b.attempt, b.queued_at, b.reused) == (1, S.PENDING, 0, None, False)
    assert [(m.step_id, m.attempt, m.company_id) for m in e.sent(run.id)] == [("a", 1, e.company_id)]
    assert [(ev["kind"], ev["status"]) for ev in e.events(run.id)] == [("run", "pending"), ("step", "queued")]


def test_a_known_workflow_deleted_and_made_again_is_read_again(e: Engine) -> None:
    wid = e.workflow(step("a"))
    trigger(e, wid)
    with e.services.db.session() as session:
        workflows.delete(session, e.company_id, wid)
    with pytest.raises(NotFound):
        trigger(e, wid)
    with e.services.db.session() as session:
        again = factories.workflow(session, e.company_id, [step("x")], workflow_id=wid)
        session.commit()
        key = again.key
    run, created = trigger(e, wid)
    stored = e.run(run.id)
    assert created and (stored.workflow_key, stored.workflow_version) == (key, 1)
    assert [r.step_id for r in _steps(e, run.id)] == ["x"]


def test_a_repeat_of_a_known_version_with_the_same_key_returns_the_same_run(e: Engine) -> None:
    wid = e.workflow(step("a"))
    trigger(e, wid)
    key = unique()
    first, created = trigger(e, wid, {"n": 1}, idempotency_key=key)
    again, created_again = trigger(e, wid, {"n": 1}, idempotency_key=key)
    assert created and not created_again and again.id == first.id
    assert (e.run(first.id).idempotency_key, e.run(first.id).idempotency_hash) == (
        key,
        request_hash({"input": {"n": 1}, "triggerType": "api"}),
    )
    with pytest.raises(Conflict):
        trigger(e, wid, {"n": 2}, idempotency_key=key)
    assert len(e.sent(first.id)) == 1


def test_a_concurrent_request_of_a_known_version_with_the_same_key_gets_the_run_that_won(e: Engine) -> None:
    """The planned insert waits on the winner's uncommitted key, inserts nothing, and the general
    path then finds the winner's run."""
    wid = e.workflow(step("a"))
    trigger(e, wid)
    race_for_a_key(e, wid)


def test_a_known_version_with_the_broker_down_is_committed_and_left_to_the_sweep(
    e: Engine, broker_down: Services
) -> None:
    wid = e.workflow(step("a"))
    trigger(e, wid)
    before = utcnow()
    run, created = engine.trigger_run(broker_down, e.company_id, wid, {}, "api")
    assert created and e.sent(run.id) == []
    row = e.step(run.id, "a")
    assert row.status == S.QUEUED and row.queued_at <= before - STUCK_AFTER + timedelta(seconds=1)
    assert [ev["kind"] for ev in e.events(run.id)] == ["run", "step"], "the events' Redis is up"


def test_scripts_lost_by_redis_are_loaded_again(e: Engine) -> None:
    """A Redis restart empties its script cache: the pipelined calls by hash are sent again."""
    wid = e.workflow(step("a"))
    trigger(e, wid)
    e.services.redis.script_flush()
    run, created = trigger(e, wid)
    assert created and [(m.step_id, m.attempt) for m in e.sent(run.id)] == [("a", 1)]
    assert [(ev["kind"], ev["status"]) for ev in e.events(run.id)] == [("run", "pending"), ("step", "queued")]


def test_a_value_postgresql_refuses_is_raised_as_sqlalchemy_raises_it(e: Engine) -> None:
    """The planned statement runs on the driver's connection; its errors still reach the API as
    SQLAlchemy's (a DataError is a 400 there), and the connection stays usable."""
    wid = e.workflow(step("a"))
    trigger(e, wid)
    with pytest.raises(DataError):
        trigger(e, wid, {"text": "a\u0000b"})
    run, created = trigger(e, wid)
    assert created and e.run(run.id).status == R.PENDING


def race_for_a_key(e: Engine, wid: str) -> str:
    """A trigger with a key another transaction holds uncommitted (in the unique index) waits on
    it, and once that one commits gets the winner's run, not a new one: the winner's run id."""
    key = unique()
    fingerprint = request_hash({"input": {"n": 1}, "triggerType": "api"})
    with e.services.db.session() as winner:
        workflow = winner.execute(select(Workflow).where(Workflow.id == wid)).scalar_one()
        definition = engine.definition_for(winner, workflow.key, workflow.current_version)
        won, _ = insert_run(winner, e.company_id, workflow.key, wid, 1, definition, {"n": 1}, "api")
        won.idempotency_key, won.idempotency_hash = key, fingerprint
        winner.flush()  # the key is in the index, not yet committed
        base = blocked_on_locks(e.services)
        result: dict[str, Any] = {}
        loser = threading.Thread(
            target=lambda: result.setdefault("run", trigger(e, wid, {"n": 1}, idempotency_key=key))
        )
        loser.start()
        wait_for(lambda: blocked_on_locks(e.services) == base + 1, what="the loser to wait on the index")
        winner.commit()
        won_id = won.id
    loser.join(30)
    run, created = result["run"]
    assert (run.id, created) == (won_id, False)
    return won_id
