"""The hot path's SQL, built once with bind parameters: building them per step cost more CPU
than running them (measured). Bulk updates skip the ORM identity-map sync for the same reason."""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import bindparam, exists, func, insert, literal_column, null, or_, select, true, update
from sqlalchemy.orm import defer

from models import Run, StepAttempt, StepRun
from models.states import RunStatus, StepStatus

STEPS = StepRun.__table__
RUNS = Run.__table__


def update_steps() -> Any:
    """A bulk UPDATE of step rows; no identity-map sync (a large share of CPU per step)."""
    return update(StepRun).execution_options(synchronize_session=False)


def update_runs() -> Any:
    return update(Run).execution_options(synchronize_session=False)


# Records an attempt's result; only the owner of (step, attempt, running) may.
RECORD = (
    update(STEPS)
    .where(
        STEPS.c.run_id == bindparam("b_run"),
        STEPS.c.step_id == bindparam("b_step"),
        STEPS.c.status == StepStatus.RUNNING,
        STEPS.c.attempt == bindparam("b_attempt"),
    )
    .values(
        # Bind names differ from column names: in a statement of several CTEs, execute() would
        # otherwise apply a parameter named like a column to every UPDATE in it.
        status=bindparam("v_status"),
        input=bindparam("v_input"),
        output=bindparam("v_output"),
        error=bindparam("v_error"),
        started_at=bindparam("v_started_at"),
        completed_at=bindparam("v_completed_at"),
        duration_ms=bindparam("v_duration_ms"),
        lease_expires_at=null(),
    )
)


# Claims the next step only while the run is still running, without a lock on the run row: a
# cancel that committed first makes EXISTS false; one that comes later finds the step running
# (claimed, as a step already executing): it runs once, its result is recorded, nothing follows.
def _claim_next(step: str) -> Any:
    return (
        update(STEPS)
        .where(
            STEPS.c.run_id == bindparam("b_run"),
            STEPS.c.step_id == bindparam(step),
            STEPS.c.status == StepStatus.PENDING,
            exists().where(RUNS.c.id == bindparam("b_run"), RUNS.c.status == RunStatus.RUNNING),
        )
        .values(
            status=StepStatus.RUNNING,
            attempt=1,
            started_at=bindparam("now"),
            queued_at=bindparam("now"),
            lease_expires_at=bindparam("lease"),
        )
    )


CLAIM_NEXT = _claim_next("b_step")

LOG_ATTEMPT = insert(StepAttempt.__table__)

# The attempt log's columns, copied from what RECORD wrote (its RETURNING): one statement on
# PostgreSQL records a result and logs its attempt, and chaining also claims the next step in it.
_LOGGED = (
    "run_id",
    "step_id",
    "position",
    "attempt",
    "status",
    "input",
    "output",
    "error",
    "started_at",
    "completed_at",
    "duration_ms",
)


def _counted(*ctes: Any) -> Any:
    """SELECT the row count of each CTE (referencing them is what makes them run)."""
    return select(*(select(func.count()).select_from(c).scalar_subquery().label(c.name) for c in ctes))


def _record_and_log(record: Any = None) -> tuple[Any, Any]:
    recorded = (record if record is not None else RECORD).returning(*(STEPS.c[name] for name in _LOGGED))
    recorded = recorded.cte("recorded")
    logged = (
        insert(StepAttempt.__table__)
        .from_select(list(_LOGGED), select(*(recorded.c[name] for name in _LOGGED)))
        .returning(literal_column("1"))
        .cte("logged")
    )
    return recorded, logged


def _record_log() -> Any:
    recorded, logged = _record_and_log()
    return _counted(recorded, logged)


def _chain() -> Any:
    # The run row first (KEY SHARE, as the log's foreign key takes it, but at the start): every
    # writer locks a run before its steps, so a sweep that locks the run cannot deadlock with it.
    held = select(RUNS.c.id).where(RUNS.c.id == bindparam("b_run")).with_for_update(read=True, key_share=True)
    held = held.cte("held")
    recorded, logged = _record_and_log(RECORD.where(exists(select(held.c.id))))
    claimed = (
        _claim_next("b_next")
        .where(exists(select(recorded.c.step_id)))
        .returning(literal_column("1"))
        .cte("claimed")
    )
    return _counted(held, recorded, logged, claimed)


def _finish() -> Any:
    # The run row locked first (FOR UPDATE, as ``reads.lock_run`` does for every writer that ends
    # a run), then the last step recorded and logged, then the run finished if it still runs.
    held = select(RUNS.c.id).where(RUNS.c.id == bindparam("b_run")).with_for_update().cte("held")
    recorded, logged = _record_and_log(RECORD.where(exists(select(held.c.id))))
    finished = (
        update(RUNS)
        .where(
            RUNS.c.id == bindparam("b_run"),
            RUNS.c.status == RunStatus.RUNNING,
            exists(select(recorded.c.step_id)),
        )
        .values(
            status=bindparam("r_status"),
            completed_at=bindparam("r_completed_at"),
            duration_ms=bindparam("r_duration_ms"),
            output=bindparam("r_output"),
            error=bindparam("r_error"),
        )
        .returning(literal_column("1"))
        .cte("finished")
    )
    return _counted(held, recorded, logged, finished)


# PostgreSQL only (no data-modifying CTEs on SQLite, which takes the statements one by one).
RECORD_LOG = _record_log()
CHAIN = _chain()
# The last step's result and the run's end (completed, or failed by its output mapping).
FINISH = _finish()


def _claim_queued() -> Any:
    """A message's queued step → running and a pending run → running, in one statement."""
    run = (
        select(
            RUNS.c.company_id,
            RUNS.c.workflow_id,
            RUNS.c.workflow_key,
            RUNS.c.workflow_version,
            RUNS.c.trigger_type,
            RUNS.c.input,
            RUNS.c.status,
            RUNS.c.deadline_at,
            RUNS.c.started_at.label("run_started_at"),
        )
        .where(RUNS.c.id == bindparam("b_run"))
        .with_for_update()
        .cte("run")
    )
    live = exists().where(
        or_(run.c.status == RunStatus.PENDING, run.c.status == RunStatus.RUNNING),
        or_(run.c.deadline_at.is_(None), run.c.deadline_at > bindparam("now")),
    )
    claimed = (
        update(STEPS)
        .where(
            STEPS.c.run_id == bindparam("b_run"),
            STEPS.c.step_id == bindparam("b_step"),
            STEPS.c.attempt == bindparam("b_attempt"),
            STEPS.c.status == StepStatus.QUEUED,
            live,
        )
        .values(
            status=StepStatus.RUNNING,
            lease_expires_at=bindparam("lease"),
            started_at=bindparam("now"),
            completed_at=null(),
            duration_ms=null(),
        )
        .returning(STEPS.c.position, STEPS.c.error)
        .cte("claimed")
    )
    started = (
        update(RUNS)
        .where(
            RUNS.c.id == bindparam("b_run"),
            RUNS.c.status == RunStatus.PENDING,
            exists(select(claimed.c.position)),
        )
        .values(status=RunStatus.RUNNING, started_at=bindparam("now"))
        .returning(RUNS.c.id)
        .cte("started")
    )
    return select(
        run, claimed.c.position, claimed.c.error, started.c.id.isnot(None).label("started")
    ).select_from(run.outerjoin(claimed, true()).outerjoin(started, true()))


# The hot path's claim of a message's step (PostgreSQL): the run locked and read (no ORM, not its
# steps), its queued step claimed and, for its first step, the run started. A row whose position
# is NULL claimed nothing: the run's status tells why; a due delay, a stale message or a deadline
# that passed are left to the general claim.
CLAIM_QUEUED = _claim_queued()

FINISHED_RESULTS = select(STEPS.c.step_id, STEPS.c.output, STEPS.c.status).where(
    STEPS.c.run_id == bindparam("b_run"),
    or_(*(STEPS.c.status == s for s in sorted((StepStatus.SUCCESS, StepStatus.ERROR, StepStatus.SKIPPED)))),
)

# Renews the lease of a step this process is executing (the heartbeat).
RENEW_LEASE = (
    update(STEPS)
    .where(
        STEPS.c.run_id == bindparam("b_run"),
        STEPS.c.step_id == bindparam("b_step"),
        STEPS.c.attempt == bindparam("b_attempt"),
        STEPS.c.status == StepStatus.RUNNING,
    )
    .values(lease_expires_at=bindparam("lease"))
)

LOCK_RUN = select(Run).where(Run.id == bindparam("run_id")).with_for_update()
# The hot path leaves the run's JSON input and output unloaded under the lock.
LOCK_RUN_LEAN = LOCK_RUN.options(defer(Run.input), defer(Run.output))


@cache
def move_run(to: RunStatus, columns: tuple[str, ...], sources: tuple[RunStatus, ...]) -> Any:
    """A run (``b_id``) → ``to`` from ``sources``, setting ``columns`` (binds of the same name)."""
    return (
        update(RUNS)
        .where(RUNS.c.id == bindparam("b_id"), RUNS.c.status.in_(sources))
        .values(status=to, **{name: bindparam(name) for name in columns})
    )


@cache
def move_step(to: StepStatus, columns: tuple[str, ...]) -> Any:
    """A step row (``b_id``) in ``b_status`` at ``b_attempt`` → ``to``, setting ``columns``."""
    return (
        update(STEPS)
        .where(
            STEPS.c.id == bindparam("b_id"),
            STEPS.c.status == bindparam("b_status"),
            STEPS.c.attempt == bindparam("b_attempt"),
        )
        .values(status=to, **{name: bindparam(name) for name in columns})
    )
