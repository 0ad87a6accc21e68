"""Operator control of a live run: cancel (DESIGN §5.5) and answering an approval (resume)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.engine import outbox
from app.engine import transitions as move
from app.engine.execution import Send, complete_run, settle
from app.engine.graph import graph
from app.engine.reads import current_step_runs, definition_for, lock_company_run, results_of, step_runs
from app.engine.states import RUN_CANCELLABLE
from app.engine.trigger import send_or_leave_to_sweep
from app.engine.types import Claim
from app.errors import InvalidState
from app.services import Services
from app.timeutil import duration_ms, utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus
APPROVAL_REJECTED = {"code": "APPROVAL_REJECTED", "message": "Approval was rejected"}


def cancel_run(services: Services, company_id: str, run_id: str) -> Run:
    """Pending, running or suspended → cancelled; steps not reached become skipped."""
    with services.db.session() as session:
        run = lock_company_run(session, company_id, run_id)
        if run.status not in RUN_CANCELLABLE:
            raise InvalidState("Can only cancel running or pending runs")
        move.end_run(session, run, R.CANCELLED, utcnow())
        session.commit()
        outbox.flush(services, session)
    services.request_cancel(run.id)
    return run


def resume_run(services: Services, company_id: str, run_id: str, approved: bool, data: Any) -> Run:
    """Answer a suspended run's approval: continue with ``data`` as the step output, or fail it."""
    with services.db.session() as session:
        run = lock_company_run(session, company_id, run_id)
        row = _waiting_approval(session, run)
        now = utcnow()
        status = S.SUCCESS if approved else S.ERROR
        error = None if approved else APPROVAL_REJECTED
        output = data if approved else None
        move.move_step(
            session,
            row,
            status,
            output=output,
            error=error,
            completed_at=now,
            duration_ms=duration_ms(row.started_at, now),
        )
        move.log_attempt(
            session, row, status, row.started_at, now, step_input=row.input, output=output, error=error
        )
        definition = definition_for(session, run.workflow_key, run.workflow_version)
        if not graph(definition).linear:
            sends = _settle_resumed(session, run, definition, now)
        elif not approved:
            move.skip_after(session, run.id, row.position, now)
            move.finish_run(session, run, R.FAILED, now, error=error)
            sends = []
        else:
            sends = _continue_after(session, run, definition, row, now)
        session.commit()
        outbox.flush(services, session)
    for send in sends:
        send_or_leave_to_sweep(services, *send, company_id=run.company_id)
    return run


def _waiting_approval(session: Session, run: Run) -> StepRun:
    if run.status != R.SUSPENDED:
        raise InvalidState("Can only resume suspended runs")
    row = (
        session.execute(
            select(StepRun)
            .where(StepRun.run_id == run.id, StepRun.status == S.WAITING)
            .order_by(StepRun.position)
        )
        .scalars()
        .first()
    )
    if row is None:
        raise InvalidState("Can only resume suspended runs")
    return row


def _continue_after(
    session: Session, run: Run, definition: dict[str, Any], row: StepRun, now: datetime
) -> list[Send]:
    """After an approval (a chain): queue the next step, or complete the run when it was last."""
    position = row.position + 1
    if position < len(definition["steps"]):
        move.reopen_run(session, run)
        next_id = definition["steps"][position]["id"]
        move.queue_pending(session, run.id, next_id, now)
        return [(run.id, next_id, 1, 0)]
    claim = Claim.of_run(
        run,
        definition,
        row.position,
        row.attempt,
        started_at=row.started_at or now,
        results=results_of(step_runs(session, run.id)),
    )
    complete_run(session, run, claim, now)
    return []


def _settle_resumed(session: Session, run: Run, definition: dict[str, Any], now: datetime) -> list[Send]:
    """A DAG after its approval was answered: the run goes on and settles (what the approval
    unblocks is queued; a rejection skips what needs it). Steps queued before it suspended had
    their messages refused meanwhile: they are sent again (a retry's at its due time)."""
    move.reopen_run(session, run)
    sends = settle(session, run, definition, now)
    if run.status != R.RUNNING:
        return sends
    for row in current_step_runs(session, run.id):
        if row.status == S.QUEUED and all(send[1] != row.step_id for send in sends):
            due = row.queued_at or now
            sends.append((run.id, row.step_id, row.attempt, max(0, int((due - now).total_seconds() * 1000))))
    return sends
