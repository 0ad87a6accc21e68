"""The transition tables, walked: every (from, to) pair of RUN_MOVES and STEP_MOVES is made by the
public call that owns it, on a real row, and published as a run event; a move outside the tables is
reported.

Each pair is a parametrize id of ``test_run_move`` / ``test_step_move`` (taken from the tables
themselves, so a pair added to a table without a case here fails), and each case checks the row
is in ``from`` before its one call and in ``to`` after it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from app.engine import Outcome, sweeps
from app.engine import transitions as move
from app.engine.reads import lock_run, step_row
from app.engine.states import RUN_MOVES, STEP_MOVES, IllegalTransition
from app.timeutil import utcnow
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, failure, parked, retrying, step, success, until_past

R, S = RunStatus, StepStatus
Case = Callable[[Engine], None]
RUN_CASES: dict[tuple[RunStatus, RunStatus], Case] = {}
STEP_CASES: dict[tuple[StepStatus, StepStatus], Case] = {}


def case(table: dict, frm: Any, to: Any) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert (frm, to) not in table, f"two cases for {frm} → {to}"
        table[(frm, to)] = fn
        return fn

    return register


def run_moves(e: Engine, run_id: str, frm: RunStatus, to: RunStatus, act: Callable[[], Any]) -> Any:
    assert e.run(run_id).status == frm
    result = act()
    assert e.run(run_id).status == to
    assert e.events(run_id, "run")[-1]["status"] == to, "the move was published"
    return result


def step_moves(
    e: Engine, run_id: str, step_id: str, frm: StepStatus, to: StepStatus, act: Callable[[], Any]
) -> Any:
    assert e.step(run_id, step_id).status == frm
    result = act()
    assert e.step(run_id, step_id).status == to
    assert e.events(run_id, "step", step_id)[-1]["status"] == to, "the move was published"
    return result


def approval(step_id: str = "approve") -> dict[str, Any]:
    return step(step_id, "approval")


# ------------------------------------------------------------------ runs


@case(RUN_CASES, R.PENDING, R.RUNNING)
def _pending_to_running(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    claim = run_moves(e, run_id, R.PENDING, R.RUNNING, lambda: e.claim(run_id, "a"))
    assert claim is not None and e.run(run_id).started_at is not None


@case(RUN_CASES, R.PENDING, R.CANCELLED)
def _pending_to_cancelled(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    run_moves(e, run_id, R.PENDING, R.CANCELLED, lambda: e.cancel(run_id))


@case(RUN_CASES, R.PENDING, R.TIMEOUT)
def _pending_to_timeout(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), timeoutMs=60_000))
    deadline = e.run(run_id).deadline_at
    run_moves(e, run_id, R.PENDING, R.TIMEOUT, lambda: e.sweeping(sweeps.sweep_timeouts, deadline))
    assert e.run(run_id).error["code"] == "RUN_TIMEOUT"


@case(RUN_CASES, R.RUNNING, R.COMPLETED)
def _running_to_completed(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    run_moves(e, run_id, R.RUNNING, R.COMPLETED, lambda: e.record(claim, success({"x": 1})))
    assert e.run(run_id).output == {"x": 1}


@case(RUN_CASES, R.RUNNING, R.FAILED)
def _running_to_failed(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    run_moves(e, run_id, R.RUNNING, R.FAILED, lambda: e.record(claim, failure("nope")))
    assert e.run(run_id).error == {"code": "STEP_ERROR", "message": "nope"}


@case(RUN_CASES, R.RUNNING, R.CANCELLED)
def _running_to_cancelled(e: Engine) -> None:
    run_id, _ = e.start(step("a"), step("b"))
    run_moves(e, run_id, R.RUNNING, R.CANCELLED, lambda: e.cancel(run_id))


@case(RUN_CASES, R.RUNNING, R.TIMEOUT)
def _running_to_timeout(e: Engine) -> None:
    run_id, _ = e.start(step("a"), timeoutMs=60_000)
    deadline = e.run(run_id).deadline_at
    run_moves(e, run_id, R.RUNNING, R.TIMEOUT, lambda: e.sweeping(sweeps.sweep_timeouts, deadline))


@case(RUN_CASES, R.RUNNING, R.SUSPENDED)
def _running_to_suspended(e: Engine) -> None:
    run_id, claim = e.start(approval(), step("b"))
    run_moves(e, run_id, R.RUNNING, R.SUSPENDED, lambda: e.record(claim, parked(None, suspend=True)))


@case(RUN_CASES, R.SUSPENDED, R.RUNNING)
def _suspended_to_running(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    run_moves(e, run_id, R.SUSPENDED, R.RUNNING, lambda: e.resume(run_id, True, {"ok": 1}))


@case(RUN_CASES, R.SUSPENDED, R.COMPLETED)
def _suspended_to_completed(e: Engine) -> None:
    run_id, claim = e.start(step("a"), approval())  # the approval is the last step
    chained = e.record(claim, success()).claim
    assert chained is not None and chained.step_id == "approve"
    e.record(chained, parked(None, suspend=True))
    run_moves(e, run_id, R.SUSPENDED, R.COMPLETED, lambda: e.resume(run_id, True, {"by": "ann"}))
    assert e.run(run_id).output == {"by": "ann"}


@case(RUN_CASES, R.SUSPENDED, R.FAILED)
def _suspended_to_failed(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    run_moves(e, run_id, R.SUSPENDED, R.FAILED, lambda: e.resume(run_id, False))
    assert e.run(run_id).error["code"] == "APPROVAL_REJECTED"


@case(RUN_CASES, R.SUSPENDED, R.CANCELLED)
def _suspended_to_cancelled(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    run_moves(e, run_id, R.SUSPENDED, R.CANCELLED, lambda: e.cancel(run_id))


@case(RUN_CASES, R.SUSPENDED, R.TIMEOUT)
def _suspended_to_timeout(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"), timeoutMs=60_000)
    deadline = e.run(run_id).deadline_at
    run_moves(e, run_id, R.SUSPENDED, R.TIMEOUT, lambda: e.sweeping(sweeps.sweep_timeouts, deadline))


# ------------------------------------------------------------------ steps


@case(STEP_CASES, S.PENDING, S.QUEUED)
def _step_pending_to_queued(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    step_moves(e, run_id, "b", S.PENDING, S.QUEUED, lambda: e.resume(run_id, True))
    assert [(m.step_id, m.attempt) for m in e.sent(run_id)][-1] == ("b", 1)


@case(STEP_CASES, S.PENDING, S.RUNNING)
def _step_pending_to_running(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    nxt = step_moves(e, run_id, "b", S.PENDING, S.RUNNING, lambda: e.record(claim, success()))
    assert nxt.claim is not None and nxt.claim.step_id == "b" and nxt.claim.attempt == 1


@case(STEP_CASES, S.PENDING, S.SKIPPED)
def _step_pending_to_skipped(e: Engine) -> None:
    run_id, _ = e.start(step("a"), step("b"))
    step_moves(e, run_id, "b", S.PENDING, S.SKIPPED, lambda: e.cancel(run_id))


@case(STEP_CASES, S.QUEUED, S.RUNNING)
def _step_queued_to_running(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    step_moves(e, run_id, "a", S.QUEUED, S.RUNNING, lambda: e.claim(run_id, "a"))


@case(STEP_CASES, S.QUEUED, S.SKIPPED)
def _step_queued_to_skipped(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    step_moves(e, run_id, "a", S.QUEUED, S.SKIPPED, lambda: e.cancel(run_id))


@case(STEP_CASES, S.RUNNING, S.SUCCESS)
def _step_running_to_success(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    step_moves(e, run_id, "a", S.RUNNING, S.SUCCESS, lambda: e.record(claim, success()))


@case(STEP_CASES, S.RUNNING, S.ERROR)
def _step_running_to_error(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    step_moves(e, run_id, "a", S.RUNNING, S.ERROR, lambda: e.record(claim, failure()))


@case(STEP_CASES, S.RUNNING, S.SKIPPED)
def _step_running_to_skipped(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    step_moves(e, run_id, "a", S.RUNNING, S.SKIPPED, lambda: e.record(claim, Outcome(S.SKIPPED)))


@case(STEP_CASES, S.RUNNING, S.QUEUED)
def _step_running_to_queued(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    step_moves(e, run_id, "a", S.RUNNING, S.QUEUED, lambda: e.record(claim, failure(retriable=True)))
    assert e.step(run_id, "a").attempt == 2


@case(STEP_CASES, S.RUNNING, S.WAITING)
def _step_running_to_waiting(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    until = utcnow() + timedelta(minutes=5)
    step_moves(e, run_id, "wait", S.RUNNING, S.WAITING, lambda: e.record(claim, parked(until)))


@case(STEP_CASES, S.WAITING, S.RUNNING)
def _step_waiting_to_running(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    until = utcnow() + timedelta(milliseconds=30)
    e.record(claim, parked(until))
    until_past(until)
    step_moves(e, run_id, "wait", S.WAITING, S.RUNNING, lambda: e.claim(run_id, "wait"))


@case(STEP_CASES, S.WAITING, S.SUCCESS)
def _step_waiting_to_success(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    step_moves(e, run_id, "approve", S.WAITING, S.SUCCESS, lambda: e.resume(run_id, True))


@case(STEP_CASES, S.WAITING, S.ERROR)
def _step_waiting_to_error(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    step_moves(e, run_id, "approve", S.WAITING, S.ERROR, lambda: e.resume(run_id, False))


@case(STEP_CASES, S.WAITING, S.SKIPPED)
def _step_waiting_to_skipped(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    e.record(claim, parked(utcnow() + timedelta(minutes=5)))
    step_moves(e, run_id, "wait", S.WAITING, S.SKIPPED, lambda: e.cancel(run_id))


# ------------------------------------------------------------------ the walk


def _id(pair: tuple[Any, Any]) -> str:
    return f"{pair[0]}->{pair[1]}"


@pytest.mark.parametrize("pair", list(RUN_MOVES), ids=_id)
def test_run_move(pair: tuple[RunStatus, RunStatus], e: Engine) -> None:
    RUN_CASES[pair](e)


@pytest.mark.parametrize("pair", list(STEP_MOVES), ids=_id)
def test_step_move(pair: tuple[StepStatus, StepStatus], e: Engine) -> None:
    STEP_CASES[pair](e)


def test_every_pair_of_the_tables_has_a_case_and_no_case_is_outside_them() -> None:
    assert set(RUN_CASES) == set(RUN_MOVES)
    assert set(STEP_CASES) == set(STEP_MOVES)


# ------------------------------------------------------------------ illegal moves


def test_an_illegal_run_move_is_reported(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    e.record(claim, success())
    with e.services.db.session() as session:
        run = lock_run(session, run_id)
        assert run.status == R.COMPLETED
        with pytest.raises(IllegalTransition, match="run completed → running"):
            move.reopen_run(session, run)
        with pytest.raises(IllegalTransition, match="run completed → cancelled"):
            move.end_run(session, run, R.CANCELLED, utcnow())
        with pytest.raises(IllegalTransition, match="run completed → suspended"):
            move.suspend_run(session, run)
        session.rollback()
    assert e.run(run_id).status == R.COMPLETED, "nothing was written"


def test_an_illegal_step_move_is_reported(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    with e.services.db.session() as session:
        row = step_row(session, run_id, "b")
        assert row.status == S.PENDING
        with pytest.raises(IllegalTransition, match="step pending → success"):
            move.move_step(session, row, S.SUCCESS)
        with pytest.raises(IllegalTransition, match="step pending → waiting"):
            move.move_step(session, row, S.WAITING)
        running = step_row(session, run_id, "a")
        with pytest.raises(IllegalTransition, match="step running → pending"):
            move.record(session, claim, S.PENDING)
        with pytest.raises(IllegalTransition, match="step running → running"):
            move.claim_step(session, running, {})
        session.rollback()
    e.record(claim, success())
    with e.services.db.session() as session:
        done = step_row(session, run_id, "a")
        with pytest.raises(IllegalTransition, match="step success → running"):
            move.claim_step(session, done, {})
        with pytest.raises(IllegalTransition, match="step success → queued"):
            move.move_step(session, done, S.QUEUED)
        session.rollback()
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]


def test_a_move_whose_row_changed_meanwhile_is_refused_not_forced(e: Engine) -> None:
    """Compare-and-set: stale row objects (another transaction moved the rows) change nothing."""
    run_id = e.suspend(approval(), step("b"))
    with e.services.db.session() as session:
        stale_run = lock_run(session, run_id)
        stale_step = step_row(session, run_id, "approve")
        session.expunge_all()
        session.rollback()  # let go of the lock; the objects keep saying suspended and waiting
    e.cancel(run_id)
    with e.services.db.session() as session:
        assert move.reopen_run(session, stale_run) is False
        assert move.end_run(session, stale_run, R.TIMEOUT, utcnow()) is False
        assert move.move_step(session, stale_step, S.SUCCESS) is False
        session.commit()
    assert e.run(run_id).status == R.CANCELLED
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    assert (stale_run.status, stale_step.status) == (R.SUSPENDED, S.WAITING), "the objects did not follow"
