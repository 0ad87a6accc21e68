"""One function per transition: the only code that writes a run's or a step's status.

Each is a compare-and-set from the legal sources in ``states`` (``UPDATE … WHERE status IN …``)
and returns whether it applied; a caller that asks for a move the table does not allow gets
``IllegalTransition``. Callers hold the run row's lock where they need a consistent run status
(cancel, finish, park); chaining to the next step needs none (see ``statements.CLAIM_NEXT``).
Each move that applied notes its run event on the session (``app.events``): published after the
commit, from what the move wrote (no extra statement), and dropped if the transaction rolls back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from app import events, metrics
from app.engine import concurrency, outbox
from app.engine import statements as sql
from app.engine.states import RUN_TERMINAL, check_run_move, check_step_move, run_sources, step_sources
from app.engine.types import Claim
from app.timeutil import duration_ms, utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus

# --------------------------------------------------------------------------- runs


def move_run(session: Session, run: Run, to: RunStatus, **values: Any) -> bool:
    """``run`` (read under its lock) → ``to``; the loaded object follows the row."""
    check_run_move(run.status, to)
    statement = sql.move_run(to, tuple(sorted(values)), run_sources(to))
    if session.execute(statement, {"b_id": run.id, **values}).rowcount != 1:
        return False
    for name, value in {"status": to, **values}.items():
        set_committed_value(run, name, value)
    events.note_run(session, run)
    if to in RUN_TERMINAL:
        metrics.run_finished(session, run.workflow_id, to)
        group = concurrency.free(session, run)
        if group is not None:
            admit(session, group, values.get("completed_at") or utcnow())
    return True


def admit(session: Session, group: str, now: datetime) -> int:
    """Waiting runs of a concurrency group take its free slots, oldest first; the steps each one
    starts with are queued, their messages sent after the caller's commit (``outbox``)."""
    admitted = concurrency.admissions(session, group)
    for run in admitted:
        for step_id in run.step_ids:
            if queue_pending(session, run.run_id, step_id, now):
                outbox.note_send(session, run.run_id, step_id, 1, run.company_id)
    return len(admitted)


def admit_new(session: Session, runs: list[Any], now: datetime) -> None:
    """New runs inserted waiting (their creation noted): each one's group admits what it can."""
    for group in sorted({run.concurrency_key for run in runs if run.concurrency_key is not None}):
        admit(session, group, now)


def start_run(session: Session, run: Run, now: datetime) -> bool:
    return move_run(session, run, R.RUNNING, started_at=now)


def suspend_run(session: Session, run: Run) -> bool:
    return move_run(session, run, R.SUSPENDED)


def reopen_run(session: Session, run: Run) -> bool:
    """A suspended run goes on (its approval was granted)."""
    return move_run(session, run, R.RUNNING)


def finish_run(
    session: Session, run: Run, to: RunStatus, now: datetime, *, output: Any = None, error: Any = None
) -> bool:
    """Completed, failed, cancelled or timed out: the run's end, with its duration."""
    return move_run(
        session,
        run,
        to,
        completed_at=now,
        duration_ms=duration_ms(run.started_at, now),
        output=output,
        error=error,
    )


RUN_TIMEOUT = {"code": "RUN_TIMEOUT", "message": "Run exceeded its timeoutMs"}


def end_run(session: Session, run: Run, to: RunStatus, now: datetime, *, error: Any = None) -> bool:
    """Cancel or time out a run: it ends now and its steps not started are skipped."""
    if not finish_run(session, run, to, now, error=error):
        return False
    skip_unreached(session, run.id, now)
    return True


# --------------------------------------------------------------------------- steps


def claim_step(session: Session, row: StepRun, values: dict[str, Any]) -> bool:
    """A queued step (or a due waiting one) → running, for the attempt the message names."""
    check_step_move(row.status, S.RUNNING)
    if not _move_step_row(session, row, S.RUNNING, values):
        return False
    events.note_step(session, None, events.row_data(row, S.RUNNING, values))
    return True


def claim_next(session: Session, claim: Claim, position: int, now: datetime, lease: datetime) -> bool:
    """The step after ``claim`` (pending) → running, only while the run is still running."""
    params = {"b_run": claim.run_id, "b_step": claim.definition["steps"][position]["id"]}
    if session.execute(sql.CLAIM_NEXT, {**params, "now": now, "lease": lease}).rowcount != 1:
        return False
    events.note_step(session, claim, events.step_data(claim.run_id, params["b_step"], S.RUNNING, 1, now))
    return True


def record(session: Session, claim: Claim, to: StepStatus, **values: Any) -> bool:
    """The claimed attempt (running) → ``to``: its result, or ``queued`` for a retry."""
    check_step_move(S.RUNNING, to)
    if session.connection().execute(sql.RECORD, _record_params(claim, to, values)).rowcount != 1:
        return False
    _note_claimed(session, claim, to, values)
    return True


_RECORDED = ("input", "output", "error", "started_at", "completed_at", "duration_ms")


def _record_params(claim: Claim, to: StepStatus, values: dict[str, Any]) -> dict[str, Any]:
    """RECORD's parameters (``v_`` + column; a column not given is written NULL)."""
    params = {"b_run": claim.run_id, "b_step": claim.step_id, "b_attempt": claim.attempt, "v_status": to}
    return params | {f"v_{name}": values.get(name) for name in _RECORDED}


def one_statement(session: Session) -> bool:
    """Whether the database takes data-modifying CTEs (PostgreSQL; SQLite runs them one by one)."""
    return session.get_bind().dialect.name == "postgresql"


def record_logged(session: Session, claim: Claim, to: StepStatus, **values: Any) -> bool:
    """``record`` of a finished attempt and its ``step_attempts`` row in one statement (PostgreSQL:
    the log copies what the record wrote, so it is written only when the record applied)."""
    check_step_move(S.RUNNING, to)
    params = _record_params(claim, to, values)
    recorded, _logged = session.connection().execute(sql.RECORD_LOG, params).one()
    if recorded != 1:
        return False
    _note_claimed(session, claim, to, values)
    return True


def update_claimed(session: Session, claim: Claim, to: StepStatus, **values: Any) -> bool:
    """The claimed attempt (running) → ``to`` with arbitrary columns (parking, releasing)."""
    check_step_move(S.RUNNING, to)
    moved = session.execute(
        sql.update_steps()
        .where(
            StepRun.run_id == claim.run_id,
            StepRun.step_id == claim.step_id,
            StepRun.status == S.RUNNING,
            StepRun.attempt == claim.attempt,
        )
        .values(status=to, **values)
    )
    if moved.rowcount != 1:
        return False
    _note_claimed(session, claim, to, values)
    return True


def _note_claimed(session: Session, claim: Claim, to: StepStatus, values: dict[str, Any]) -> None:
    events.note_step(session, claim, claimed_data(claim, to, values))


def claimed_data(claim: Claim, to: StepStatus, values: dict[str, Any]) -> dict[str, Any]:
    """The claimed attempt's event payload, from the columns just written (no read)."""
    return events.step_data(
        claim.run_id,
        claim.step_id,
        to,
        claim.attempt,
        values.get("started_at", claim.started_at),
        values.get("completed_at"),
        values.get("duration_ms"),
        values.get("error"),
    )


def move_step(session: Session, row: StepRun, to: StepStatus, **values: Any) -> bool:
    """A step row (read under its run's lock) → ``to``; the loaded object follows the row."""
    check_step_move(row.status, to)
    if not _move_step_row(session, row, to, values):
        return False
    for name, value in {"status": to, **values}.items():
        set_committed_value(row, name, value)
    events.note_step(session, None, events.row_data(row))
    return True


def _move_step_row(session: Session, row: StepRun, to: StepStatus, values: dict[str, Any]) -> bool:
    statement = sql.move_step(to, tuple(sorted(values)))
    params = {"b_id": row.id, "b_status": row.status, "b_attempt": row.attempt, **values}
    return session.execute(statement, params).rowcount == 1


def queue_pending(session: Session, run_id: str, step_id: str, now: datetime) -> bool:
    """A pending step → queued as attempt 1 (the step before it was approved, or its needs met)."""
    queued = session.execute(
        sql.update_steps()
        .where(StepRun.run_id == run_id, StepRun.step_id == step_id, StepRun.status == S.PENDING)
        .values(status=S.QUEUED, attempt=1, queued_at=now)
    )
    if queued.rowcount != 1:
        return False
    events.note_step(session, None, events.step_data(run_id, step_id, S.QUEUED, 1))
    return True


def skip_after(session: Session, run_id: str, position: int, now: datetime) -> None:
    """Steps after ``position`` that never started will not run."""
    skipped = session.execute(
        sql.update_steps()
        .where(StepRun.run_id == run_id, StepRun.position > position, StepRun.status == S.PENDING)
        .values(status=S.SKIPPED, completed_at=now)
        .returning(*_SKIPPED_COLUMNS)
    )
    _note_skipped(session, run_id, skipped, now)


def skip_steps(session: Session, run_id: str, step_ids: list[str], now: datetime) -> None:
    """Pending steps that will not run: a step they need failed (a DAG)."""
    if not step_ids:
        return
    skipped = session.execute(
        sql.update_steps()
        .where(StepRun.run_id == run_id, StepRun.step_id.in_(step_ids), StepRun.status == S.PENDING)
        .values(status=S.SKIPPED, completed_at=now)
        .returning(*_SKIPPED_COLUMNS)
    )
    _note_skipped(session, run_id, skipped, now)


def skip_unreached(session: Session, run_id: str, now: datetime) -> None:
    """On cancel or timeout: every step not started is skipped (a running one records its result)."""
    sources = [s for s in step_sources(S.SKIPPED) if s != S.RUNNING]
    skipped = session.execute(
        sql.update_steps()
        .where(StepRun.run_id == run_id, StepRun.status.in_(sources))
        .values(status=S.SKIPPED, completed_at=now)
        .returning(*_SKIPPED_COLUMNS)
    )
    _note_skipped(session, run_id, skipped, now)


# What a bulk skip returns (in the same statement) for the events of the steps it skipped.
_SKIPPED_COLUMNS = (StepRun.position, StepRun.step_id, StepRun.attempt, StepRun.started_at, StepRun.error)


def _note_skipped(session: Session, run_id: str, rows: Any, now: datetime) -> None:
    for _position, step_id, attempt, started, error in sorted(rows):
        data = events.step_data(run_id, step_id, S.SKIPPED, attempt, started, now, None, error)
        events.note_step(session, None, data)


def log_attempt(
    session: Session,
    source: Claim | StepRun,
    status: StepStatus,
    started: datetime | None,
    now: datetime,
    *,
    step_input: Any,
    output: Any = None,
    error: dict | None = None,
) -> None:
    """One ``step_attempts`` row (the log behind ``GET /runs/:id/logs``) for a claim or a step row."""
    session.execute(
        sql.LOG_ATTEMPT,
        {
            "run_id": source.run_id,
            "step_id": source.step_id,
            "position": source.position,
            "attempt": source.attempt,
            "status": status,
            "input": step_input,
            "output": output,
            "error": error,
            "started_at": started,
            "completed_at": now,
            "duration_ms": duration_ms(started, now),
        },
    )
