"""Steps with ``needs`` (a DAG): parallel branches, joins, failures that skip descendants, cancel,
approvals, retry and restart of what failed, and templates that see only what a step needs."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from app import engine
from app.engine import sweeps
from app.engine.graph import graph
from app.errors import InvalidStep
from app.timeutil import utcnow
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, failure, parked, retrying, step, success

R, S = RunStatus, StepStatus


def diamond(**extra: Any) -> list[dict[str, Any]]:
    """a → (b, c) → d: b and c need a (b by default), d needs both."""
    return [
        step("a"),
        step("b"),
        step("c", needs=["a"]),
        step("d", needs=["b", "c"], **extra),
    ]


def take(e: Engine, run_id: str) -> list[str]:
    """The step ids of the run's messages (consumed, as a worker would)."""
    return sorted(m.step_id for m in e.queue.take(run_id))


def claim(e: Engine, run_id: str, step_id: str) -> Any:
    found = e.claim(run_id, step_id)
    assert found is not None, f"{step_id} could not be claimed"
    return found


def test_a_chain_with_or_without_needs_is_linear_and_anything_else_is_not() -> None:
    chain = {"steps": [step("a"), step("b"), step("c", needs=["b"])]}
    assert graph(chain).linear
    assert not graph({"steps": diamond()}).linear
    assert graph({"steps": [step("a"), step("b", needs=[])]}).roots == (0, 1)


def test_a_diamond_runs_its_branches_in_parallel_and_joins_once(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    assert take(e, run_id) == ["a"]
    a = claim(e, run_id, "a")
    nxt = e.record(a, success({"v": "a"}))
    assert nxt.claim is None and sorted(s[1] for s in nxt.sends) == ["b", "c"]
    assert take(e, run_id) == ["b", "c"], "both branches are sent at once, to any worker"
    b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
    assert e.statuses(run_id) == [S.SUCCESS, S.RUNNING, S.RUNNING, S.PENDING]
    assert e.record(b, success({"v": "b"})).sends == []
    assert e.statuses(run_id)[3] == S.PENDING, "d waits for c"
    assert [s[1] for s in e.record(c, success({"v": "c"})).sends] == ["d"]
    d = claim(e, run_id, "d")
    assert set(d.step_context()["steps"]) == {"a", "b", "c"}
    e.record(d, success({"v": "d"}))
    run = e.run(run_id)
    assert run.status == R.COMPLETED and run.output == {"v": "d"}


def test_two_branches_finishing_at_once_queue_the_join_once(e: Engine) -> None:
    for _ in range(5):
        run_id = e.trigger(e.workflow(*diamond()))
        take(e, run_id)
        e.record(claim(e, run_id, "a"), success())
        take(e, run_id)
        b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
        gate = threading.Barrier(2)
        results: list[Any] = []

        def record(held: Any, gate: threading.Barrier = gate, results: list[Any] = results) -> None:
            gate.wait()
            results.append(e.record(held, success()))

        threads = [threading.Thread(target=record, args=(held,)) for held in (b, c)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(s[1] for r in results for s in r.sends) == ["d"]
        assert take(e, run_id) == ["d"]


def test_templates_see_only_the_steps_a_step_needs(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success({"v": "a"}))
    e.record(claim(e, run_id, "b"), success({"v": "b"}))
    c = claim(e, run_id, "c")  # b has finished: its output exists, but c does not need b
    assert set(c.template_context()["steps"]) == {"a", "b"}
    assert set(c.step_context()["steps"]) == {"a"}


def test_roots_start_together(e: Engine) -> None:
    run_id = e.trigger(e.workflow(step("x", needs=[]), step("y", needs=[]), step("z", needs=["x", "y"])))
    assert take(e, run_id) == ["x", "y"]
    assert e.statuses(run_id) == [S.QUEUED, S.QUEUED, S.PENDING]


def test_a_failed_branch_skips_what_needs_it_and_the_run_fails_when_the_rest_is_done(e: Engine) -> None:
    steps = [*diamond(), step("side", needs=[]), step("after-c", needs=["c"])]
    run_id = e.trigger(e.workflow(*steps))
    assert take(e, run_id) == ["a", "side"]
    side = claim(e, run_id, "side")
    e.record(claim(e, run_id, "a"), success())
    take(e, run_id)
    b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
    assert e.record(b, failure("b broke")).sends == []
    run = e.run(run_id)
    assert run.status == R.RUNNING, "c and side still run"
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.RUNNING, S.SKIPPED, S.RUNNING, S.PENDING]
    assert [s[1] for s in e.record(c, success()).sends] == ["after-c"], "c's own descendant still runs"
    e.record(side, success())
    assert e.run(run_id).status == R.RUNNING
    e.record(claim(e, run_id, "after-c"), success())
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error == {"code": "STEP_ERROR", "message": "b broke"}
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.SUCCESS, S.SKIPPED, S.SUCCESS, S.SUCCESS]


def test_if_skipped_need_counts_as_met(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    e.record(claim(e, run_id, "b"), success({"v": "b"}))
    skipped = e.record(claim(e, run_id, "c"), engine.Outcome(S.SKIPPED, started_at=utcnow()))
    assert [s[1] for s in skipped.sends] == ["d"]
    e.record(claim(e, run_id, "d"), engine.Outcome(S.SKIPPED, started_at=utcnow()))
    run = e.run(run_id)
    assert run.status == R.COMPLETED
    assert run.output == {"v": "b"}, "the last step in definition order that succeeded"


def test_cancel_stops_every_branch_between_steps(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    b = claim(e, run_id, "b")  # c is queued, not claimed
    e.cancel(run_id)
    assert e.claim(run_id, "c") is None, "a branch not started never starts"
    assert e.record(b, success()).sends == [], "b's result is recorded, nothing follows"
    assert e.statuses(run_id) == [S.SUCCESS, S.SUCCESS, S.SKIPPED, S.SKIPPED]
    assert e.run(run_id).status == R.CANCELLED


def test_a_retriable_branch_retries_alone(e: Engine) -> None:
    steps = [step("a"), retrying("b", 2), step("c", needs=["a"]), step("d", needs=["b", "c"])]
    run_id = e.trigger(e.workflow(*steps))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    take(e, run_id)
    again = e.record(claim(e, run_id, "b"), failure(retriable=True))
    assert [s[:3] for s in again.sends] == [(run_id, "b", 2)]
    e.record(claim(e, run_id, "c"), success())
    assert e.statuses(run_id)[3] == S.PENDING
    b2 = e.claim(run_id, "b", 2)
    assert b2 is not None
    assert [s[1] for s in e.record(b2, success()).sends] == ["d"]


def test_an_approval_in_one_branch_holds_the_join_until_resumed(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    take(e, run_id)
    b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
    e.record(b, parked(None, suspend=True))
    assert e.run(run_id).status == R.SUSPENDED
    assert e.record(c, success()).sends == [], "nothing starts while the run is suspended"
    e.resume(run_id, approved=True, data={"ok": 1})
    assert e.run(run_id).status == R.RUNNING
    assert take(e, run_id) == ["d"]
    e.record(claim(e, run_id, "d"), success({"v": "d"}))
    assert e.run(run_id).status == R.COMPLETED


def test_a_rejected_approval_fails_the_run_once_its_siblings_are_done(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
    e.record(b, parked(None, suspend=True))
    e.resume(run_id, approved=False)
    assert e.run(run_id).status == R.RUNNING, "c still runs"
    e.record(c, success())
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error["code"] == "APPROVAL_REJECTED"
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.SUCCESS, S.SKIPPED]


def test_a_lost_worker_with_no_attempt_left_fails_its_branch_only(e: Engine) -> None:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success())
    take(e, run_id)
    claim(e, run_id, "b")  # its worker dies
    e.record(claim(e, run_id, "c"), success())
    assert e.run(run_id).status == R.RUNNING
    later = utcnow() + timedelta(hours=1)
    assert e.sweeping(sweeps.sweep_dead_workers, later) >= 1
    assert e.statuses(run_id) == [S.SUCCESS, S.ERROR, S.SUCCESS, S.SKIPPED]
    run = e.run(run_id)
    assert run.status == R.FAILED and run.error["code"] == "STEP_ERROR"


def failed_diamond(e: Engine) -> str:
    """b failed, c succeeded, d skipped."""
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success({"v": "a"}))
    b, c = claim(e, run_id, "b"), claim(e, run_id, "c")
    e.record(c, success({"v": "c"}))
    e.record(b, failure("b broke"))
    assert e.run(run_id).status == R.FAILED
    return run_id


def test_retry_reruns_the_failed_steps_and_their_descendants_only(e: Engine) -> None:
    original = failed_diamond(e)
    plan = engine.plan_restart(e.services, e.company_id, original, mode="retry")
    assert plan.from_step_id == "b"
    assert plan.reused_step_ids == ["a", "c"] and plan.step_ids_to_run == ["b", "d"]
    run, created = engine.start_restart(e.services, plan)
    assert created
    assert take(e, run.id) == ["b"]
    assert e.statuses(run.id) == [S.SUCCESS, S.QUEUED, S.SUCCESS, S.PENDING]
    assert e.step(run.id, "c").output == {"v": "c"}, "c's result is reused, not re-run"
    assert [s[1] for s in e.record(claim(e, run.id, "b"), success({"v": "b2"})).sends] == ["d"]
    d = claim(e, run.id, "d")
    assert d.step_context()["steps"]["c"]["output"] == {"v": "c"}
    e.record(d, success({"v": "d"}))
    assert e.run(run.id).status == R.COMPLETED


def completed_diamond(e: Engine) -> str:
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    e.record(claim(e, run_id, "a"), success({"v": "a"}))
    for step_id in ("b", "c"):
        e.record(claim(e, run_id, step_id), success({"v": step_id}))
    e.record(claim(e, run_id, "d"), success({"v": "d"}))
    assert e.run(run_id).status == R.COMPLETED
    return run_id


def test_restart_from_a_branch_reruns_it_and_its_descendants(e: Engine) -> None:
    original = completed_diamond(e)
    plan = engine.plan_restart(e.services, e.company_id, original, mode="restart", from_step_id="c")
    assert plan.reused_step_ids == ["a", "b"] and plan.step_ids_to_run == ["c", "d"]
    run, _ = engine.start_restart(e.services, plan)
    assert take(e, run.id) == ["c"]
    assert e.statuses(run.id) == [S.SUCCESS, S.SUCCESS, S.QUEUED, S.PENDING]
    e.record(claim(e, run.id, "c"), success({"v": "c2"}))
    e.record(claim(e, run.id, "d"), success({"v": "d2"}))
    assert e.run(run.id).status == R.COMPLETED


def test_restart_from_a_step_needs_results_for_what_it_does_not_rerun(e: Engine) -> None:
    original = failed_diamond(e)
    with pytest.raises(InvalidStep, match="Step b has no result to reuse"):
        engine.plan_restart(e.services, e.company_id, original, mode="restart", from_step_id="c")


def test_a_dag_s_pure_step_is_claimed_in_a_committed_transaction(e: Engine) -> None:
    """A chain's pure step may keep its claim open until its result; a DAG's records through the
    run's lock after its claim committed (so a failed record cannot roll the claim back unseen)."""
    chain = e.trigger(e.workflow(step("a"), step("b")))
    take(e, chain)
    held = engine.claim_step(e.services, chain, "a", 1, defer_pure=True)
    assert held is not None and held.tx is not None
    engine.abandon_claim(held)
    run_id = e.trigger(e.workflow(*diamond()))
    take(e, run_id)
    claimed = engine.claim_step(e.services, run_id, "a", 1, defer_pure=True)
    assert claimed is not None and claimed.tx is None
    assert e.step(run_id, "a").status == S.RUNNING
