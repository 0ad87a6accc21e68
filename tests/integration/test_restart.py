"""plan_restart / start_restart: the plan is the dry run; the new run reuses what came before."""

from __future__ import annotations

from typing import Any

import pytest

from app import engine, workflows
from app.engine import RestartPlan, deep_merge, sweeps
from app.errors import Conflict, InvalidState, InvalidStep, NotFound
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, failure, retrying, step, success, unique

R, S = RunStatus, StepStatus


def plan(e: Engine, run_id: str, mode: str = "restart", **kwargs: Any) -> RestartPlan:
    return engine.plan_restart(e.services, e.company_id, run_id, mode=mode, **kwargs)


def failed_run(e: Engine) -> str:
    """a succeeded, b failed, c skipped."""
    run_id, claim = e.start(step("a"), step("b"), step("c"))
    b = e.record(claim, success({"v": "a"})).claim
    e.record(b, failure("b broke"))
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.SKIPPED]
    return run_id


def completed_run(e: Engine, **extra: Any) -> str:
    run_id, claim = e.start(step("a"), step("b"), step("c"), **extra)
    nxt = e.record(claim, success({"v": "a"})).claim
    nxt = e.record(nxt, success({"v": "b"})).claim
    e.record(nxt, success({"v": "c"}))
    assert e.run(run_id).status == R.COMPLETED
    return run_id


def test_retry_plans_from_the_first_failed_step(e: Engine) -> None:
    run_id = failed_run(e)
    p = plan(e, run_id, "retry")
    assert (p.mode, p.from_step_id, p.start, p.version) == ("retry", "b", 1, 1)
    assert p.reused_step_ids == ["a"] and p.step_ids_to_run == ["b", "c"]
    assert p.input == {} and p.original.id == run_id
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.SKIPPED], "a plan writes nothing"


def test_retry_starts_a_linked_run_that_reuses_the_steps_before(e: Engine) -> None:
    run_id = failed_run(e)
    new, created = engine.start_restart(e.services, plan(e, run_id, "retry"))
    assert created
    stored = e.run(new.id)
    assert (stored.status, stored.restarted_from_run_id, stored.restart_from_step_id) == (
        R.PENDING,
        run_id,
        "b",
    )
    a, b, c = (e.step(new.id, s) for s in "abc")
    old_a = e.step(run_id, "a")
    assert (a.status, a.output, a.reused, a.attempt) == (S.SUCCESS, {"v": "a"}, True, 1)
    assert (a.started_at, a.completed_at) == (old_a.started_at, old_a.completed_at)
    assert (b.status, b.attempt, b.reused) == (S.QUEUED, 1, False)
    assert (c.status, c.attempt) == (S.PENDING, 0)
    assert [(m.step_id, m.attempt) for m in e.sent(new.id)] == [("b", 1)]
    # The new run starts at b and sees a's reused output.
    claim = e.claim(new.id, "b")
    assert claim.results == {"a": {"output": {"v": "a"}, "status": S.SUCCESS}}
    assert e.claim(new.id, "a", 1) is None, "a reused step never runs again"


def test_retry_of_a_run_with_no_failed_step_starts_from_the_first(e: Engine) -> None:
    run_id, claim = e.start(step("a"), output={"x": "{{ steps.a.output.nothing.here }}"})
    e.record(claim, success({"v": 1}))
    assert e.run(run_id).status == R.FAILED  # the output mapping failed, not a step
    assert plan(e, run_id, "retry").from_step_id == "a"


def test_restart_from_a_step_with_a_deep_merged_input(e: Engine) -> None:
    wid = e.workflow(step("a"), step("b"), step("c"))
    run_id = e.trigger(wid, {"order": {"id": 1, "lines": [1, 2]}, "keep": True})
    claim = e.claim(run_id, "a")
    nxt = e.record(claim, success({"v": "a"})).claim
    nxt = e.record(nxt, success({"v": "b"})).claim
    e.record(nxt, success({"v": "c"}))
    p = plan(e, run_id, from_step_id="c", override_input={"order": {"lines": [3]}, "new": 1})
    assert p.input == {"order": {"id": 1, "lines": [3]}, "keep": True, "new": 1}
    assert p.reused_step_ids == ["a", "b"]
    new, _ = engine.start_restart(e.services, p)
    assert e.run(new.id).input == p.input
    assert e.statuses(new.id) == [S.SUCCESS, S.SUCCESS, S.QUEUED]


def test_restart_from_the_first_step_reuses_nothing(e: Engine) -> None:
    run_id = completed_run(e)
    new, _ = engine.start_restart(e.services, plan(e, run_id, from_step_id="a"))
    assert e.statuses(new.id) == [S.QUEUED, S.PENDING, S.PENDING]
    assert e.run(new.id).restart_from_step_id == "a"


def test_restart_of_a_timed_out_run(e: Engine) -> None:
    run_id, claim = e.start(step("a"), step("b"), timeoutMs=60_000)
    e.record(claim, success())
    e.sweeping(sweeps.sweep_timeouts, e.run(run_id).deadline_at)
    assert e.run(run_id).status == R.TIMEOUT
    p = plan(e, run_id, from_step_id="b")
    assert p.reused_step_ids == ["a"]
    assert plan(e, run_id, "retry").mode == "retry"


@pytest.mark.parametrize("status", [R.PENDING, R.RUNNING, R.SUSPENDED, R.CANCELLED])
def test_only_finished_runs_can_be_restarted(e: Engine, status: RunStatus) -> None:
    run_id = e.make_run(e.workflow(step("a")), status.value)
    with pytest.raises(InvalidState, match="Can only restart completed or failed runs"):
        plan(e, run_id, from_step_id="a")


@pytest.mark.parametrize("status", [R.COMPLETED, R.RUNNING, R.CANCELLED])
def test_only_failed_or_timed_out_runs_can_be_retried(e: Engine, status: RunStatus) -> None:
    run_id = e.make_run(e.workflow(step("a")), status.value)
    with pytest.raises(InvalidState, match="Can only retry failed runs"):
        plan(e, run_id, "retry")


def test_an_unknown_step_cannot_be_restarted_from(e: Engine) -> None:
    with pytest.raises(InvalidStep, match="Step not found: zzz"):
        plan(e, completed_run(e), from_step_id="zzz")


def test_a_restart_needs_a_result_for_every_step_before(e: Engine) -> None:
    run_id = failed_run(e)
    with pytest.raises(InvalidStep, match="Step b has no result to reuse"):
        plan(e, run_id, from_step_id="c")


def test_another_company_s_run_is_not_found(e: Engine) -> None:
    run_id = completed_run(e)
    with pytest.raises(NotFound):
        engine.plan_restart(e.services, "co_someone_else", run_id, mode="restart", from_step_id="a")


def test_restart_on_the_latest_version(e: Engine) -> None:
    run_id = completed_run(e)
    wid = e.run(run_id).workflow_id
    with e.services.db.session() as session:
        workflows.replace(
            session, e.company_id, wid, {"name": "v2", "steps": [step("a"), step("b"), step("d")]}
        )
    original = plan(e, run_id, from_step_id="b")
    assert original.version == 1 and original.step_ids_to_run == ["b", "c"]
    latest = plan(e, run_id, from_step_id="b", version_choice="latest")
    assert latest.version == 2 and latest.step_ids_to_run == ["b", "d"]
    new, _ = engine.start_restart(e.services, latest)
    assert e.run(new.id).workflow_version == 2
    with pytest.raises(InvalidStep, match="Step not found: c"):
        plan(e, run_id, from_step_id="c", version_choice="latest")


def test_a_restart_with_the_same_key_is_made_once(e: Engine) -> None:
    run_id = completed_run(e)
    key = unique()
    first, created = engine.start_restart(e.services, plan(e, run_id, from_step_id="b"), key)
    again, created_again = engine.start_restart(e.services, plan(e, run_id, from_step_id="b"), key)
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict):
        engine.start_restart(e.services, plan(e, run_id, from_step_id="c"), key)


def test_deep_merge() -> None:
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 9, "e": 4}}) == {
        "a": {"b": 1, "c": 9, "e": 4},
        "d": 3,
    }
    assert deep_merge({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}, "lists replace"
    assert deep_merge({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert deep_merge({"a": 1}, {}) == {"a": 1}
    assert deep_merge(1, {"a": 1}) == {"a": 1}
    original = {"a": {"b": 1}}
    deep_merge(original, {"a": {"b": 2}})
    assert original == {"a": {"b": 1}}, "the original input is not changed"


def test_retry_of_a_run_that_timed_out_mid_retry_resumes_at_that_step(e: Engine) -> None:
    run_id, claim = e.start(step("a"), retrying("b", 3), step("c"), timeoutMs=60_000)
    b = e.record(claim, success({"v": "a"})).claim
    e.record(b, failure("503", retriable=True))  # b waits for attempt 2
    e.sweeping(sweeps.sweep_timeouts, e.run(run_id).deadline_at)
    assert e.run(run_id).status == R.TIMEOUT
    assert e.statuses(run_id) == [S.SUCCESS, S.SKIPPED, S.SKIPPED]
    p = plan(e, run_id, "retry")
    assert p.from_step_id == "b" and p.reused_step_ids == ["a"]
