"""The transition tables of ``app.engine.states``: consistent, closed, and every live state owned."""

from __future__ import annotations

import itertools

import pytest

from app.engine import states
from app.engine.states import (
    OWNERS,
    RUN_ACTIVE,
    RUN_MOVES,
    RUN_TERMINAL,
    STEP_FINISHED,
    STEP_MOVES,
    STEP_UNREACHED,
    IllegalTransition,
    attempt_made,
    check_run_move,
    check_step_move,
    is_terminal,
    run_sources,
    shown_in_results,
    step_sources,
)
from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus
ALL_RUN_PAIRS = list(itertools.product(RunStatus, RunStatus))
ALL_STEP_PAIRS = list(itertools.product(StepStatus, StepStatus))


def _id(pair: tuple[object, object]) -> str:
    return f"{pair[0]}->{pair[1]}"


# ------------------------------------------------------------------ the tables themselves


def test_every_run_move_is_between_run_statuses_and_described() -> None:
    for (frm, to), event in RUN_MOVES.items():
        assert isinstance(frm, RunStatus) and isinstance(to, RunStatus)
        assert frm != to, "a move changes the status"
        assert isinstance(event, str) and event.strip()


def test_every_step_move_is_between_step_statuses_and_described() -> None:
    for (frm, to), event in STEP_MOVES.items():
        assert isinstance(frm, StepStatus) and isinstance(to, StepStatus)
        assert frm != to, "a move changes the status"
        assert isinstance(event, str) and event.strip()


def test_terminal_runs_have_no_outgoing_move() -> None:
    assert RUN_TERMINAL == {R.COMPLETED, R.FAILED, R.CANCELLED, R.TIMEOUT}
    assert [pair for pair in RUN_MOVES if pair[0] in RUN_TERMINAL] == []


def test_finished_steps_have_no_outgoing_move() -> None:
    assert STEP_FINISHED == {S.SUCCESS, S.ERROR, S.SKIPPED}
    assert [pair for pair in STEP_MOVES if pair[0] in STEP_FINISHED] == []


def test_every_active_run_status_can_reach_an_end() -> None:
    for status in RUN_ACTIVE:
        targets = {to for frm, to in RUN_MOVES if frm == status}
        assert targets & RUN_TERMINAL, f"{status} has no move to a terminal status"


def test_every_status_is_reachable_from_the_start() -> None:
    def reachable(start: object, moves: dict) -> set:
        seen, todo = {start}, [start]
        while todo:
            current = todo.pop()
            for frm, to in moves:
                if frm == current and to not in seen:
                    seen.add(to)
                    todo.append(to)
        return seen

    assert reachable(R.PENDING, RUN_MOVES) == set(RunStatus)
    # A step starts pending (or queued: the first step of a run).
    assert reachable(S.PENDING, STEP_MOVES) == set(StepStatus)


def test_active_and_terminal_partition_run_statuses() -> None:
    assert RUN_ACTIVE | RUN_TERMINAL == set(RunStatus)
    assert not RUN_ACTIVE & RUN_TERMINAL
    assert states.RUN_EXECUTING <= RUN_ACTIVE
    assert states.RUN_CANCELLABLE == RUN_ACTIVE
    assert states.RUN_RETRIABLE <= RUN_TERMINAL and states.RUN_RESTARTABLE <= RUN_TERMINAL


@pytest.mark.parametrize(
    "status,duration_ms,expected",
    [
        (S.SUCCESS, 12, True),
        (S.SKIPPED, 0, True),  # its `if` skipped it: a decided result
        (S.SKIPPED, None, False),  # its run ended before it ran
        (S.ERROR, 5, False),
        (S.QUEUED, None, False),
        (S.PENDING, None, False),
    ],
)
def test_reusable_means_succeeded_or_skipped_by_its_condition(status, duration_ms, expected) -> None:
    assert states.reusable(status, duration_ms) is expected


def test_cancel_reaches_every_cancellable_run_status() -> None:
    for status in states.RUN_CANCELLABLE:
        assert (status, R.CANCELLED) in RUN_MOVES


def test_unreached_steps_can_all_be_skipped() -> None:
    for status in STEP_UNREACHED:
        assert (status, S.SKIPPED) in STEP_MOVES
    assert S.RUNNING not in STEP_UNREACHED, "a running step finishes and records its own result"


# ------------------------------------------------------------------ owners


def test_every_non_final_status_has_an_owner() -> None:
    live_runs = set(RunStatus) - RUN_TERMINAL
    live_steps = set(StepStatus) - STEP_FINISHED
    assert live_runs | live_steps <= set(OWNERS)
    for status in live_runs | live_steps:
        owner = OWNERS[status]
        assert owner.who.strip() and owner.deadline.strip()


def test_final_statuses_have_no_owner() -> None:
    assert not set(OWNERS) & (RUN_TERMINAL | STEP_FINISHED)


def test_owners_name_deadlines_that_exist() -> None:
    for owner in OWNERS.values():
        for constant in ("STUCK_AFTER", "LEASE"):
            if owner.deadline == constant:
                assert getattr(states, constant).total_seconds() > 0


def test_a_lease_outlives_several_heartbeats() -> None:
    assert states.LEASE >= 3 * states.HEARTBEAT
    assert states.LEASE_GRACE.total_seconds() > 0


# ------------------------------------------------------------------ checks


@pytest.mark.parametrize("pair", ALL_RUN_PAIRS, ids=_id)
def test_check_run_move_accepts_exactly_the_table(pair: tuple[RunStatus, RunStatus]) -> None:
    if pair in RUN_MOVES:
        check_run_move(*pair)
    else:
        with pytest.raises(IllegalTransition, match=f"run {pair[0]} → {pair[1]}"):
            check_run_move(*pair)


@pytest.mark.parametrize("pair", ALL_STEP_PAIRS, ids=_id)
def test_check_step_move_accepts_exactly_the_table(pair: tuple[StepStatus, StepStatus]) -> None:
    if pair in STEP_MOVES:
        check_step_move(*pair)
    else:
        with pytest.raises(IllegalTransition, match=f"step {pair[0]} → {pair[1]}"):
            check_step_move(*pair)


def test_an_illegal_transition_is_an_error_not_a_silent_no() -> None:
    assert issubclass(IllegalTransition, RuntimeError)


# ------------------------------------------------------------------ sources


@pytest.mark.parametrize("to", list(RunStatus), ids=str)
def test_run_sources(to: RunStatus) -> None:
    sources = run_sources(to)
    assert set(sources) == {frm for frm, t in RUN_MOVES if t == to}
    assert list(sources) == sorted(sources), "a stable order keeps the SQL cacheable"
    assert run_sources(to) == sources


@pytest.mark.parametrize("to", list(StepStatus), ids=str)
def test_step_sources(to: StepStatus) -> None:
    sources = step_sources(to)
    assert set(sources) == {frm for frm, t in STEP_MOVES if t == to}
    assert list(sources) == sorted(sources)


def test_sources_of_some_targets() -> None:
    assert run_sources(R.PENDING) == ()
    assert set(run_sources(R.CANCELLED)) == {R.PENDING, R.RUNNING, R.SUSPENDED}
    assert set(run_sources(R.COMPLETED)) == {R.RUNNING, R.SUSPENDED}
    assert set(step_sources(S.RUNNING)) == {S.PENDING, S.QUEUED, S.WAITING}
    assert set(step_sources(S.SKIPPED)) == {S.PENDING, S.QUEUED, S.RUNNING, S.WAITING}
    assert step_sources(S.PENDING) == ()


# ------------------------------------------------------------------ what the API shows


@pytest.mark.parametrize("status", list(RunStatus), ids=str)
def test_is_terminal(status: RunStatus) -> None:
    assert is_terminal(status) is (status in RUN_TERMINAL)
    assert is_terminal(status.value) is (status in RUN_TERMINAL), "plain text works too"


@pytest.mark.parametrize(
    ("status", "attempt", "shown"),
    [
        (S.PENDING, 0, False),
        (S.PENDING, 1, False),
        (S.QUEUED, 1, False),  # waiting its turn
        (S.QUEUED, 0, False),
        (S.QUEUED, 2, True),  # queued for a retry: attempt 1 was made
        (S.QUEUED, 5, True),
        (S.RUNNING, 1, True),
        (S.WAITING, 1, True),
        (S.SUCCESS, 1, True),
        (S.ERROR, 3, True),
        (S.SKIPPED, 0, True),
        (S.SKIPPED, 1, True),
    ],
)
def test_shown_in_results(status: StepStatus, attempt: int, shown: bool) -> None:
    assert shown_in_results(status, attempt) is shown


@pytest.mark.parametrize(
    ("status", "attempt", "made"),
    [
        (S.QUEUED, 1, 1),
        (S.QUEUED, 2, 1),  # the retry is queued, attempt 1 was the last made
        (S.QUEUED, 7, 6),
        (S.QUEUED, 0, 0),
        (S.RUNNING, 2, 2),
        (S.WAITING, 1, 1),
        (S.SUCCESS, 3, 3),
        (S.ERROR, 2, 2),
        (S.SKIPPED, 0, 0),
        (S.PENDING, 0, 0),
    ],
)
def test_attempt_made(status: StepStatus, attempt: int, made: int) -> None:
    assert attempt_made(status, attempt) == made


def test_statuses_are_their_own_text() -> None:
    assert str(R.PENDING) == "pending" and R("timeout") is R.TIMEOUT
    assert str(S.SUCCESS) == "success" and S("waiting") is S.WAITING
    assert R.RUNNING == "running" and S.RUNNING == "running"
