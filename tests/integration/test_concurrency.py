"""Concurrency keys: runs over a key's limit wait pending, in arrival order, and start as slots
free; every way a run ends frees its slot in the same commit; the sweep reconciles the rest."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.engine import sweeps, trigger_batch
from app.errors import ValidationError
from app.timeutil import utcnow
from models import Run
from models.states import RunStatus, StepStatus
from tests.integration.conftest import Engine, failure, retrying, step, success

R, S = RunStatus, StepStatus
PER_CUSTOMER = {"key": "{{ input.customerId }}", "limit": 1}


def sent(e: Engine, run_id: str) -> list[str]:
    """The step ids of the run's messages (consumed, as a worker would)."""
    return [m.step_id for m in e.queue.take(run_id)]


def finish(e: Engine, run_id: str, outcome: Any = None) -> None:
    """Run the run's one step (already sent) to the end with ``outcome`` (success by default)."""
    claim = e.claim(run_id, "a")
    assert claim is not None
    e.record(claim, outcome or success())


def slot(e: Engine, run_id: str) -> str | None:
    return e.run(run_id).slot


def test_runs_over_the_limit_wait_and_start_in_arrival_order(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER)
    first, second, third = (e.trigger(wid, {"customerId": "c1"}) for _ in range(3))
    other = e.trigger(wid, {"customerId": "c2"})
    assert sent(e, first) == ["a"] and sent(e, other) == ["a"], "each key has a free slot"
    assert sent(e, second) == [] and sent(e, third) == []
    assert e.run(second).status == R.PENDING and e.statuses(second) == [S.PENDING]
    assert [slot(e, r) for r in (first, second, third, other)] == ["held", "waiting", "waiting", "held"]
    finish(e, first)
    assert e.run(first).status == R.COMPLETED and slot(e, first) is None
    assert sent(e, second) == ["a"] and sent(e, third) == [], "the oldest waiting run starts, only it"
    finish(e, second)
    assert sent(e, third) == ["a"]
    finish(e, third)
    assert e.run(third).status == R.COMPLETED


def test_a_failed_cancelled_or_timed_out_run_frees_its_slot(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER, timeoutMs=60_000)
    runs = [e.trigger(wid, {"customerId": "x"}) for _ in range(4)]
    assert sent(e, runs[0]) == ["a"]
    finish(e, runs[0], failure())
    assert e.run(runs[0]).status == R.FAILED
    assert sent(e, runs[1]) == ["a"], "a failed run frees its slot"
    e.cancel(runs[1])
    assert sent(e, runs[2]) == ["a"], "a cancelled run frees its slot"
    deadline = e.run(runs[2]).deadline_at
    assert e.sweeping(sweeps.sweep_timeouts, deadline + timedelta(seconds=1)) >= 1
    assert e.run(runs[2]).status == R.TIMEOUT and e.run(runs[3]).status == R.TIMEOUT
    assert [slot(e, r) for r in runs] == [None] * 4, "a waiting run that times out leaves the queue"


def test_a_waiting_run_cancelled_leaves_the_queue_without_taking_a_slot(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER)
    holder, waiting, last = (e.trigger(wid, {"customerId": "k"}) for _ in range(3))
    e.cancel(waiting)
    assert slot(e, waiting) is None and sent(e, waiting) == [] and sent(e, last) == []
    finish(e, holder)
    assert sent(e, last) == ["a"]


def test_a_limit_without_key_is_per_workflow(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency={"limit": 2})
    runs = [e.trigger(wid, {"customerId": str(i)}) for i in range(3)]
    assert [len(sent(e, r)) for r in runs] == [1, 1, 0]


def test_a_key_that_does_not_render_refuses_the_trigger(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency={"key": "{{ input.customer.id }}", "limit": 1})
    with pytest.raises(ValidationError, match="concurrency.key"):
        e.trigger(wid, {})


def test_a_batch_waits_in_its_order(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER)
    items = [{"input": {"customerId": "b"}} for _ in range(4)] + [{"input": {}}]
    results = trigger_batch(e.services, e.company_id, wid, items)
    assert [r.status for r in results] == ["created"] * 4 + ["invalid"]
    assert results[4].error["code"] == "VALIDATION_ERROR"
    runs = [r.run_id for r in results[:4]]
    assert [len(sent(e, r)) for r in runs] == [1, 0, 0, 0]
    for index, run_id in enumerate(runs):
        finish(e, run_id)
        if index + 1 < len(runs):
            assert sent(e, runs[index + 1]) == ["a"], f"run {index + 1} starts next"


def test_a_lost_worker_keeps_the_slot_until_its_run_ends(e: Engine) -> None:
    wid = e.workflow(retrying("a", 2), concurrency=PER_CUSTOMER)
    holder, waiting = (e.trigger(wid, {"customerId": "w"}) for _ in range(2))
    sent(e, holder)
    assert e.claim(holder, "a") is not None  # its worker dies
    later = utcnow() + timedelta(hours=1)
    assert e.sweeping(sweeps.sweep_dead_workers, later) == 1
    assert slot(e, holder) == "held" and sent(e, waiting) == [], "a new attempt, same slot"
    again = e.claim(holder, "a", 2)
    assert again is not None  # this worker dies too: no attempt left
    assert e.sweeping(sweeps.sweep_dead_workers, later + timedelta(hours=1)) == 1
    assert e.run(holder).status == R.FAILED and slot(e, holder) is None
    assert sent(e, waiting) == ["a"]


def test_the_sweep_reconciles_a_slot_left_on_an_ended_run(e: Engine) -> None:
    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER)
    holder, waiting = (e.trigger(wid, {"customerId": "r"}) for _ in range(2))
    sent(e, holder)
    with e.services.db.session() as session:  # as if a run had ended past the transitions
        session.execute(update(Run).where(Run.id == holder).values(status=R.COMPLETED))
        session.commit()
    assert sent(e, waiting) == []
    with e.services.db.session() as session:
        assert sweeps.sweep_slots(e.services, session, utcnow()) >= 2
    assert slot(e, holder) is None and sent(e, waiting) == ["a"]


def test_a_restart_waits_for_a_slot_too(e: Engine) -> None:
    from app import engine

    wid = e.workflow(step("a"), step("b"), concurrency=PER_CUSTOMER)
    original = e.trigger(wid, {"customerId": "z"})
    sent(e, original)
    claim = e.claim(original, "a")
    nxt = e.record(claim, success()).claim
    e.record(nxt, success())
    assert e.run(original).status == R.COMPLETED
    holder = e.trigger(wid, {"customerId": "z"})
    assert sent(e, holder) == ["a"]
    plan = engine.plan_restart(e.services, e.company_id, original, mode="restart", from_step_id="b")
    restarted, _ = engine.start_restart(e.services, plan)
    assert sent(e, restarted.id) == [] and slot(e, restarted.id) == "waiting"
    claim = e.claim(holder, "a")
    e.record(e.record(claim, success()).claim, success())
    assert sent(e, restarted.id) == ["b"], "admitted, it starts at its restart step"


def test_a_dag_run_holds_one_slot_for_all_its_branches(e: Engine) -> None:
    steps = [step("a", needs=[]), step("b", needs=[])]
    wid = e.workflow(*steps, concurrency=PER_CUSTOMER)
    holder, waiting = (e.trigger(wid, {"customerId": "d"}) for _ in range(2))
    assert sorted(sent(e, holder)) == ["a", "b"] and sent(e, waiting) == []
    e.record(e.claim(holder, "a"), success())
    assert sent(e, waiting) == [], "b still runs"
    e.record(e.claim(holder, "b"), success())
    assert e.run(holder).status == R.COMPLETED
    assert sorted(sent(e, waiting)) == ["a", "b"]


def test_a_run_admitted_while_the_broker_is_down_is_sent_by_the_sweep(e: Engine, broker_down: Any) -> None:
    """The commit that frees a slot admits the next run; if its message cannot be sent then, the
    step stays queued and the lost-message sweep sends it."""
    from app import engine

    wid = e.workflow(step("a"), concurrency=PER_CUSTOMER)
    holder, waiting = (e.trigger(wid, {"customerId": "down"}) for _ in range(2))
    sent(e, holder)
    claim = e.claim(holder, "a")
    assert claim is not None
    engine.record_result(broker_down, claim, success())  # the admission's send fails, logged
    assert e.run(holder).status == R.COMPLETED
    assert e.statuses(waiting) == [S.QUEUED] and slot(e, waiting) == "held"
    assert sent(e, waiting) == []
    later = utcnow() + timedelta(minutes=5)
    assert e.sweeping(sweeps.sweep_lost_messages, later) >= 1
    assert sent(e, waiting) == ["a"]
