"""Recovery sweeps (DESIGN §5.7): one function per owner of a non-final state (``states.OWNERS``).

Each is idempotent and safe with two schedulers: it re-reads the row under its run's lock and
moves it through ``transitions`` (compare-and-set), so a racing worker or sweeper wins or loses
cleanly. A re-sent message is harmless: a claim takes only the attempt it names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from app import metrics
from app.engine import concurrency, outbox
from app.engine import statements as sql
from app.engine import transitions as move
from app.engine.execution import Send, settle
from app.engine.graph import graph
from app.engine.reads import definition_for, lock_run, step_row
from app.engine.retry import RetryPolicy
from app.engine.states import RUN_ACTIVE, RUN_EXECUTING, STUCK_AFTER
from app.services import Services
from app.timeutil import duration_ms, utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus

logger = logging.getLogger("baton.sweeps")
R, S = RunStatus, StepStatus
BATCH = 500
WORKER_LOST = {"code": "WORKER_LOST", "message": "The worker executing this step stopped"}
APPROVAL_TIMEOUT = {"code": "APPROVAL_TIMEOUT", "message": "No approval before the step's timeoutMs"}


def sweep(services: Services, now: datetime | None = None) -> dict[str, int]:
    """One pass of every sweep; those that need no broker first, so a broker outage (RabbitMQ is
    apart from Redis and PostgreSQL) does not hold back run timeouts and expired approvals."""
    now = now or utcnow()
    with services.db.session() as session:
        timed_out = sweep_timeouts(services, session, now)
        approvals = sweep_approvals(services, session, now)
        counts = {
            "resent": sweep_broker_restart(services, session, now),
            "timedOut": timed_out,
            "approvalsExpired": approvals,
            "requeued": sweep_lost_messages(services, session, now),
            "leasesExpired": sweep_dead_workers(services, session, now),
            "slotsReconciled": sweep_slots(services, session, now),
        }
    metrics.swept(counts)
    return counts


def sweep_timeouts(services: Services, session: Session, now: datetime) -> int:
    """Runs past their deadline end ``timeout``, even when no worker is looking at them."""
    overdue = session.execute(
        select(Run.id).where(Run.status.in_(sorted(RUN_ACTIVE)), Run.deadline_at <= now).limit(BATCH)
    ).scalars()
    count = 0
    for run_id in list(overdue):
        run = lock_run(session, run_id)
        if run is not None and run.status in RUN_ACTIVE:
            count += move.end_run(session, run, R.TIMEOUT, now, error=move.RUN_TIMEOUT)
        session.commit()
        outbox.flush(services, session)
        services.request_cancel(run_id)
    return count


def sweep_approvals(services: Services, session: Session, now: datetime) -> int:
    """Approvals past their ``timeoutMs`` fail the run with APPROVAL_TIMEOUT."""
    expired = (
        select(StepRun.run_id, StepRun.step_id)
        .join(Run, Run.id == StepRun.run_id)
        .where(Run.status == R.SUSPENDED, StepRun.status == S.WAITING, StepRun.queued_at <= now)
    )
    count = 0
    for run, row in _locked_steps(session, expired):
        sends = []
        if run.status == R.SUSPENDED and row.status == S.WAITING:
            sends = _fail_step(session, run, row, APPROVAL_TIMEOUT, now, "APPROVAL_TIMEOUT")
            count += 1
        session.commit()
        _send(services, run, sends)
        outbox.flush(services, session)
    return count


def sweep_slots(services: Services, session: Session, now: datetime) -> int:
    """Concurrency slots reconciled: a slot left on a run that ended is freed, and every group with
    waiting runs admits into its free slots (a new version that raised the limit, say). Each group
    commits apart. How many slots were freed and runs admitted."""
    count, groups = concurrency.free_ended(session)
    session.commit()
    for group in sorted(groups):
        count += move.admit(session, group, now)
        session.commit()
        outbox.flush(services, session)
    return count


def sweep_lost_messages(
    services: Services, session: Session, now: datetime, *, since: datetime | None = None
) -> int:
    """Queued steps, and due delays, with no progress for STUCK_AFTER: their message was lost
    (an enqueue that failed after its commit, Redis restarted empty). Each is sent again.

    ``since``: re-send every such step queued or due before it (a broker restart), not only
    the stuck ones; a delay not yet due goes back as a delayed message.
    """
    cutoff = since or now - STUCK_AFTER
    queued = (StepRun.status == S.QUEUED) & Run.status.in_(sorted(RUN_EXECUTING))
    waiting = (StepRun.status == S.WAITING) & (Run.status == R.RUNNING) & StepRun.queued_at.is_not(None)
    where = [or_(queued, waiting)]
    if since is None:
        where.append(StepRun.queued_at <= cutoff)
    count, after = 0, 0
    while True:
        lost = session.execute(
            select(
                StepRun.id,
                StepRun.run_id,
                StepRun.step_id,
                StepRun.attempt,
                StepRun.queued_at,
                Run.company_id,
            )
            .join(Run, Run.id == StepRun.run_id)
            .where(*where, StepRun.id > after)
            .order_by(StepRun.id)
            .limit(BATCH)
        ).all()
        for row_id, run_id, step_id, attempt, due, company_id in lost:
            delay = max(0, int((due - now).total_seconds() * 1000)) if due else 0
            services.queue.enqueue(run_id, step_id, attempt, delay, company_id)
            if delay == 0:
                session.execute(sql.update_steps().where(StepRun.id == row_id).values(queued_at=now))
        session.commit()
        count += len(lost)
        if len(lost) < BATCH or since is None:
            return count
        after = lost[-1][0]


def sweep_broker_restart(services: Services, session: Session, now: datetime) -> int:
    """The broker restarted empty, or is new (its epoch marker is gone): every queued step and
    parked delay lost its message at once, so all are sent again now rather than STUCK_AFTER later."""
    if services.queue.epoch_present():
        return 0
    count = sweep_lost_messages(services, session, now, since=now)
    # Set only once every message went out: a resend cut short by another outage runs again.
    services.queue.mark_epoch()
    if count:
        logger.warning("the broker is new or was restarted empty: re-sent %d step message(s)", count)
    return count


def sweep_dead_workers(services: Services, session: Session, now: datetime) -> int:
    """A step whose lease expired (its worker died) gets a new attempt, or fails with WORKER_LOST."""
    lost = select(StepRun.run_id, StepRun.step_id).where(
        StepRun.status == S.RUNNING, StepRun.lease_expires_at <= now
    )
    count = 0
    for run, row in _locked_steps(session, lost):
        if row.status != S.RUNNING or row.lease_expires_at > now:
            session.rollback()
            continue
        sends = _recover_lost_step(session, run, row, now)
        session.commit()
        _send(services, run, sends)
        outbox.flush(services, session)
        count += 1
    return count


def _locked_steps(session: Session, query: Select) -> Iterator[tuple[Run, StepRun]]:
    """For each (run_id, step_id) the query finds: its run locked, then the step row re-read
    under that lock (the caller checks both are still as the query saw them)."""
    for run_id, step_id in session.execute(query.limit(BATCH)).all():
        run = lock_run(session, run_id)
        if run is not None:  # a run deleted meanwhile has no steps left to look at
            yield run, step_row(session, run_id, step_id)


def _recover_lost_step(session: Session, run: Run, row: StepRun, now: datetime) -> list[Send]:
    """A new attempt when the policy allows one (its message returned), else the step fails."""
    definition = definition_for(session, run.workflow_key, run.workflow_version)
    policy = RetryPolicy.of(definition["steps"][row.position])
    if run.status == R.RUNNING and not policy.exhausted(row.attempt):
        move.log_attempt(session, row, S.ERROR, row.started_at, now, step_input=row.input, error=WORKER_LOST)
        moved = move.move_step(
            session, row, S.QUEUED, attempt=row.attempt + 1, queued_at=now, lease_expires_at=None
        )
        return [(row.run_id, row.step_id, row.attempt, 0)] if moved else []
    if run.status == R.RUNNING:
        return _fail_step(session, run, row, WORKER_LOST, now, "STEP_ERROR")
    # The run already ended (cancelled, timed out): the step's outcome is recorded as lost.
    move.log_attempt(session, row, S.ERROR, row.started_at, now, step_input=row.input, error=WORKER_LOST)
    _end_step(session, row, WORKER_LOST, now)
    return []


def _send(services: Services, run: Run, sends: list[Send]) -> None:
    for run_id, step_id, attempt, delay in sends:
        services.queue.enqueue(run_id, step_id, attempt, delay, run.company_id)


def _end_step(session: Session, row: StepRun, error: dict[str, str], now: datetime) -> None:
    move.move_step(
        session,
        row,
        S.ERROR,
        error=error,
        completed_at=now,
        duration_ms=duration_ms(row.started_at, now),
        lease_expires_at=None,
    )


def _fail_step(
    session: Session, run: Run, row: StepRun, error: dict[str, str], now: datetime, code: str
) -> list[Send]:
    """End a step in error, log the attempt, skip what follows and fail the run (a DAG: what needs
    the step is skipped, and the run fails once nothing else can run)."""
    move.log_attempt(session, row, S.ERROR, row.started_at, now, step_input=row.input, error=error)
    _end_step(session, row, error, now)
    definition = definition_for(session, run.workflow_key, run.workflow_version)
    if not graph(definition).linear:
        if run.status == R.SUSPENDED:
            move.reopen_run(session, run)
        return settle(session, run, definition, now)
    move.skip_after(session, run.id, row.position, now)
    move.finish_run(session, run, R.FAILED, now, error={"code": code, "message": error["message"]})
    return []
