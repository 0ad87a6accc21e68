"""cancel_run and resume_run (approve, reject) against real rows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app import engine
from app.engine import sweeps
from app.errors import InvalidState, NotFound
from app.timeutil import duration_ms, utcnow
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, parked, step, success

R, S = RunStatus, StepStatus


def approval(step_id: str = "approve") -> dict:
    return step(step_id, "approval")


# ------------------------------------------------------------------ cancel


def test_cancel_ends_the_run_skips_unreached_steps_and_sets_the_flag(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"), step("c"))
    assert not e.services.is_cancel_requested(run_id)
    run = e.cancel(run_id)
    assert run.status == R.CANCELLED and run.completed_at is not None
    stored = e.run(run_id)
    assert stored.status == R.CANCELLED
    assert stored.duration_ms == duration_ms(stored.started_at, stored.completed_at)
    assert e.statuses(run_id) == [S.RUNNING, S.SKIPPED, S.SKIPPED]
    assert e.services.is_cancel_requested(run_id)
    assert claim is not None


def test_cancel_of_a_pending_run_has_no_duration(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    e.cancel(run_id)
    run = e.run(run_id)
    assert run.started_at is None and run.duration_ms is None and run.completed_at is not None


def test_a_cancelled_run_never_executes_another_step(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    e.cancel(run_id)
    assert e.record(claim, success()).claim is None
    assert e.claim(run_id, "b", 0) is None and e.claim(run_id, "b", 1) is None
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED]


@pytest.mark.parametrize("final", [R.COMPLETED, R.FAILED, R.CANCELLED, R.TIMEOUT])
def test_a_finished_run_cannot_be_cancelled(e: Engine, final: RunStatus) -> None:
    run_id = e.make_run(e.workflow(step("a")), final.value)
    with pytest.raises(InvalidState, match="Can only cancel running or pending runs"):
        e.cancel(run_id)
    assert e.run(run_id).status == final


def test_cancel_of_another_company_s_run_is_not_found(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    with pytest.raises(NotFound):
        engine.cancel_run(e.services, "co_someone_else", run_id)
    with pytest.raises(NotFound):
        e.cancel("run_00000000-0000-0000-0000-000000000000")
    assert e.run(run_id).status == R.PENDING


# ------------------------------------------------------------------ resume


def test_approve_continues_with_the_next_step_queued(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b", input={"by": "{{ steps.approve.output.by }}"}), step("c"))
    waited = e.step(run_id, "approve")
    run = e.resume(run_id, True, {"by": "ann"})
    assert run.status == R.RUNNING
    row = e.step(run_id, "approve")
    assert (row.status, row.output, row.error) == (S.SUCCESS, {"by": "ann"}, None)
    assert row.completed_at is not None
    assert row.duration_ms == duration_ms(waited.started_at, row.completed_at)
    b = e.step(run_id, "b")
    assert (b.status, b.attempt) == (S.QUEUED, 1) and b.queued_at is not None
    assert e.statuses(run_id) == [S.SUCCESS, S.QUEUED, S.PENDING]
    [sent] = e.sent(run_id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("b", 1, False)
    [log] = e.attempts(run_id)
    assert (log.step_id, log.status, log.output) == ("approve", S.SUCCESS, {"by": "ann"})
    # The next step sees the approval's data.
    nxt = e.claim(run_id, "b")
    assert nxt.results == {"approve": {"output": {"by": "ann"}, "status": S.SUCCESS}}


def _suspended_on_last(e: Engine, **extra: object) -> str:
    run_id, claim = e.start(step("a"), approval(), **extra)
    chained = e.record(claim, success({"v": 1})).claim
    e.record(chained, parked(None, suspend=True))
    return run_id


def test_approving_the_last_step_completes_the_run_with_its_data(e: Engine) -> None:
    run_id = _suspended_on_last(e)
    run = e.resume(run_id, True, {"by": "ann"})
    assert run.status == R.COMPLETED
    stored = e.run(run_id)
    assert (stored.status, stored.output) == (R.COMPLETED, {"by": "ann"})
    assert stored.completed_at is not None and stored.duration_ms is not None
    assert e.statuses(run_id) == [S.SUCCESS, S.SUCCESS]
    assert e.sent(run_id) == []


def test_approving_the_last_step_renders_the_output_mapping(e: Engine) -> None:
    run_id = _suspended_on_last(
        e, output={"a": "{{ steps.a.output.v }}", "by": "{{ steps.approve.output.by }}"}
    )
    e.resume(run_id, True, {"by": "bob"})
    assert e.run(run_id).output == {"a": 1, "by": "bob"}


def test_approving_the_last_step_with_a_failing_mapping_fails_the_run(e: Engine) -> None:
    run_id = _suspended_on_last(e, output={"x": "{{ steps.approve.output.nothing.here }}"})
    e.resume(run_id, True, None)
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error["code"] == "OUTPUT_ERROR"


def test_approving_with_no_data_succeeds_with_no_output(e: Engine) -> None:
    run_id = _suspended_on_last(e)
    e.resume(run_id, True, None)
    assert e.step(run_id, "approve").output is None
    assert e.run(run_id).output is None, "the last step that succeeded gave no output"


def test_reject_fails_the_step_and_the_run_and_skips_the_rest(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"), step("c"))
    run = e.resume(run_id, False, {"ignored": True})
    assert run.status == R.FAILED
    stored = e.run(run_id)
    assert stored.error == {"code": "APPROVAL_REJECTED", "message": "Approval was rejected"}
    row = e.step(run_id, "approve")
    assert (row.status, row.output, row.error["code"]) == (S.ERROR, None, "APPROVAL_REJECTED")
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED, S.SKIPPED]
    [log] = e.attempts(run_id)
    assert (log.status, log.error["code"]) == (S.ERROR, "APPROVAL_REJECTED")
    assert e.sent(run_id) == []


@pytest.mark.parametrize("approved", [True, False])
def test_only_a_suspended_run_can_be_resumed(e: Engine, approved: bool) -> None:
    run_id, _ = e.start(step("a"))
    with pytest.raises(InvalidState, match="Can only resume suspended runs"):
        e.resume(run_id, approved)
    assert e.run(run_id).status == R.RUNNING


def test_a_cancelled_approval_cannot_be_answered(e: Engine) -> None:
    run_id = e.suspend(approval(), step("b"))
    e.cancel(run_id)
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    with pytest.raises(InvalidState):
        e.resume(run_id, True)


def test_an_approval_answers_once(e: Engine) -> None:
    run_id = _suspended_on_last(e)
    e.resume(run_id, True, {"n": 1})
    with pytest.raises(InvalidState):
        e.resume(run_id, False)
    assert e.run(run_id).status == R.COMPLETED


def test_a_suspended_run_with_no_waiting_step_cannot_be_resumed(e: Engine) -> None:
    wid = e.workflow(approval(), step("b"))
    run_id = e.make_run(wid, "suspended", {"approve": {"status": "success"}})
    with pytest.raises(InvalidState, match="Can only resume suspended runs"):
        e.resume(run_id, True)


def test_resume_of_another_company_s_run_is_not_found(e: Engine) -> None:
    run_id = e.suspend(approval())
    with pytest.raises(NotFound):
        engine.resume_run(e.services, "co_someone_else", run_id, True, None)
    assert e.run(run_id).status == R.SUSPENDED


def test_an_approval_answered_before_its_timeout_sweep_stands(e: Engine) -> None:
    run_id, claim = e.start(approval(), step("b"))
    until = utcnow() + timedelta(minutes=5)
    e.record(claim, parked(until, suspend=True))
    e.resume(run_id, True, {"ok": True})
    assert e.sweeping(sweeps.sweep_approvals, until + timedelta(seconds=1)) >= 0
    assert e.step(run_id, "approve").status == S.SUCCESS
    assert e.run(run_id).status == R.RUNNING
