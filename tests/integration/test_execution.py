"""claim_step, record_result (chain, retry, fail, complete, park), release_claim, renew_leases."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import delete, event

from app import engine, metrics
from app.actions import Park
from app.engine import Outcome, hotpath
from app.engine.execution import lease_until
from app.engine.states import LEASE, LEASE_GRACE
from app.services import Services
from app.timeutil import duration_ms, epoch_ms, iso, utcnow
from models import Run
from models.states import RunStatus, StepStatus
from tests.integration.conftest import (
    CHAIN_EVENTS,
    Engine,
    failure,
    parked,
    retrying,
    step,
    success,
    until_past,
)

R, S = RunStatus, StepStatus


# ------------------------------------------------------------------ lease_until


def test_lease_runs_a_lease_past_now_but_never_past_timeout_plus_grace() -> None:
    start = utcnow()
    long_step = {"timeoutMs": 3_600_000}
    assert lease_until(start, long_step, start) == start + LEASE
    later = start + timedelta(minutes=10)
    assert lease_until(start, long_step, later) == later + LEASE
    short_step = {"timeoutMs": 1000}
    hard = start + timedelta(milliseconds=1000) + LEASE_GRACE
    assert lease_until(start, short_step, start + timedelta(seconds=20)) == hard
    assert lease_until(start, short_step, start + timedelta(hours=1)) == hard


# ------------------------------------------------------------------ claim_step


def test_claim_takes_the_queued_step_and_starts_the_run(e: Engine) -> None:
    wid = e.workflow(step("a", input={"x": "{{ input.n }}"}), step("b"))
    run_id = e.trigger(wid, {"n": 7})
    before = utcnow()
    claim = e.claim(run_id, "a")
    after = utcnow()
    assert claim is not None
    assert (claim.run_id, claim.workflow_id, claim.trigger_type) == (run_id, wid, "api")
    assert (claim.step_id, claim.position, claim.attempt, claim.is_last) == ("a", 0, 1, False)
    assert claim.run_input == {"n": 7}
    assert [s["id"] for s in claim.definition["steps"]] == ["a", "b"]
    assert claim.results == {} and claim.resumed_input is None and claim.waited_since is None
    assert before <= claim.started_at <= after
    assert claim.key == (run_id, "a", 1)
    assert claim.template_context()["run"] == {"id": run_id, "workflowId": wid, "triggerType": "api"}
    row = e.step(run_id, "a")
    assert row.status == S.RUNNING and row.started_at == claim.started_at
    assert row.lease_expires_at == claim.started_at + LEASE
    run = e.run(run_id)
    assert run.status == R.RUNNING and run.started_at == claim.started_at


def test_a_message_claim_starts_the_run_in_one_statement_and_one_commit(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b")))
    with statements_of_this_thread(e) as counts:
        claim = e.claim(run_id, "a")
    assert claim is not None and claim.step_id == "a"
    assert counts == {"statements": 1, "commits": 1}, "no ORM load of the run or of its steps"
    assert e.run(run_id).status == R.RUNNING and e.statuses(run_id) == [S.RUNNING, S.PENDING]
    kinds = [(ev["kind"], ev.get("stepId"), ev["status"]) for ev in e.events(run_id)]
    assert kinds[-2:] == [("step", "a", "running"), ("run", None, "running")]


def test_a_duplicate_message_claims_nothing(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    assert e.claim(run_id, "a") is not None
    assert e.claim(run_id, "a") is None
    assert e.step(run_id, "a").status == S.RUNNING


@pytest.mark.parametrize(("step_id", "attempt"), [("a", 2), ("a", 0), ("b", 0), ("b", 1), ("nope", 1)])
def test_a_stale_or_wrong_message_claims_nothing(e: Engine, step_id: str, attempt: int) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b")))
    assert e.claim(run_id, step_id, attempt) is None
    assert e.statuses(run_id) == [S.QUEUED, S.PENDING]
    assert e.run(run_id).status == R.PENDING


def test_a_message_for_a_missing_run_claims_nothing(e: Engine) -> None:
    assert e.claim("run_00000000-0000-0000-0000-000000000000", "a") is None


def test_a_message_for_a_cancelled_run_claims_nothing(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    e.cancel(run_id)
    assert e.claim(run_id, "a") is None
    assert e.statuses(run_id) == [S.SKIPPED]


def test_a_claim_past_the_deadline_times_the_pending_run_out(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b"), timeoutMs=1))
    until_past(e.run(run_id).deadline_at)
    assert e.claim(run_id, "a") is None
    run = e.run(run_id)
    assert run.status == R.TIMEOUT and run.error["code"] == "RUN_TIMEOUT"
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    assert e.services.is_cancel_requested(run_id), "the flag mirrors the timeout"


def test_a_retry_claimed_past_the_deadline_times_the_running_run_out(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3), timeoutMs=300)
    e.record(claim, failure(retriable=True))
    until_past(e.run(run_id).deadline_at)
    assert e.claim(run_id, "a", 2) is None
    assert e.run(run_id).status == R.TIMEOUT
    assert e.statuses(run_id) == [S.SKIPPED]


def test_a_delay_not_yet_due_is_not_claimed_and_a_due_one_resumes(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    until = utcnow() + timedelta(milliseconds=80)
    e.record(claim, parked(until))
    assert e.claim(run_id, "wait") is None, "not due yet"
    until_past(until)
    resumed = e.claim(run_id, "wait")
    assert resumed is not None
    assert resumed.resumed_input == {"p": 1}
    assert resumed.waited_since == claim.started_at == resumed.started_at
    row = e.step(run_id, "wait")
    assert row.status == S.RUNNING and row.started_at == claim.started_at and row.lease_expires_at is not None
    # The executor completes a due delay without running it again.
    done = Outcome(
        S.SUCCESS, input=resumed.resumed_input, output={"delayedMs": 80}, started_at=resumed.waited_since
    )
    nxt = e.record(resumed, done)
    assert nxt.claim is not None and nxt.claim.step_id == "b"
    assert nxt.claim.results["wait"] == {"output": {"delayedMs": 80}, "status": S.SUCCESS}
    assert e.step(run_id, "wait").status == S.SUCCESS


def test_a_claim_carries_the_results_of_finished_steps(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 1), retrying("b", 2), step("c"))
    b = e.record(claim, success({"v": 1})).claim
    e.record(b, failure(retriable=True))
    again = e.claim(run_id, "b", 2)
    assert again is not None and again.attempt == 2
    assert again.results == {"a": {"output": {"v": 1}, "status": S.SUCCESS}}


# ------------------------------------------------------------------ record: chain and complete


def test_success_chains_to_the_next_step_in_one_commit_without_a_message(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"), step("c"))
    completed = utcnow()
    nxt = e.record(claim, success({"v": 1}, completed_at=completed))
    assert nxt.sends == [] and e.sent(run_id) == [], "chaining needs no broker hop"
    follow = nxt.claim
    assert follow is not None
    assert (follow.step_id, follow.position, follow.attempt, follow.started_at) == ("b", 1, 1, completed)
    assert follow.results == {"a": {"output": {"v": 1}, "status": S.SUCCESS}}
    a, b = e.step(run_id, "a"), e.step(run_id, "b")
    assert (a.status, a.output, a.completed_at, a.lease_expires_at) == (S.SUCCESS, {"v": 1}, completed, None)
    assert a.duration_ms == duration_ms(claim.started_at, completed)
    assert (b.status, b.attempt, b.started_at) == (S.RUNNING, 1, completed)
    assert b.lease_expires_at == completed + LEASE
    [log] = e.attempts(run_id)
    assert (log.step_id, log.attempt, log.status, log.output) == ("a", 1, S.SUCCESS, {"v": 1})


@contextmanager
def statements_of_this_thread(e: Engine) -> Iterator[dict[str, int]]:
    """Count the SQL statements and commits this thread sends (other tiers' workers may share the engine)."""
    counts = {"statements": 0, "commits": 0}
    me = threading.get_ident()

    def statement(*_args: object) -> None:
        if threading.get_ident() == me:
            counts["statements"] += 1

    def commit(*_args: object) -> None:
        if threading.get_ident() == me:
            counts["commits"] += 1

    def hot(kind: str) -> None:  # the hot path's statements, on the driver's connection
        (statement if kind == "statement" else commit)()

    bind = e.services.db.engine
    event.listen(bind, "before_cursor_execute", statement)
    event.listen(bind, "commit", commit)
    hotpath.observers.append(hot)
    try:
        yield counts
    finally:
        hotpath.observers.remove(hot)
        event.remove(bind, "before_cursor_execute", statement)
        event.remove(bind, "commit", commit)


def test_a_chained_step_is_recorded_logged_and_the_next_claimed_in_one_statement(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    with statements_of_this_thread(e) as counts:
        nxt = e.record(claim, success({"v": 1}))
    assert nxt.claim is not None and nxt.claim.step_id == "b"
    assert counts == {"statements": 1, "commits": 1}
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]
    assert [(a.step_id, a.status, a.output) for a in e.attempts(run_id)] == [("a", S.SUCCESS, {"v": 1})]


def test_the_last_step_is_recorded_logged_and_its_run_finished_in_one_statement(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    b = e.record(claim, success({"v": 1})).claim
    assert b is not None
    with statements_of_this_thread(e) as counts:
        nxt = e.record(b, success({"v": 2}))
    assert nxt.claim is None and nxt.sends == []
    assert counts == {"statements": 1, "commits": 1}
    run = e.run(run_id)
    assert run.status == R.COMPLETED and run.output == {"v": 2} and run.error is None
    assert run.duration_ms == duration_ms(run.started_at, run.completed_at)
    assert e.step(run_id, "b").completed_at == run.completed_at
    assert [(a.step_id, a.status) for a in e.attempts(run_id)] == [("a", S.SUCCESS), ("b", S.SUCCESS)]
    final = [ev for ev in e.events(run_id) if ev["kind"] == "run"][-1]
    assert final["status"] == "completed" and final["durationMs"] == run.duration_ms
    assert final["completedAt"] == iso(run.completed_at) and final["startedAt"] == iso(run.started_at)


def test_an_output_mapping_that_fails_fails_the_run_in_the_same_statement(e: Engine) -> None:
    run_id, claim = e.start(step("a"), output={"total": "{{ steps.a.output.missing.deeper }}"})
    with statements_of_this_thread(e) as counts:
        e.record(claim, success({"v": 1}))
    assert counts == {"statements": 1, "commits": 1}
    run = e.run(run_id)
    assert run.status == R.FAILED and run.output is None
    assert run.error is not None and run.error["code"] == "OUTPUT_ERROR"
    assert e.step(run_id, "a").status == S.SUCCESS


def test_attempts_recorded_in_one_statement_are_counted_in_the_metrics(e: Engine) -> None:
    def successes() -> float:
        return metrics.STEP_ATTEMPTS.labels("transform", "success")._value.get()

    _run_id, claim = e.start(step("a"), step("b"))
    before = successes()
    b = e.record(claim, success()).claim
    assert b is not None and successes() == before + 1, "the chained step"
    e.record(b, success())
    assert successes() == before + 2, "the last step"
    e.record(b, success())
    assert successes() == before + 2, "a duplicate record counts nothing"


def test_a_chained_record_that_does_not_apply_logs_nothing_and_claims_nothing(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    e.record(claim, success())
    assert e.record(claim, success({"v": 2})).claim is None, "a duplicate delivery's record"
    assert e.step(run_id, "a").output == {"ok": True}
    assert [(a.step_id, a.attempt) for a in e.attempts(run_id)] == [("a", 1)], "exactly one log row"
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]


def test_a_chain_after_cancel_records_and_logs_but_claims_nothing(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    e.cancel(run_id)
    assert e.record(claim, success()).claim is None
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED]
    assert [(a.step_id, a.status) for a in e.attempts(run_id)] == [("a", S.SUCCESS)]


def test_the_last_success_completes_the_run_with_its_output(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    b = e.record(claim, success({"v": 1})).claim
    done_at = utcnow()
    assert e.record(b, success({"v": 2}, completed_at=done_at)).claim is None
    run = e.run(run_id)
    assert (run.status, run.output, run.error, run.completed_at) == (R.COMPLETED, {"v": 2}, None, done_at)
    assert run.duration_ms == duration_ms(run.started_at, done_at)
    assert e.statuses(run_id) == [S.SUCCESS, S.SUCCESS]
    assert [(a.step_id, a.status) for a in e.attempts(run_id)] == [("a", S.SUCCESS), ("b", S.SUCCESS)]


def test_a_skipped_last_step_leaves_the_output_of_the_last_success(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    b = e.record(claim, success({"v": 1})).claim
    e.record(b, Outcome(S.SKIPPED))
    run = e.run(run_id)
    assert run.status == R.COMPLETED and run.output == {"v": 1}
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED]


def test_a_run_of_skipped_steps_completes_with_no_output(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    b = e.record(claim, Outcome(S.SKIPPED)).claim
    assert b is not None, "a skipped step chains like a success"
    e.record(b, Outcome(S.SKIPPED))
    run = e.run(run_id)
    assert run.status == R.COMPLETED and run.output is None


def test_the_output_mapping_renders_from_the_steps(e: Engine) -> None:
    run_id, claim = e.start(
        step("a"),
        step("b"),
        output={"sum": "{{ steps.a.output.v + steps.b.output.v }}", "id": "{{ run.id }}"},
    )
    b = e.record(claim, success({"v": 1})).claim
    e.record(b, success({"v": 2}))
    assert e.run(run_id).output == {"sum": 3, "id": run_id}


def test_an_output_mapping_that_fails_fails_the_run(e: Engine) -> None:
    run_id, claim = e.start(step("a"), output={"x": "{{ steps.a.output.missing.deeper }}"})
    e.record(claim, success({"v": 1}))
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error["code"] == "OUTPUT_ERROR" and run.output is None
    assert e.statuses(run_id) == [S.SUCCESS], "the step itself succeeded"


# ------------------------------------------------------------------ record: retry and fail


def test_a_retriable_failure_queues_the_next_attempt_after_its_backoff(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3), step("b"))
    failed_at = utcnow()
    nxt = e.record(claim, failure("503", retriable=True, completed_at=failed_at))
    assert nxt.claim is None and nxt.sends != []
    assert nxt.sends[0][:3] == (run_id, "a", 2)
    delay = nxt.sends[0][3]
    assert 500 <= delay <= 1000, "fixed 1 s back-off with equal jitter"
    row = e.step(run_id, "a")
    assert (row.status, row.attempt, row.lease_expires_at, row.completed_at) == (S.QUEUED, 2, None, None)
    assert row.queued_at == failed_at + timedelta(milliseconds=delay)
    assert row.error == {"code": "HTTP_ERROR", "message": "503"}
    assert e.run(run_id).status == R.RUNNING
    [log] = e.attempts(run_id)
    assert (log.attempt, log.status, log.error["message"]) == (1, S.ERROR, "503")
    [sent] = e.sent(run_id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("a", 2, True)
    assert epoch_ms(failed_at) + delay - 5000 <= sent.eta <= epoch_ms(utcnow()) + delay
    assert engine.shown_in_results(row.status, row.attempt)


def test_the_next_attempt_runs_and_succeeds(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    e.record(claim, failure(retriable=True))
    second = e.claim(run_id, "a", 2)
    assert second is not None and second.attempt == 2
    assert e.claim(run_id, "a", 1) is None, "the first attempt's message is stale"
    e.record(second, success({"ok": 2}))
    row = e.step(run_id, "a")
    assert (row.status, row.attempt, row.error, row.output) == (S.SUCCESS, 2, None, {"ok": 2})
    assert [(a.attempt, a.status) for a in e.attempts(run_id)] == [(1, S.ERROR), (2, S.SUCCESS)]
    assert e.run(run_id).status == R.COMPLETED


def test_retry_after_is_honoured(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 2))
    nxt = e.record(claim, failure(retriable=True, retry_after_ms=5000))
    assert nxt.sends == [(run_id, "a", 2, 5000)]


def test_retry_after_is_capped_at_max_delay(e: Engine) -> None:
    retry = {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 100, "maxDelayMs": 2000}
    run_id, claim = e.start(step("a", retry=retry))
    nxt = e.record(claim, failure(retriable=True, retry_after_ms=3_600_000))
    assert nxt.sends == [(run_id, "a", 2, 2000)]


def test_an_exhausted_retriable_failure_fails_the_run(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 2), step("b"), step("c"))
    e.record(claim, failure(retriable=True))
    last = e.claim(run_id, "a", 2)
    nxt = e.record(last, failure("still down", retriable=True))
    assert nxt.claim is None and nxt.sends == []
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error == {"code": "STEP_ERROR", "message": "still down"}
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED, S.SKIPPED]
    assert e.step(run_id, "a").attempt == 2
    assert [m.attempt for m in e.sent(run_id)] == [2], "no third attempt"


def test_a_non_retriable_failure_fails_at_once_with_attempts_left(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 5), step("b"))
    e.record(claim, failure("400", retriable=False))
    assert e.run(run_id).status == R.FAILED
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED]
    assert e.sent(run_id) == []


def test_a_failure_without_a_message_fails_the_run_with_a_generic_one(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    e.record(claim, Outcome(S.ERROR))
    assert e.run(run_id).error == {"code": "STEP_ERROR", "message": "Step failed"}


# ------------------------------------------------------------------ record after the run ended


def test_a_step_finishing_after_cancel_records_its_result_and_nothing_follows(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    e.cancel(run_id)
    assert e.statuses(run_id) == [S.RUNNING, S.SKIPPED], "a running step finishes"
    nxt = e.record(claim, success({"v": 1}))
    assert nxt.claim is None and nxt.sends == []
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED]
    assert e.run(run_id).status == R.CANCELLED


def test_a_last_step_finishing_after_cancel_leaves_the_run_cancelled(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    e.cancel(run_id)
    e.record(claim, success({"v": 1}))
    run = e.run(run_id)
    assert run.status == R.CANCELLED and run.output is None
    assert e.statuses(run_id) == [S.SUCCESS]


def test_a_failure_after_cancel_is_recorded_and_the_run_stays_cancelled(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    e.cancel(run_id)
    e.record(claim, failure("late"))
    run = e.run(run_id)
    assert run.status == R.CANCELLED and run.error is None
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED]


def test_a_retriable_failure_after_cancel_is_final(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    e.cancel(run_id)
    nxt = e.record(claim, failure(retriable=True))
    assert nxt.sends == [] and e.sent(run_id) == []
    row = e.step(run_id, "a")
    assert (row.status, row.attempt) == (S.ERROR, 1)
    assert e.run(run_id).status == R.CANCELLED


def test_a_park_after_cancel_skips_the_step(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    e.cancel(run_id)
    nxt = e.record(claim, parked(utcnow() + timedelta(minutes=1)))
    assert nxt.sends == [] and e.sent(run_id) == []
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    assert e.step(run_id, "wait").lease_expires_at is None


def test_a_recorded_attempt_cannot_be_recorded_twice(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    first = e.record(claim, success({"v": 1}))
    again = e.record(claim, success({"v": "dup"}))
    assert again.claim is None and again.sends == []
    assert e.step(run_id, "a").output == {"v": 1}
    assert len(e.attempts(run_id)) == 1
    assert first.claim is not None and e.step(run_id, "b").status == S.RUNNING


@pytest.mark.parametrize(
    "outcome", [success(), failure(), failure(retriable=True)], ids=["success", "error", "retry"]
)
def test_a_second_record_of_the_last_step_changes_nothing(e: Engine, outcome: Outcome) -> None:
    run_id, claim = e.start(retrying("a", 3))
    e.record(claim, failure("first"))
    run = e.run(run_id)
    assert e.record(claim, outcome) == engine.Next()
    assert e.run(run_id).status == run.status == R.FAILED
    assert len(e.attempts(run_id)) == 1 and e.sent(run_id) == []


def test_a_duplicate_retriable_failure_queues_one_retry(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    first = e.record(claim, failure(retriable=True))
    assert e.record(claim, failure(retriable=True)) == engine.Next()
    row = e.step(run_id, "a")
    assert (row.status, row.attempt) == (S.QUEUED, 2)
    assert [m.attempt for m in e.sent(run_id)] == [2] and first.sends != []
    assert len(e.attempts(run_id)) == 1


def test_a_second_park_changes_nothing(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"))
    until = utcnow() + timedelta(minutes=1)
    e.record(claim, parked(until))
    assert e.record(claim, parked(until + timedelta(hours=1))) == engine.Next()
    assert e.step(run_id, "wait").queued_at == until
    assert len(e.sent(run_id)) == 1


def test_a_result_for_a_run_that_no_longer_exists_is_dropped(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    with e.services.db.session() as session:
        session.execute(delete(Run).where(Run.id == run_id))
        session.commit()
    assert e.record(claim, success()) == engine.Next()


# ------------------------------------------------------------------ record: park


def test_a_delay_parks_in_the_database_and_comes_back_as_a_delayed_message(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    until = utcnow() + timedelta(seconds=90)
    now = utcnow()
    nxt = e.record(claim, parked(until))
    assert nxt.claim is None and nxt.sends != []
    assert nxt.sends[0][:3] == (run_id, "wait", 1)
    assert duration_ms(now, until) - 1000 <= nxt.sends[0][3] <= duration_ms(now, until)
    row = e.step(run_id, "wait")
    assert (row.status, row.queued_at, row.input, row.lease_expires_at) == (S.WAITING, until, {"p": 1}, None)
    assert row.started_at == claim.started_at and row.completed_at is None
    assert e.run(run_id).status == R.RUNNING
    [sent] = e.sent(run_id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("wait", 1, True)
    assert abs(sent.eta - epoch_ms(until)) < 1000
    assert e.attempts(run_id) == [], "the attempt is logged when it completes"


def test_a_delay_already_due_comes_back_at_once(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"))
    nxt = e.record(claim, parked(utcnow() - timedelta(seconds=5)))
    assert nxt.sends == [(run_id, "wait", 1, 0)]
    [sent] = e.sent(run_id)
    assert not sent.delayed


def test_an_approval_suspends_the_run_and_sends_nothing(e: Engine) -> None:
    run_id, claim = e.start(step("ok", "approval"), step("b"))
    until = utcnow() + timedelta(hours=1)
    nxt = e.record(claim, parked(until, suspend=True))
    assert nxt == engine.Next()
    assert e.run(run_id).status == R.SUSPENDED
    row = e.step(run_id, "ok")
    assert (row.status, row.queued_at) == (S.WAITING, until)
    assert e.sent(run_id) == []


def test_a_park_with_no_due_time_and_no_suspend_is_refused() -> None:
    """A step waiting for nothing would have no owner: such a Park cannot be made."""
    with pytest.raises(ValueError, match="until"):
        Park(until=None)
    assert Park(until=None, suspend=True).suspend


# ------------------------------------------------------------------ release_claim


def test_release_skips_a_claimed_step_that_must_not_start(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"))
    b = e.record(claim, success()).claim
    e.cancel(run_id)  # after the chain claimed b: b is running, not yet started by its worker
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]
    engine.release_claim(e.services, b)
    row = e.step(run_id, "b")
    assert (row.status, row.lease_expires_at) == (S.SKIPPED, None)
    assert row.completed_at is not None
    assert [a.step_id for a in e.attempts(run_id)] == ["a"], "a released step made no attempt"


def test_release_of_a_claim_no_longer_held_changes_nothing(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    e.record(claim, success())
    engine.release_claim(e.services, claim)
    assert e.statuses(run_id) == [S.SUCCESS]


# ------------------------------------------------------------------ renew_leases


def test_renew_with_nothing_held_does_nothing(e: Engine) -> None:
    assert engine.renew_leases(e.services, []) == 0


def test_renew_extends_the_lease_of_a_running_step(e: Engine) -> None:
    run_id, claim = e.start(step("a"))
    first = e.step(run_id, "a").lease_expires_at
    until_past(claim.started_at + timedelta(milliseconds=5))
    before = utcnow()
    assert engine.renew_leases(e.services, [(claim, before)]) == 1
    after = utcnow()
    lease = e.step(run_id, "a").lease_expires_at
    assert before + LEASE <= lease <= after + LEASE
    assert lease > first


def test_renew_never_extends_past_timeout_plus_grace(e: Engine) -> None:
    run_id, claim = e.start(step("a", timeoutMs=1000))
    held_since = utcnow() - timedelta(hours=1)
    engine.renew_leases(e.services, [(claim, held_since)])
    assert e.step(run_id, "a").lease_expires_at == held_since + timedelta(milliseconds=1000) + LEASE_GRACE


def test_renew_touches_only_running_steps_of_the_attempt_held(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3), step("b"))
    lease = e.step(run_id, "a").lease_expires_at
    stale = dataclasses.replace(claim, attempt=2)
    engine.renew_leases(e.services, [(stale, utcnow() + timedelta(hours=1))])
    assert e.step(run_id, "a").lease_expires_at == lease, "another attempt's lease is not this worker's"
    e.record(claim, failure(retriable=True))  # now queued for attempt 2
    engine.renew_leases(e.services, [(claim, utcnow()), (stale, utcnow())])
    row = e.step(run_id, "a")
    assert (row.status, row.lease_expires_at) == (S.QUEUED, None), "a queued step holds no lease"
    other_run, other = e.start(step("a"))
    other_lease = e.step(other_run, "a").lease_expires_at
    engine.renew_leases(e.services, [(claim, utcnow())])
    assert e.step(other_run, "a").lease_expires_at == other_lease, "only the steps held"
    assert other is not None


# ------------------------------------------------------------------ the broker is down


def test_a_retry_whose_message_cannot_be_sent_is_still_recorded(e: Engine, broker_down: Services) -> None:
    run_id, claim = e.start(retrying("a", 3))
    nxt = engine.record_result(broker_down, claim, failure(retriable=True))
    assert nxt.sends != [] and nxt.sends[0][:3] == (run_id, "a", 2)
    row = e.step(run_id, "a")
    assert (row.status, row.attempt) == (S.QUEUED, 2), "the row is the truth; the sweep sends it"
    assert e.sent(run_id) == []


# ------------------------------------------------------------------ a pure step's deferred claim


def test_a_pure_steps_claim_commits_with_its_result_in_one_commit(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b", "http.request", input={"url": "http://127.0.0.1:1/"})))
    with statements_of_this_thread(e) as claiming:
        claim = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert claim is not None and claim.tx is not None
    assert e.statuses(run_id) == [S.QUEUED, S.PENDING], "not committed: others see the step queued"
    assert e.run(run_id).status == R.PENDING
    with statements_of_this_thread(e) as recording:
        nxt = e.record(claim, success({"v": 1}))
    assert claiming == {"statements": 1, "commits": 0} and recording == {"statements": 1, "commits": 1}
    assert claim.tx is None and nxt.claim is not None and nxt.claim.tx is None
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING] and e.run(run_id).status == R.RUNNING
    kinds = [(ev["kind"], ev.get("stepId"), ev["status"]) for ev in e.events(run_id)]
    assert kinds[2:] == [
        ("step", "a", "running"),
        ("run", None, "running"),
        ("step", "a", "success"),
        ("step", "b", "running"),
    ]


def test_an_abandoned_deferred_claim_leaves_the_step_queued_and_publishes_nothing(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    claim = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert claim is not None and claim.tx is not None
    engine.abandon_claim(claim)
    assert claim.tx is None
    assert e.statuses(run_id) == [S.QUEUED] and e.run(run_id).status == R.PENDING
    assert [ev["status"] for ev in e.events(run_id)] == ["pending", "queued"]
    again = e.claim(run_id, "a")
    assert again is not None, "the redelivered message claims it"
    e.record(again, success())
    assert e.run(run_id).status == R.COMPLETED


def test_a_deferred_claim_whose_step_fails_is_committed_first_then_fails_the_run(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b")))
    claim = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert claim is not None and claim.tx is not None
    engine.commit_claim(claim)
    assert claim.tx is None and e.statuses(run_id) == [S.RUNNING, S.PENDING]
    e.record(claim, failure())
    assert e.run(run_id).status == R.FAILED
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED]


def test_only_pure_actions_defer_their_claim(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a", "http.request", input={"url": "http://127.0.0.1:1/"})))
    claim = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert claim is not None and claim.tx is None, "a step with effects is claimed, committed, then run"
    assert e.statuses(run_id) == [S.RUNNING]


def test_a_lone_hot_statement_commits_by_itself_and_leaves_the_connection_transactional(e: Engine) -> None:
    from sqlalchemy import literal, select

    with hotpath.Tx(e.services.db) as tx:
        assert tx.one_and_commit(hotpath.Statement(select(literal(7))), {}) == (7,)
        assert tx.conn.autocommit is False, "the pool's connections stay in transaction mode"
        assert tx.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        tx.one(hotpath.Statement(select(literal(8))), {})
        assert tx.conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert tx.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "rolled back on close"


def test_hot_path_statements_count_in_the_process_statement_counter(e: Engine) -> None:
    from app import db

    run_id, claim = e.start(step("a"), step("b"))
    before = db.statements_executed()
    with statements_of_this_thread(e) as counts:
        e.record(claim, success())
    assert counts["statements"] == 1
    assert db.statements_executed() - before >= 1, "the driver-connection statement is counted too"


def test_a_chain_of_pure_steps_commits_once_and_shows_nothing_before(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b"), step("c")))
    with statements_of_this_thread(e) as counts:
        a = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
        assert a is not None
        b = e.record(a, success({"v": 1})).claim
        assert b is not None and b.tx is not None, "the open transaction goes on with b"
        c = e.record(b, success({"v": 2})).claim
        assert c is not None and c.tx is not None
    assert counts == {"statements": 3, "commits": 0}
    assert e.statuses(run_id) == [S.QUEUED, S.PENDING, S.PENDING] and e.run(run_id).status == R.PENDING
    assert [ev["status"] for ev in e.events(run_id)] == ["pending", "queued"], "nothing published yet"
    with statements_of_this_thread(e) as counts:
        e.record(c, success({"v": 3}))
    assert counts == {"statements": 1, "commits": 1}
    run = e.run(run_id)
    assert run.status == R.COMPLETED and run.output == {"v": 3}
    assert [(x.step_id, x.output) for x in e.attempts(run_id)] == [
        ("a", {"v": 1}),
        ("b", {"v": 2}),
        ("c", {"v": 3}),
    ]
    kinds = [(ev["kind"], ev.get("stepId"), ev["status"]) for ev in e.events(run_id)][2:]
    assert kinds == CHAIN_EVENTS


def test_an_open_chain_commits_once_it_is_older_than_its_budget(
    e: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotpath, "OPEN_CHAIN_S", 0.0)
    run_id = e.trigger(e.workflow(step("a"), step("b")))
    a = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert a is not None and a.tx is not None, "the claim itself still waits for its result"
    b = e.record(a, success()).claim
    assert b is not None and b.tx is None, "committed: the next step is claimed in the open"
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]
    e.record(b, success())
    assert e.run(run_id).status == R.COMPLETED


def test_an_open_chain_stops_before_a_step_with_effects(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b", "http.request", input={"url": "http://127.0.0.1:1/"})))
    a = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert a is not None and a.tx is not None
    b = e.record(a, success()).claim
    assert b is not None and b.tx is None
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING], "b's claim is committed before it calls out"
    e.record(b, success())
