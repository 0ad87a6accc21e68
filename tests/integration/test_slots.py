"""Per-company step slots: the claim takes one (or bounces at the cap), a chain keeps it, the
heartbeat renews it, a dead worker's slot lapses with its lease, Redis down fails open."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from app import slots
from app.queue import make_redis
from app.services import Services
from models.states import StepStatus
from tests.integration.conftest import BrokerQueue, Engine, step, success
from workers.executor import execute_step
from workers.middleware import LeaseHeartbeat, StepTimeLimit

S = StepStatus
CAP = 2


def capped(services: Services, cap: int = CAP) -> Services:
    return dataclasses.replace(
        services, config=services.config.with_overrides(company_max_concurrent_steps=cap)
    )


@pytest.fixture
def c(engine_services: Services, queue: BrokerQueue) -> Engine:
    """A company whose steps are capped at CAP."""
    instance = Engine(capped(engine_services), queue)
    yield instance
    instance.end_live_runs()
    instance.services.redis.delete(slots.slots_key(instance.services, instance.company_id))


def held(e: Engine) -> list[str]:
    return [m.decode() for m in e.services.redis.zrange(slots.slots_key(e.services, e.company_id), 0, -1)]


def test_a_company_at_its_cap_claims_nothing_until_a_slot_frees(c: Engine) -> None:
    wid = c.workflow(step("a"))
    first, second, third = (c.trigger(wid) for _ in range(3))
    assert c.claim(first, "a") is not None and c.claim(second, "a") is not None
    assert sorted(held(c)) == sorted([first, second])
    with pytest.raises(slots.NoFreeSlot):
        c.claim(third, "a")
    assert c.statuses(third) == [S.QUEUED], "the message left the step queued"
    slots.release(c.services, c.company_id, first)
    assert c.claim(third, "a") is not None


def test_another_company_is_not_held_back(c: Engine, engine_services: Services, queue: BrokerQueue) -> None:
    wid = c.workflow(step("a"))
    for run_id in [c.trigger(wid) for _ in range(CAP)]:
        assert c.claim(run_id, "a") is not None
    other = Engine(capped(engine_services), queue)
    try:
        assert other.claim(other.trigger(other.workflow(step("a"))), "a") is not None
    finally:
        other.end_live_runs()


def test_a_chain_keeps_its_one_slot(c: Engine) -> None:
    run_id, claim = c.start(step("a"), step("b"), step("c"))
    nxt = c.record(claim, success())
    assert nxt.claim is not None and held(c) == [run_id]
    nxt = c.record(nxt.claim, success())
    assert held(c) == [run_id], "chaining takes no second slot"


def test_a_stale_message_gives_its_fresh_slot_back(c: Engine) -> None:
    run_id = c.trigger(c.workflow(step("a"), step("b")))
    assert c.claim(run_id, "b") is None
    assert held(c) == []


def test_a_dead_workers_slot_lapses_and_the_heartbeat_renews_live_ones(c: Engine) -> None:
    key = slots.slots_key(c.services, c.company_id)
    c.services.redis.zadd(key, {"run_dead-1": time.time() - 1, "run_dead-2": time.time() - 1})
    run_id, claim = c.start(step("a"))
    assert held(c) == [run_id], "expired slots were dropped by the claim"
    before = c.services.redis.zscore(key, run_id)
    beat = LeaseHeartbeat(c.services)
    beat.hold(claim)
    time.sleep(0.01)
    assert beat.beat() == 1
    assert c.services.redis.zscore(key, run_id) > before


def test_a_refused_message_goes_back_to_the_broker_with_a_short_delay(c: Engine, queue: BrokerQueue) -> None:
    wid = c.workflow(step("a"))
    for run_id in [c.trigger(wid) for _ in range(CAP)]:
        [message] = queue.take(run_id)
        assert c.claim(run_id, "a") is not None
    waiting = c.trigger(wid)
    queue.take(waiting)
    started = int(time.time() * 1000)
    execute_step(c.services, LeaseHeartbeat(c.services), StepTimeLimit(), waiting, "a", 1)
    [again] = queue.sent(waiting)
    assert (again.step_id, again.attempt, again.delayed) == ("a", 1, True)
    assert started + 200 <= again.eta <= int(time.time() * 1000) + 600
    assert c.statuses(waiting) == [S.QUEUED]


def test_the_executor_frees_the_slot_when_the_chain_ends(c: Engine, queue: BrokerQueue) -> None:
    run_id = c.trigger(c.workflow(step("a"), step("b")))
    queue.take(run_id)
    execute_step(c.services, LeaseHeartbeat(c.services), StepTimeLimit(), run_id, "a", 1)
    assert c.statuses(run_id) == [S.SUCCESS, S.SUCCESS]
    assert held(c) == []


def test_redis_down_fails_open_and_no_cap_makes_no_call(engine_services: Services, caplog) -> None:
    dead = dataclasses.replace(
        capped(engine_services),
        redis=make_redis(engine_services.config.with_overrides(redis_url="redis://127.0.0.1:1/0")),
    )
    with caplog.at_level(logging.WARNING, logger="baton.slots"):
        assert slots.acquire(dead, "cmp_x", "run_x") is None
    assert any("not enforced" in r.getMessage() for r in caplog.records)
    caplog.clear()
    uncapped = capped(dead, cap=0)
    with caplog.at_level(logging.WARNING, logger="baton.slots"):
        assert slots.acquire(uncapped, "cmp_x", "run_x") is None
        slots.release(uncapped, "cmp_x", "run_x")
        slots.renew(uncapped, [("cmp_x", "run_x")])
    assert caplog.records == [], "with no cap, Redis is never asked"
