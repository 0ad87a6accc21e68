"""The recovery sweeps, each driven with an explicit ``now``: timeouts, approvals, lost messages,
a broker restart, dead workers; and two sweepers at once."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select

from app import engine
from app.engine import Next, sweep, sweeps
from app.engine.states import LEASE, STUCK_AFTER
from app.services import Services
from app.timeutil import utcnow
from models import StepRun
from models.states import RunStatus, StepStatus
from tests.integration.conftest import (
    Engine,
    blocked_on_locks,
    failure,
    parked,
    retrying,
    step,
    success,
    wait_for,
)

R, S = RunStatus, StepStatus
SWEEP_KINDS = {"resent", "timedOut", "approvalsExpired", "requeued", "leasesExpired", "slotsReconciled"}
LATER = timedelta(days=1)


def in_threads(*calls: Any, timeout: float = 30.0) -> list[Any]:
    """Run each call in a thread of its own, started together; their results (or errors) in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Any) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except BaseException as exc:  # surfaced by the caller
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a sweeper hung"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


# ------------------------------------------------------------------ sweep_timeouts


def test_a_pending_run_past_its_deadline_times_out(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), step("b"), timeoutMs=60_000))
    deadline = e.run(run_id).deadline_at
    assert e.sweeping(sweeps.sweep_timeouts, deadline - timedelta(milliseconds=1)) >= 0
    assert e.run(run_id).status == R.PENDING, "not before its deadline"
    assert e.sweeping(sweeps.sweep_timeouts, deadline) >= 1
    run = e.run(run_id)
    assert (run.status, run.error, run.completed_at) == (
        R.TIMEOUT,
        {"code": "RUN_TIMEOUT", "message": "Run exceeded its timeoutMs"},
        deadline,
    )
    assert run.duration_ms is None, "it never started"
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    assert e.services.is_cancel_requested(run_id)


def test_a_running_run_times_out_and_its_running_step_records_later(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"), timeoutMs=60_000)
    deadline = e.run(run_id).deadline_at
    e.sweeping(sweeps.sweep_timeouts, deadline + timedelta(seconds=1))
    run = e.run(run_id)
    assert run.status == R.TIMEOUT and run.duration_ms is not None
    assert e.statuses(run_id) == [S.RUNNING, S.SKIPPED], "the running step finishes on its own"
    assert e.record(claim, success()).claim is None
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED]
    assert e.run(run_id).status == R.TIMEOUT


def test_a_suspended_run_times_out_and_its_approval_is_skipped(e: Engine) -> None:
    run_id = e.suspend(step("ok", "approval"), step("b"), timeoutMs=60_000)
    e.sweeping(sweeps.sweep_timeouts, e.run(run_id).deadline_at)
    assert e.run(run_id).status == R.TIMEOUT
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]


def test_a_run_waiting_on_a_delay_times_out(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"), timeoutMs=60_000)
    e.record(claim, parked(utcnow() + timedelta(hours=1)))
    e.sweeping(sweeps.sweep_timeouts, e.run(run_id).deadline_at)
    assert e.run(run_id).status == R.TIMEOUT
    assert e.statuses(run_id) == [S.SKIPPED, S.SKIPPED]
    assert e.claim(run_id, "wait") is None


def test_runs_without_a_deadline_or_already_finished_are_left_alone(e: Engine) -> None:
    forever = e.trigger(e.workflow(step("a")))
    done = e.make_run(e.workflow(step("a"), timeoutMs=1000), "completed")
    e.sweeping(sweeps.sweep_timeouts, utcnow() + timedelta(days=3650))
    assert e.run(forever).status == R.PENDING
    assert e.run(done).status == R.COMPLETED


def test_a_timeout_sweep_twice_ends_the_run_once(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a"), timeoutMs=60_000))
    at = e.run(run_id).deadline_at
    e.sweeping(sweeps.sweep_timeouts, at)
    first = e.run(run_id)
    e.sweeping(sweeps.sweep_timeouts, at + timedelta(hours=1))
    again = e.run(run_id)
    assert (again.status, again.completed_at) == (first.status, first.completed_at)


# ------------------------------------------------------------------ sweep_approvals


def test_an_approval_past_its_timeout_fails_the_run(e: Engine) -> None:
    run_id, claim = e.start(step("ok", "approval"), step("b"), step("c"))
    until = utcnow() + timedelta(minutes=10)
    e.record(claim, parked(until, suspend=True))
    e.sweeping(sweeps.sweep_approvals, until - timedelta(milliseconds=1))
    assert e.run(run_id).status == R.SUSPENDED, "not before its timeout"
    assert e.sweeping(sweeps.sweep_approvals, until) >= 1
    run = e.run(run_id)
    assert run.status == R.FAILED
    assert run.error == {"code": "APPROVAL_TIMEOUT", "message": "No approval before the step's timeoutMs"}
    row = e.step(run_id, "ok")
    assert (row.status, row.error["code"], row.completed_at) == (S.ERROR, "APPROVAL_TIMEOUT", until)
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED, S.SKIPPED]
    [log] = e.attempts(run_id)
    assert (log.step_id, log.status, log.error["code"]) == ("ok", S.ERROR, "APPROVAL_TIMEOUT")


def test_an_approval_with_no_timeout_never_expires(e: Engine) -> None:
    run_id = e.suspend(step("ok", "approval"))
    e.sweeping(sweeps.sweep_approvals, utcnow() + timedelta(days=3650))
    assert e.run(run_id).status == R.SUSPENDED


def test_a_cancelled_approval_is_not_swept(e: Engine) -> None:
    run_id, claim = e.start(step("ok", "approval"))
    until = utcnow() + timedelta(minutes=1)
    e.record(claim, parked(until, suspend=True))
    e.cancel(run_id)
    e.sweeping(sweeps.sweep_approvals, until + LATER)
    assert e.run(run_id).status == R.CANCELLED and e.statuses(run_id) == [S.SKIPPED]


# ------------------------------------------------------------------ sweep_lost_messages


def test_a_queued_step_whose_message_was_lost_is_sent_again(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    e.queue.take(run_id)  # lost: Redis restarted empty, or the enqueue after the commit failed
    queued_at = e.step(run_id, "a").queued_at
    e.sweeping(sweeps.sweep_lost_messages, queued_at + STUCK_AFTER - timedelta(milliseconds=1))
    assert e.sent(run_id) == [], "not stuck yet"
    now = queued_at + STUCK_AFTER
    assert e.sweeping(sweeps.sweep_lost_messages, now) >= 1
    [sent] = e.sent(run_id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("a", 1, False)
    row = e.step(run_id, "a")
    assert (row.status, row.queued_at) == (S.QUEUED, now), "its clock starts again"
    e.sweeping(sweeps.sweep_lost_messages, now)
    assert len(e.sent(run_id)) == 1, "not sent twice within STUCK_AFTER"
    assert e.claim(run_id, "a") is not None, "the re-sent message is claimable"


def test_a_stuck_retry_is_sent_again_once_due(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    e.record(claim, failure(retriable=True, retry_after_ms=60_000))
    e.queue.take(run_id)
    due = e.step(run_id, "a").queued_at
    e.sweeping(sweeps.sweep_lost_messages, due)
    assert e.sent(run_id) == [], "a retry not yet overdue keeps its delayed message"
    e.sweeping(sweeps.sweep_lost_messages, due + STUCK_AFTER)
    assert [(m.step_id, m.attempt, m.delayed) for m in e.sent(run_id)] == [("a", 2, False)]


def test_a_due_delay_whose_message_was_lost_is_sent_again(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"), step("b"))
    e.record(claim, parked(utcnow() - STUCK_AFTER - timedelta(seconds=1)))
    e.queue.take(run_id)
    now = utcnow()
    assert e.sweeping(sweeps.sweep_lost_messages, now) >= 1
    assert [(m.step_id, m.attempt, m.delayed) for m in e.sent(run_id)] == [("wait", 1, False)]
    assert e.step(run_id, "wait").queued_at == now
    resumed = e.claim(run_id, "wait")
    assert resumed is not None and resumed.waited_since is not None


def test_a_delay_not_yet_due_is_not_sent_again(e: Engine) -> None:
    run_id, claim = e.start(step("wait", "delay"))
    until = utcnow() + timedelta(minutes=10)
    e.record(claim, parked(until))
    e.queue.take(run_id)
    e.sweeping(sweeps.sweep_lost_messages, until + STUCK_AFTER - timedelta(milliseconds=1))
    assert e.sent(run_id) == []
    e.sweeping(sweeps.sweep_lost_messages, until + STUCK_AFTER)
    assert [m.step_id for m in e.sent(run_id)] == ["wait"]


def test_approvals_and_ended_runs_have_no_message_to_lose(e: Engine) -> None:
    suspended, claim = e.start(step("ok", "approval"))
    e.record(claim, parked(utcnow() - timedelta(hours=1), suspend=True))
    cancelled = e.trigger(e.workflow(step("a")))
    e.cancel(cancelled)
    e.queue.take(cancelled)
    e.sweeping(sweeps.sweep_lost_messages, utcnow() + LATER)
    assert e.sent(suspended) == [] and e.sent(cancelled) == []


# ------------------------------------------------------------------ sweep_broker_restart


def test_a_broker_restart_resends_every_queued_step_and_parked_delay_once(e: Engine) -> None:
    queued = e.trigger(e.workflow(step("a")))
    delayed, claim = e.start(step("wait", "delay"), step("b"))
    until = utcnow() + timedelta(minutes=10)
    e.record(claim, parked(until))
    retried, claim = e.start(retrying("a", 3))
    e.record(claim, failure(retriable=True, retry_after_ms=45_000))
    retry_due = e.step(retried, "a").queued_at
    suspended = e.suspend(step("ok", "approval"))
    e.queue.clear()  # Redis came back empty
    e.services.redis.delete(e.services.key("epoch"))
    now = utcnow()

    assert e.sweeping(sweeps.sweep_broker_restart, now) >= 3
    assert e.services.redis.get(e.services.key("epoch")), "the new epoch is marked"
    [a] = e.sent(queued)
    assert (a.step_id, a.attempt, a.delayed) == ("a", 1, False)
    [wait] = e.sent(delayed)
    assert (wait.step_id, wait.attempt, wait.delayed) == ("wait", 1, True)
    assert abs(wait.eta - (now + (until - now)).timestamp() * 1000) < 2000, "back when due, not now"
    [retry] = e.sent(retried)
    assert (retry.step_id, retry.attempt, retry.delayed) == ("a", 2, True)
    assert abs(retry.eta - retry_due.timestamp() * 1000) < 2000
    assert e.sent(suspended) == []
    assert e.step(delayed, "wait").queued_at == until, "a delay keeps its due time"

    assert e.sweeping(sweeps.sweep_broker_restart, now) == 0, "same epoch: nothing to re-send"
    assert e.sweeping(sweeps.sweep_broker_restart, now + LATER) == 0
    assert len(e.queue.sent()) == len({(m.run_id, m.step_id) for m in e.queue.sent()})


def test_a_resend_cut_short_by_another_outage_runs_again(e: Engine, broker_down: Services) -> None:
    run_id = e.trigger(e.workflow(step("a")))
    e.queue.clear()
    e.services.redis.delete(e.services.key("epoch"))
    with pytest.raises(redis.ConnectionError), e.services.db.session() as session:
        sweeps.sweep_broker_restart(broker_down, session, utcnow())
    assert not e.services.redis.exists(e.services.key("epoch")), "not marked done"
    assert e.sweeping(sweeps.sweep_broker_restart, utcnow()) >= 1
    assert [(m.step_id, m.attempt) for m in e.sent(run_id)] == [("a", 1)]
    assert e.sweeping(sweeps.sweep_broker_restart, utcnow()) == 0


def test_a_broker_restart_resends_past_one_batch(e: Engine) -> None:
    wid = e.workflow(*[step(f"s{i}") for i in range(200)])
    every = {f"s{i}": {"status": "queued"} for i in range(200)}
    runs = [e.make_run(wid, "pending", every) for _ in range(3)]
    assert 3 * 200 > sweeps.BATCH
    e.queue.clear()
    e.services.redis.delete(e.services.key("epoch"))
    assert e.sweeping(sweeps.sweep_broker_restart, utcnow()) >= 600
    for run_id in runs:
        assert sorted(m.step_id for m in e.sent(run_id)) == sorted(every)


# ------------------------------------------------------------------ sweep_dead_workers


def _lease(e: Engine, run_id: str, step_id: str = "a") -> Any:
    return e.step(run_id, step_id).lease_expires_at


def test_a_lost_step_with_attempts_left_gets_a_new_attempt(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3), step("b"))
    lease = _lease(e, run_id)
    e.sweeping(sweeps.sweep_dead_workers, lease - timedelta(milliseconds=1))
    assert e.step(run_id, "a").status == S.RUNNING, "the lease still holds"
    assert e.sweeping(sweeps.sweep_dead_workers, lease) >= 1
    row = e.step(run_id, "a")
    assert (row.status, row.attempt, row.queued_at, row.lease_expires_at) == (S.QUEUED, 2, lease, None)
    assert e.run(run_id).status == R.RUNNING
    [sent] = e.sent(run_id)
    assert (sent.step_id, sent.attempt, sent.delayed) == ("a", 2, False)
    [log] = e.attempts(run_id)
    assert (log.attempt, log.status, log.error["code"]) == (1, S.ERROR, "WORKER_LOST")
    # The lost worker's late result is refused; the new attempt owns the step.
    assert e.record(claim, success()) == Next()
    assert e.step(run_id, "a").status == S.QUEUED
    second = e.claim(run_id, "a", 2)
    assert second is not None


def test_a_lost_step_with_no_attempt_left_fails_the_run_with_worker_lost(e: Engine) -> None:
    run_id, _ = e.start(step("a"), step("b"))
    lease = _lease(e, run_id)
    e.sweeping(sweeps.sweep_dead_workers, lease + timedelta(seconds=1))
    row = e.step(run_id, "a")
    message = "The worker executing this step stopped"
    assert (row.status, row.error, row.lease_expires_at) == (
        S.ERROR,
        {"code": "WORKER_LOST", "message": message},
        None,
    )
    run = e.run(run_id)
    assert (run.status, run.error) == (R.FAILED, {"code": "STEP_ERROR", "message": message})
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED]
    assert e.sent(run_id) == []
    assert [(a.attempt, a.error["code"]) for a in e.attempts(run_id)] == [(1, "WORKER_LOST")]


def test_a_lost_step_of_a_cancelled_run_ends_in_error(e: Engine) -> None:
    run_id, _ = e.start(retrying("a", 3), step("b"))
    e.cancel(run_id)
    e.sweeping(sweeps.sweep_dead_workers, _lease(e, run_id))
    row = e.step(run_id, "a")
    assert (row.status, row.error["code"], row.attempt) == (S.ERROR, "WORKER_LOST", 1)
    assert e.run(run_id).status == R.CANCELLED and e.run(run_id).error is None
    assert e.statuses(run_id) == [S.ERROR, S.SKIPPED]
    assert e.sent(run_id) == [], "no new attempt for an ended run"
    assert [a.error["code"] for a in e.attempts(run_id)] == ["WORKER_LOST"]


def test_a_lost_step_of_a_timed_out_run_ends_in_error(e: Engine) -> None:
    run_id, _ = e.start(retrying("a", 3), timeoutMs=60_000)
    e.sweeping(sweeps.sweep_timeouts, e.run(run_id).deadline_at)
    e.sweeping(sweeps.sweep_dead_workers, e.run(run_id).deadline_at + LATER)
    assert e.step(run_id, "a").status == S.ERROR
    assert e.run(run_id).status == R.TIMEOUT


def test_a_chained_step_whose_worker_died_is_recovered(e: Engine) -> None:
    run_id, claim = e.start(step("a"), retrying("b", 2))
    e.record(claim, success())
    lease = _lease(e, run_id, "b")
    e.sweeping(sweeps.sweep_dead_workers, lease)
    assert (e.step(run_id, "b").status, e.step(run_id, "b").attempt) == (S.QUEUED, 2)
    assert [(m.step_id, m.attempt) for m in e.sent(run_id)] == [("b", 2)]


def test_a_renewed_lease_keeps_the_sweeper_away(e: Engine) -> None:
    run_id, claim = e.start(retrying("a", 3))
    first = _lease(e, run_id)
    wait_for(lambda: utcnow() > claim.started_at + timedelta(milliseconds=5))
    engine.renew_leases(e.services, [(claim, utcnow())])
    assert _lease(e, run_id) > first
    e.sweeping(sweeps.sweep_dead_workers, first)
    assert e.step(run_id, "a").status == S.RUNNING


def test_a_dead_worker_sweep_twice_makes_one_new_attempt(e: Engine) -> None:
    run_id, _ = e.start(retrying("a", 5))
    now = _lease(e, run_id) + timedelta(seconds=1)
    e.sweeping(sweeps.sweep_dead_workers, now)
    e.sweeping(sweeps.sweep_dead_workers, now)
    assert e.step(run_id, "a").attempt == 2
    assert len(e.sent(run_id)) == 1 and len(e.attempts(run_id)) == 1


@pytest.mark.parametrize("attempts", [5, 1], ids=["attempts-left", "exhausted"])
def test_two_concurrent_dead_worker_sweeps_act_once(e: Engine, attempts: int) -> None:
    run_id, _ = e.start(retrying("a", attempts), step("b"))
    now = _lease(e, run_id) + timedelta(seconds=1)
    in_threads(*[lambda: e.sweeping(sweeps.sweep_dead_workers, now)] * 2)
    row = e.step(run_id, "a")
    assert len(e.attempts(run_id)) == 1, "one WORKER_LOST attempt logged"
    if attempts > 1:
        assert (row.status, row.attempt) == (S.QUEUED, 2), "one new attempt"
        assert [(m.step_id, m.attempt) for m in e.sent(run_id)] == [("a", 2)]
    else:
        assert row.status == S.ERROR and e.run(run_id).status == R.FAILED
        assert e.sent(run_id) == []


def test_two_concurrent_full_sweeps_act_once(e: Engine) -> None:
    lost, _ = e.start(retrying("a", 5))
    late = e.trigger(e.workflow(step("a"), timeoutMs=60_000))
    now = max(_lease(e, lost), e.run(late).deadline_at) + timedelta(seconds=1)
    results = in_threads(lambda: sweep(e.services, now), lambda: sweep(e.services, now))
    assert all(set(r) == SWEEP_KINDS for r in results)
    assert (e.step(lost, "a").status, e.step(lost, "a").attempt) == (S.QUEUED, 2)
    assert e.run(late).status == R.TIMEOUT
    assert len(e.attempts(lost)) == 1


@pytest.mark.parametrize("attempts", [1, 3], ids=["exhausted", "attempts-left"])
def test_a_worker_recording_while_the_sweep_looks_at_its_step_wins(e: Engine, attempts: int) -> None:
    """The chain (record a, log it, claim b) takes no run lock, but the attempt log's foreign key
    holds the run row (KEY SHARE) until it commits: the sweep's lock on the run waits, then it
    finds a done and b claimed, and does nothing."""
    run_id, claim = e.start(retrying("a", attempts), step("b"))
    now = _lease(e, run_id) + timedelta(seconds=1)  # a lease that expired while the step still ran
    with e.services.db.session() as holder:
        # Hold step b so the worker's chain (record a, then claim b) stops half-way, a's row locked.
        holder.execute(
            select(StepRun).where(StepRun.run_id == run_id, StepRun.step_id == "b").with_for_update()
        ).scalar_one()
        base = blocked_on_locks(e.services)
        results: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: results.setdefault("worker", e.record(claim, success())))
        worker.start()
        wait_for(lambda: blocked_on_locks(e.services) == base + 1, what="the worker to wait on step b")
        sweeper = threading.Thread(
            target=lambda: results.setdefault("sweep", e.sweeping(sweeps.sweep_dead_workers, now))
        )
        sweeper.start()
        wait_for(lambda: blocked_on_locks(e.services) == base + 2, what="the sweep to wait on the worker")
        holder.rollback()  # the worker goes on and commits; then the sweep reads a done
    worker.join(30)
    sweeper.join(30)
    assert "worker" in results and "sweep" in results
    assert results["worker"].claim is not None, "the worker chained to b"
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING]
    assert e.run(run_id).status == R.RUNNING, "the run goes on: its step succeeded"
    assert [(a.step_id, a.status) for a in e.attempts(run_id)] == [("a", S.SUCCESS)], "no WORKER_LOST"
    assert e.sent(run_id) == []


# ------------------------------------------------------------------ one pass of every sweep


def test_one_pass_runs_every_sweep(e: Engine) -> None:
    timed_out = e.trigger(e.workflow(step("a"), timeoutMs=60_000))
    approval, claim = e.start(step("ok", "approval"))
    until = utcnow() + timedelta(minutes=1)
    e.record(claim, parked(until, suspend=True))
    lost, _ = e.start(retrying("a", 2))
    stuck = e.trigger(e.workflow(step("a")))
    e.queue.take(stuck)
    now = max(e.run(timed_out).deadline_at, until, utcnow() + LEASE) + STUCK_AFTER
    counts = sweep(e.services, now)
    assert set(counts) == SWEEP_KINDS
    assert counts["timedOut"] >= 1 and counts["approvalsExpired"] >= 1 and counts["leasesExpired"] >= 1
    assert e.run(timed_out).status == R.TIMEOUT
    assert e.run(approval).status == R.FAILED
    assert (e.step(lost, "a").status, e.step(lost, "a").attempt) == (S.QUEUED, 2)
    assert [(m.step_id, m.attempt) for m in e.sent(stuck)][:1] == [("a", 1)]


def test_a_pass_with_the_default_clock_changes_nothing_current(e: Engine) -> None:
    run_id, _ = e.start(step("a"), timeoutMs=3_600_000)
    counts = sweep(e.services)
    assert set(counts) == SWEEP_KINDS
    assert e.run(run_id).status == R.RUNNING and e.step(run_id, "a").status == S.RUNNING
