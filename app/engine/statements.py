"""The hot path's SQL, built once with bind parameters: building them per step cost more CPU
than running them (measured). Bulk updates skip the ORM identity-map sync for the same reason."""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import bindparam, exists, insert, select, update
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
        status=bindparam("status"),
        input=bindparam("input"),
        output=bindparam("output"),
        error=bindparam("error"),
        started_at=bindparam("started_at"),
        completed_at=bindparam("completed_at"),
        duration_ms=bindparam("duration_ms"),
        lease_expires_at=None,
    )
)

# Claims the next step only while the run is still running, without a lock on the run row: a
# cancel that committed first makes EXISTS false; one that comes later finds the step running
# (claimed, not yet started) and the worker sees the cancel flag before executing it.
CLAIM_NEXT = (
    update(STEPS)
    .where(
        STEPS.c.run_id == bindparam("b_run"),
        STEPS.c.step_id == bindparam("b_step"),
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

LOG_ATTEMPT = insert(StepAttempt.__table__)

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
