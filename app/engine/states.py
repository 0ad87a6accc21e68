"""The legal moves of runs and steps, who owns each non-final state, and what the API shows.

Every status write in the engine goes through ``app.engine.transitions``, whose functions take
their legal sources from the tables here; a test walks the tables (each pair exercised, each
non-final state owned).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from functools import cache

from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus

# (from, to) → the event that makes the move.
RUN_MOVES: dict[tuple[RunStatus, RunStatus], str] = {
    (R.PENDING, R.RUNNING): "a worker claims the run's first step",
    (R.PENDING, R.CANCELLED): "cancel",
    (R.PENDING, R.TIMEOUT): "deadline passed (sweep or claim)",
    (R.RUNNING, R.COMPLETED): "the last step succeeded or was skipped (a DAG: nothing left to run)",
    (R.RUNNING, R.FAILED): "a step failed for good (a DAG: once nothing else runs), or the output failed",
    (R.RUNNING, R.CANCELLED): "cancel",
    (R.RUNNING, R.TIMEOUT): "deadline passed (sweep or claim)",
    (R.RUNNING, R.SUSPENDED): "an approval step parks",
    (R.SUSPENDED, R.RUNNING): "the approval is granted",
    (R.SUSPENDED, R.COMPLETED): "the approval of the last step is granted",
    (R.SUSPENDED, R.FAILED): "the approval is rejected or times out",
    (R.SUSPENDED, R.CANCELLED): "cancel",
    (R.SUSPENDED, R.TIMEOUT): "deadline passed (sweep)",
}

STEP_MOVES: dict[tuple[StepStatus, StepStatus], str] = {
    (S.PENDING, S.QUEUED): "the step before it was approved (resume), or its needs finished (a DAG)",
    (S.PENDING, S.RUNNING): "the worker that finished the step before claims it (chaining)",
    (S.PENDING, S.SKIPPED): "the run ended before reaching it, or a step it needs failed (a DAG)",
    (S.QUEUED, S.RUNNING): "a worker claims its message",
    (S.QUEUED, S.SKIPPED): "the run was cancelled or timed out",
    (S.RUNNING, S.SUCCESS): "the action returned",
    (S.RUNNING, S.ERROR): "the action failed for good, or its worker was lost with no attempt left",
    (S.RUNNING, S.SKIPPED): "its `if` was false, or cancel was seen before it started",
    (S.RUNNING, S.QUEUED): "a retriable failure with attempts left, or its worker was lost",
    (S.RUNNING, S.WAITING): "a delay or an approval parks",
    (S.WAITING, S.RUNNING): "a due delay's message is claimed",
    (S.WAITING, S.SUCCESS): "the approval is granted",
    (S.WAITING, S.ERROR): "the approval is rejected or times out",
    (S.WAITING, S.SKIPPED): "the run was cancelled or timed out",
}

RUN_TERMINAL = frozenset({R.COMPLETED, R.FAILED, R.CANCELLED, R.TIMEOUT})
RUN_ACTIVE = frozenset(RunStatus) - RUN_TERMINAL
# A run whose steps may still be claimed by a worker.
RUN_EXECUTING = frozenset({R.PENDING, R.RUNNING})
RUN_CANCELLABLE = RUN_ACTIVE
RUN_RETRIABLE = frozenset({R.FAILED, R.TIMEOUT})
RUN_RESTARTABLE = frozenset({R.COMPLETED, R.FAILED, R.TIMEOUT})
STEP_FINISHED = frozenset({S.SUCCESS, S.ERROR, S.SKIPPED})
# Steps not started when a run is cancelled or times out (a running one finishes and records).
STEP_UNREACHED = frozenset({S.PENDING, S.QUEUED, S.WAITING})


# Deadlines of the owners below.
LEASE = timedelta(seconds=30)  # a running step's lease, renewed by its worker's heartbeat
HEARTBEAT = timedelta(seconds=5)  # how often a worker renews the leases it holds
# A lease is not renewed past the step's timeoutMs plus this (a step its worker cannot interrupt).
LEASE_GRACE = timedelta(seconds=30)
STUCK_AFTER = timedelta(seconds=30)  # a queued (or due) step with no progress: its message was lost


@dataclass(frozen=True)
class Owner:
    """Who moves a non-final state on, and by when, whatever fails."""

    who: str
    deadline: str


# Every non-final state has an owner and a deadline (DESIGN §5.7); the sweeps implement them.
OWNERS: dict[Enum, Owner] = {
    R.PENDING: Owner("trigger enqueues its first step; sweep_lost_messages re-sends it", "STUCK_AFTER"),
    R.RUNNING: Owner("the owner of its active step; sweep_timeouts at its deadline", "run timeoutMs"),
    R.SUSPENDED: Owner("an operator (resume, cancel); sweep_approvals at the approval timeout", "timeoutMs"),
    S.PENDING: Owner("the step before it (chaining, resume); skipped when the run ends", "run's end"),
    S.QUEUED: Owner("its message; sweep_lost_messages re-sends it if lost (Redis restart)", "STUCK_AFTER"),
    S.RUNNING: Owner("its worker, renewing a lease; sweep_dead_workers when the lease expires", "LEASE"),
    S.WAITING: Owner("its delayed message; sweep_lost_messages re-sends it when due", "due + STUCK_AFTER"),
}


class IllegalTransition(RuntimeError):
    """A move that is not in the table: a bug, never silently ignored."""


@cache
def run_sources(to: RunStatus) -> tuple[RunStatus, ...]:
    """The statuses a run may move to ``to`` from (a stable order keeps SQL cacheable)."""
    return tuple(sorted({a for (a, b) in RUN_MOVES if b == to}))


@cache
def step_sources(to: StepStatus) -> tuple[StepStatus, ...]:
    """The statuses a step may move to ``to`` from."""
    return tuple(sorted({a for (a, b) in STEP_MOVES if b == to}))


def check_run_move(frm: RunStatus, to: RunStatus) -> None:
    if (frm, to) not in RUN_MOVES:
        raise IllegalTransition(f"run {frm} → {to}")


def check_step_move(frm: StepStatus, to: StepStatus) -> None:
    if (frm, to) not in STEP_MOVES:
        raise IllegalTransition(f"step {frm} → {to}")


def is_terminal(status: str) -> bool:
    return status in RUN_TERMINAL


def reusable(status: StepStatus, duration_ms: int | None) -> bool:
    """A step whose result a retry or restart may copy: it succeeded, or its ``if`` skipped it.
    A step skipped because its run ended (cancel, timeout, failure) never ran: it has no duration."""
    return status == S.SUCCESS or (status == S.SKIPPED and duration_ms is not None)


def attempt_made(status: StepStatus, attempt: int) -> int:
    """The number of the last attempt made: a step queued for a retry counts the one before."""
    return attempt - 1 if status == S.QUEUED and attempt > 1 else attempt


def shown_in_results(status: StepStatus, attempt: int) -> bool:
    """``stepResults`` shows steps that started or were decided, not those waiting their turn."""
    return status != S.PENDING and not (status == S.QUEUED and attempt <= 1)
