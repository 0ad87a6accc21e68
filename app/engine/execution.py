"""Execution: claim a step, then record its outcome — one small function per outcome (chain,
retry, fail, complete, park) — claiming the next step in the same transaction (DESIGN §5.2–5.4)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app import actions, metrics, templating
from app.engine import hotpath, outbox
from app.engine import statements as sql
from app.engine import transitions as move
from app.engine.graph import graph
from app.engine.reads import current_step_runs, definition_for, lock_run, results_of, step_runs
from app.engine.retry import RetryPolicy
from app.engine.states import LEASE, LEASE_GRACE, RUN_EXECUTING, STEP_FINISHED
from app.engine.trigger import send_or_leave_to_sweep
from app.engine.types import Claim, Next, Outcome
from app.services import Services
from app.timeutil import duration_ms, utcnow
from models import Run
from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus
Send = tuple[str, str, int, int]  # a step message to send after the commit: run, step, attempt, delay


def lease_until(claim_started: datetime, step: dict[str, Any], now: datetime) -> datetime:
    """A lease runs LEASE past the last heartbeat, never past the step's timeoutMs + LEASE_GRACE."""
    hard = claim_started + timedelta(milliseconds=step["timeoutMs"]) + LEASE_GRACE
    return min(now + LEASE, hard)


def claim_step(
    services: Services, run_id: str, step_id: str, attempt: int, *, defer_pure: bool = False
) -> Claim | None:
    """Take a queued (or due, waiting) step; None when the message is stale or the run is not active.

    ``defer_pure`` (the worker): a pure step's claim is left uncommitted, to commit with its result
    (``hotpath.claim_queued``); the caller then records it at once or abandons it."""
    if not services.db.is_sqlite:
        now = utcnow()
        # lease_until for a claim made now, without the definition (not known before the read).
        try:
            lease = now + min(LEASE, LEASE_GRACE)
            defer = is_pure if defer_pure else hotpath.never
            return hotpath.claim_queued(services.db, run_id, step_id, attempt, now, lease, defer=defer)
        except hotpath.Fallback:  # a due delay, a stale message or a deadline passed: the general way
            pass
    with services.db.session() as session:
        return _claim_locked(services, session, run_id, step_id, attempt)


def _claim_locked(
    services: Services, session: Session, run_id: str, step_id: str, attempt: int
) -> Claim | None:
    """The general claim: the run locked and loaded with its steps (SQLite, due delays, deadlines)."""
    run = lock_run(session, run_id, with_input=True)
    if run is None or run.status not in RUN_EXECUTING:
        return None
    now = utcnow()
    if run.deadline_at is not None and run.deadline_at <= now:
        move.end_run(session, run, R.TIMEOUT, now, error=move.RUN_TIMEOUT)
        session.commit()
        outbox.flush(services, session)
        services.request_cancel(run.id)
        return None
    definition = definition_for(session, run.workflow_key, run.workflow_version)
    rows = step_runs(session, run_id)
    target = next((r for r in rows if r.step_id == step_id), None)
    if target is None or target.attempt != attempt:
        return None
    due = target.status == S.WAITING and target.queued_at is not None and target.queued_at <= now
    if target.status != S.QUEUED and not due:
        return None
    started = target.started_at if due else now
    values: dict[str, Any] = {"lease_expires_at": lease_until(now, definition["steps"][target.position], now)}
    if not due:
        values.update(started_at=now, completed_at=None, duration_ms=None)
    if not move.claim_step(session, target, values):
        session.rollback()
        return None
    if run.status == R.PENDING:
        move.start_run(session, run, now)
    session.commit()
    return Claim.of_run(
        run,
        definition,
        target.position,
        attempt,
        started_at=started or now,
        results=results_of(rows),
        resumed_input=target.input if due else None,
        waited_since=target.started_at if due else None,
    )


def is_pure(step: dict[str, Any]) -> bool:
    """A step whose claim may wait for its result's commit (``hotpath.claim_queued``); never a
    ``forEach`` step (it runs long, logs its items' attempts as it goes and holds its lease)."""
    return actions.is_pure(step["action"]) and "forEach" not in step


def release_claim(services: Services, claim: Claim) -> None:
    """A claimed step that must not run after all (cancel seen before it started): skip it."""
    with services.db.session() as session:
        move.update_claimed(session, claim, S.SKIPPED, completed_at=utcnow(), lease_expires_at=None)
        session.commit()


def renew_leases(services: Services, held: Iterable[tuple[Claim, datetime]]) -> int:
    """The heartbeat: extend the leases of the steps this process is executing."""
    now = utcnow()
    params = [
        {
            "b_run": c.run_id,
            "b_step": c.step_id,
            "b_attempt": c.attempt,
            "lease": lease_until(started, c.step, now),
        }
        for c, started in held
    ]
    if not params:
        return 0
    with services.db.session() as session:
        session.execute(sql.RENEW_LEASE, params)
        session.commit()
    return len(params)


def record_result(services: Services, claim: Claim, outcome: Outcome) -> Next:
    """Record one attempt and decide what follows; the common case chains without a run lock."""
    now = outcome.completed_at or utcnow()
    outcome.started_at = outcome.started_at or claim.started_at
    policy = RetryPolicy.of(claim.step)
    finished_ok = outcome.status in (S.SUCCESS, S.SKIPPED)
    linear = graph(claim.definition).linear
    # The last step's FINISH statement ends the run on the driver's connection: a run that holds a
    # concurrency slot ends through ``transitions`` instead, which frees it and admits the next.
    limited = claim.is_last and claim.definition.get("concurrency") is not None
    if finished_ok and linear and not limited and not services.db.is_sqlite:
        return _chain_or_finish(services, claim, outcome, now)
    hotpath.commit_claim(claim)  # a pure step's claim, if deferred: the general way needs it committed
    with services.db.session() as session:
        if finished_ok and linear and not claim.is_last:
            nxt = _chain(session, claim, outcome, now)
        else:
            run = lock_run(session, claim.run_id)
            if run is None:
                return Next()
            if outcome.status == S.WAITING:
                nxt = _park(session, run, claim, outcome, now)
            elif outcome.status == S.ERROR and outcome.retriable and not policy.exhausted(claim.attempt):
                nxt = _retry(session, run, claim, outcome, now, policy)
            elif outcome.status == S.ERROR:
                nxt = _fail(session, run, claim, outcome, now)
            elif linear:
                nxt = _complete(session, run, claim, outcome, now)
            else:
                nxt = _settle_after(session, run, claim, outcome, now)
        if nxt is None:
            session.rollback()  # someone else recorded this attempt (a duplicate delivery); theirs stands
            return Next()
        session.commit()
        outbox.flush(services, session)
    for send in nxt.sends:
        send_or_leave_to_sweep(services, *send, company_id=claim.company_id)
    return nxt


def _record(session: Session, claim: Claim, outcome: Outcome, to: StepStatus, now: datetime) -> bool:
    """The step row and its attempt log, for a finished attempt."""
    finished = to in STEP_FINISHED
    values = _result(outcome, now, finished)
    if finished and to == outcome.status and move.one_statement(session):
        recorded = move.record_logged(session, claim, to, **values)  # the log is this row's copy
        if recorded:
            _count_attempt(session, claim, outcome, to, now)
        return recorded
    recorded = move.record(session, claim, to, **values)
    if recorded:
        _count_attempt(session, claim, outcome, to, now)
        status = outcome.status if outcome.status != S.WAITING else S.SUCCESS
        move.log_attempt(
            session,
            claim,
            status,
            outcome.started_at,
            now,
            step_input=outcome.input,
            output=outcome.output,
            error=outcome.error,
        )
    return recorded


def _count_attempt(session: Session, claim: Claim, outcome: Outcome, to: StepStatus, now: datetime) -> None:
    """The attempt's outcome and duration in the metrics, counted at commit."""
    took_ms = duration_ms(outcome.started_at, now)
    seconds = took_ms / 1000 if took_ms is not None else None
    metrics.attempt_recorded(session, claim.step["action"], "retry" if to == S.QUEUED else to, seconds)


def _result(outcome: Outcome, now: datetime, finished: bool) -> dict[str, Any]:
    """The step row's columns for an attempt's outcome."""
    return {
        "input": outcome.input,
        "output": outcome.output,
        "error": outcome.error,
        "started_at": outcome.started_at,
        "completed_at": now if finished else None,
        "duration_ms": duration_ms(outcome.started_at, now) if finished else None,
    }


def _chain_or_finish(services: Services, claim: Claim, outcome: Outcome, now: datetime) -> Next:
    """A step done (PostgreSQL): record it and claim the next one, or end the run after the last,
    in one statement and one commit on the driver's connection (``hotpath``)."""
    values = _result(outcome, now, finished=True)
    if claim.is_last:
        claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
        hotpath.finish(services.db, claim, outcome, values, run_ending(claim))
        return Next()  # None: someone else recorded this attempt (a duplicate delivery); theirs stands
    following = claim.definition["steps"][claim.position + 1]
    lease = lease_until(now, following, now)
    # A chain of pure steps stays in its open transaction (one commit for the lot, held briefly).
    keep_open = claim.tx is not None and claim.tx.young() and is_pure(following)
    recorded, claimed, tx = hotpath.chain(services.db, claim, outcome, values, lease, keep_open)
    if not recorded:
        return Next()
    claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
    if not claimed:
        return Next()
    nxt = claim.following(now)
    nxt.tx = tx
    return Next(claim=nxt)


def _chain(session: Session, claim: Claim, outcome: Outcome, now: datetime) -> Next | None:
    """Step done, another follows: record it and claim the next one, in one transaction (in one
    statement on PostgreSQL)."""
    position = claim.position + 1
    lease = lease_until(now, claim.definition["steps"][position], now)
    recorded = _record(session, claim, outcome, outcome.status, now)
    claimed = recorded and move.claim_next(session, claim, position, now, lease)
    if not recorded:
        return None
    claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
    if not claimed:
        return Next()  # the run ended meanwhile (cancel, timeout): nothing follows
    follow = claim.following(now)
    return Next(claim=follow)


def _retry(
    session: Session, run: Run, claim: Claim, outcome: Outcome, now: datetime, policy: RetryPolicy
) -> Next | None:
    """A retriable failure with attempts left: the next attempt comes back after its back-off."""
    if run.status != R.RUNNING:
        # Cancelled or timed out while the attempt ran: its error stands, nothing follows.
        return Next() if _record(session, claim, outcome, S.ERROR, now) else None
    if not _record(session, claim, outcome, S.QUEUED, now):
        return None
    delay = policy.delay_ms(claim.attempt, outcome.retry_after_ms)
    session.execute(
        sql.update_steps()
        .where(sql.STEPS.c.run_id == claim.run_id, sql.STEPS.c.step_id == claim.step_id)
        .values(attempt=claim.attempt + 1, queued_at=now + timedelta(milliseconds=delay))
    )
    return Next(sends=[(claim.run_id, claim.step_id, claim.attempt + 1, delay)])


def _fail(session: Session, run: Run, claim: Claim, outcome: Outcome, now: datetime) -> Next | None:
    """The step failed for good: the run fails with STEP_ERROR and the step's message."""
    if not _record(session, claim, outcome, S.ERROR, now):
        return None
    if run.status == R.RUNNING and not graph(claim.definition).linear:
        return Next(sends=settle(session, run, claim.definition, now))
    if run.status == R.RUNNING:
        move.skip_after(session, claim.run_id, claim.position, now)
        error = {"code": "STEP_ERROR", "message": (outcome.error or {}).get("message", "Step failed")}
        move.finish_run(session, run, R.FAILED, now, error=error)
    return Next()


def _complete(session: Session, run: Run, claim: Claim, outcome: Outcome, now: datetime) -> Next | None:
    """The last step succeeded (or was skipped): the run completes with its output."""
    if not _record(session, claim, outcome, outcome.status, now):
        return None
    if run.status == R.RUNNING:
        claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
        complete_run(session, run, claim, now)
    return Next()


def _settle_after(session: Session, run: Run, claim: Claim, outcome: Outcome, now: datetime) -> Next | None:
    """A step of a DAG succeeded (or was skipped): record it, then settle the run."""
    if not _record(session, claim, outcome, outcome.status, now):
        return None
    return Next(sends=settle(session, run, claim.definition, now))


def settle(session: Session, run: Run, definition: dict[str, Any], now: datetime) -> list[Send]:
    """A DAG run after one of its steps finished, under the run's lock (so two branches finishing
    at once settle one after the other, and a join is queued once): steps behind a failure are
    skipped, steps whose needs are all met are queued (their messages returned, to send after the
    commit), and when nothing is left to run the run ends: failed if a step failed, else completed
    with its output. A run no longer running (cancelled, timed out, suspended) is left as it is."""
    if run.status != R.RUNNING:
        return []
    shape = graph(definition)
    rows = {row.position: row for row in current_step_runs(session, run.id)}
    progress = shape.progress(rows.values())
    move.skip_steps(session, run.id, [shape.ids[p] for p in progress.blocked], now)
    ready = [shape.ids[p] for p in progress.ready]
    sends = [
        (run.id, step_id, 1, 0) for step_id in ready if move.queue_pending(session, run.id, step_id, now)
    ]
    if progress.unfinished:
        return sends
    failed = [rows[p] for p in sorted(rows) if rows[p].status == S.ERROR]
    if failed:
        move.finish_run(session, run, R.FAILED, now, error=run_error(failed[0].error))
        return []
    claim = Claim.of_run(
        run, definition, len(rows) - 1, 1, started_at=now, results=results_of(list(rows.values()))
    )
    status, output, error = run_ending(claim)
    move.finish_run(session, run, status, now, output=output, error=error)
    return []


# The run's error for a failed step: the step's own for an answered or expired approval, else
# STEP_ERROR with the step's message.
_OWN_ERRORS = frozenset({"APPROVAL_REJECTED", "APPROVAL_TIMEOUT"})


def run_error(step_error: dict[str, Any] | None) -> dict[str, Any]:
    error = step_error or {}
    if error.get("code") in _OWN_ERRORS:
        return {"code": error["code"], "message": error.get("message", "")}
    return {"code": "STEP_ERROR", "message": error.get("message", "Step failed")}


def complete_run(session: Session, run: Run, claim: Claim, now: datetime) -> None:
    """The run's end after its last step: see ``run_ending``."""
    status, output, error = run_ending(claim)
    move.finish_run(session, run, status, now, output=output, error=error)


def run_ending(claim: Claim) -> tuple[RunStatus, Any, Any]:
    """(status, output, error) of a run whose last step finished: completed with the ``output``
    mapping, or the last executed step's output; failed when the mapping does not render."""
    mapping = claim.definition.get("output")
    if mapping is None:
        ran = [r for r in (claim.results.get(s["id"]) for s in claim.definition["steps"]) if r]
        succeeded = [r for r in ran if r["status"] == S.SUCCESS]
        return R.COMPLETED, succeeded[-1]["output"] if succeeded else None, None
    try:
        output = templating.render(mapping, claim.template_context(), "output")
    except templating.TemplateError as exc:
        return R.FAILED, None, {"code": "OUTPUT_ERROR", "message": str(exc)}
    return R.COMPLETED, output, None


def _park(session: Session, run: Run, claim: Claim, outcome: Outcome, now: datetime) -> Next | None:
    """A delay or an approval: the step waits in the database, holding no worker thread."""
    park = outcome.park
    assert park is not None
    if run.status != R.RUNNING:
        # The run ended while the step was being claimed: it never starts waiting.
        ok = move.update_claimed(session, claim, S.SKIPPED, completed_at=now, lease_expires_at=None)
        return Next() if ok else None
    values = {"input": outcome.input, "started_at": outcome.started_at, "queued_at": park.until}
    if not move.update_claimed(session, claim, S.WAITING, lease_expires_at=None, **values):
        return None
    if park.suspend:
        move.suspend_run(session, run)
        return Next()
    if park.until is None:
        return Next()
    delay = max(0, int((park.until - now).total_seconds() * 1000))
    return Next(sends=[(claim.run_id, claim.step_id, claim.attempt, delay)])
