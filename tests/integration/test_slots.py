"""Per-company step slots: a message over the cap is parked (one Redis call, no database work), the
thread that frees a slot runs the company's oldest parked message, a chain keeps one slot, the
heartbeat renews slots, a dead worker's slot lapses, "auto" is three quarters of the live worker
threads, one process keeps a thread free of any one company, and Redis down fails open."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator

import pytest

from app import slots
from app.queue import make_redis
from app.services import Services
from models.states import StepStatus
from tests.integration.conftest import BrokerQueue, Engine, step
from workers.executor import execute_step
from workers.middleware import LeaseHeartbeat, StepTimeLimit

S = StepStatus
CAP = 2


def capped(services: Services, cap: int = CAP) -> Services:
    return dataclasses.replace(
        services, config=services.config.with_overrides(company_max_concurrent_steps=cap)
    )


@pytest.fixture
def c(engine_services: Services, queue: BrokerQueue) -> Iterator[Engine]:
    """A company whose steps are capped at CAP (and no per-process limit: the session's in-process
    worker, if one started, set it for its own threads)."""
    instance = Engine(capped(engine_services), queue)
    limit, slots.local.limit = slots.local.limit, 0
    busy = slots.local.busy.copy()
    slots.local.busy.clear()
    yield instance
    instance.end_live_runs()
    for key in (slots.slots_key, slots.parked_key):
        instance.services.redis.delete(key(instance.services, instance.company_id))
    slots.local.limit = limit
    slots.local.busy.clear()
    slots.local.busy.update(busy)


def held(e: Engine) -> list[str]:
    return [m.decode() for m in e.services.redis.zrange(slots.slots_key(e.services, e.company_id), 0, -1)]


def parked(e: Engine) -> list[list]:
    key = slots.parked_key(e.services, e.company_id)
    return [json.loads(m) for m in e.services.redis.lrange(key, 0, -1)]


def member(run_id: str, step_id: str = "a") -> str:
    """A slot's member: the run and step of the message that holds it."""
    return f"{run_id}/{step_id}"


def message(e: Engine, run_id: str, step_id: str = "a") -> slots.Message:
    return slots.Message(run_id, step_id, 1, e.company_id)


def run_message(e: Engine, run_id: str, step_id: str = "a") -> None:
    execute_step(e.services, LeaseHeartbeat(e.services), StepTimeLimit(), run_id, step_id, 1, e.company_id)


def test_messages_carry_their_company(c: Engine, queue: BrokerQueue) -> None:
    run_id = c.trigger(c.workflow(step("a")))
    [sent] = queue.take(run_id)
    assert sent.company_id == c.company_id


def test_over_the_cap_a_message_is_parked_and_its_step_stays_queued(c: Engine) -> None:
    wid = c.workflow(step("a"))
    first, second, third = (c.trigger(wid) for _ in range(3))
    assert slots.enter(c.services, message(c, first)) and slots.enter(c.services, message(c, second))
    assert sorted(held(c)) == sorted([member(first), member(second)])
    assert not slots.enter(c.services, message(c, third))
    assert parked(c) == [[third, "a", 1]]
    assert c.statuses(third) == [S.QUEUED], "parking touched no database row"


def test_freeing_a_slot_hands_it_to_the_oldest_parked_message(c: Engine) -> None:
    wid = c.workflow(step("a"))
    runs = [c.trigger(wid) for _ in range(4)]
    for run_id in runs:
        slots.enter(c.services, message(c, run_id))
    assert parked(c) == [[runs[2], "a", 1], [runs[3], "a", 1]]
    handed = slots.leave(c.services, c.company_id, member(runs[0]))
    assert handed == message(c, runs[2])
    assert sorted(held(c)) == sorted([member(runs[1]), member(runs[2])]), (
        "the parked message holds the freed slot"
    )
    assert slots.leave(c.services, c.company_id, member(runs[1])) == message(c, runs[3])
    assert slots.leave(c.services, c.company_id, member(runs[2])) is None and held(c) == [member(runs[3])]


def test_another_company_is_not_held_back(c: Engine, engine_services: Services, queue: BrokerQueue) -> None:
    wid = c.workflow(step("a"))
    for run_id in [c.trigger(wid) for _ in range(CAP)]:
        assert slots.enter(c.services, message(c, run_id))
    other = Engine(capped(engine_services), queue)
    try:
        run_id = other.trigger(other.workflow(step("a")))
        assert slots.enter(other.services, message(other, run_id))
    finally:
        other.end_live_runs()
        other.services.redis.delete(slots.slots_key(other.services, other.company_id))


def test_the_worker_runs_parked_messages_after_its_chain_and_frees_every_slot(c: Engine) -> None:
    single = Engine(capped(c.services, cap=1), c.queue)
    single.company_id = c.company_id
    wid = single.workflow(step("a"), step("b"))
    first, second = single.trigger(wid), single.trigger(wid)
    assert slots.enter(single.services, message(single, first))
    assert not slots.enter(single.services, message(single, second)), "parked behind the first"
    slots.local.give(single.company_id)  # that first entry stands for another thread's message
    # A duplicate of the first run's message arrives at a worker: its run already holds the slot.
    run_message(single, first)
    assert single.statuses(first) == [S.SUCCESS, S.SUCCESS]
    assert single.statuses(second) == [S.SUCCESS, S.SUCCESS], "the freed slot ran the parked message"
    assert held(single) == [] and parked(single) == []
    assert slots.local.busy == {}, "every local thread count was given back"


def test_a_stale_message_frees_its_slot(c: Engine) -> None:
    run_id = c.trigger(c.workflow(step("a"), step("b")))
    run_message(c, run_id, "b")
    assert c.statuses(run_id) == [S.QUEUED, S.PENDING]
    assert held(c) == [] and slots.local.busy == {}


def test_a_dead_workers_slot_lapses_and_the_heartbeat_renews_live_ones(c: Engine) -> None:
    key = slots.slots_key(c.services, c.company_id)
    c.services.redis.zadd(key, {"run_dead-1": time.time() - 1, "run_dead-2": time.time() - 1})
    run_id, claim = c.start(step("a"))
    assert slots.enter(c.services, message(c, run_id)), "expired slots do not count"
    assert held(c) == [member(run_id)]
    before = c.services.redis.zscore(key, member(run_id))
    beat = LeaseHeartbeat(c.services)
    claim.slot = member(run_id)  # as the executor sets it for the message's chain
    beat.hold(claim)
    time.sleep(0.01)
    assert beat.beat() == 1
    assert c.services.redis.zscore(key, member(run_id)) > before


def test_auto_is_three_quarters_of_the_live_worker_threads(c: Engine) -> None:
    auto = Engine(capped(c.services, cap=slots.AUTO), c.queue)
    auto.company_id = c.company_id
    capacity = slots.capacity_key(auto.services)
    wid = auto.workflow(step("a"))
    runs = [auto.trigger(wid) for _ in range(14)]
    try:
        assert slots.enter(auto.services, message(auto, runs[0])), "no worker registered: no cap"
        slots.leave(auto.services, auto.company_id, member(runs[0]))
        slots.register(auto.services, "host-a:1:8")
        slots.register(auto.services, "host-b:2:8")
        auto.services.redis.zadd(capacity, {"host-c:3:64": time.time() - 1})  # a lapsed process
        entered = [slots.enter(auto.services, message(auto, run_id)) for run_id in runs[1:]]
        assert entered == [True] * 12 + [False], "16 live threads: a company may hold 12"
        slots.unregister(auto.services, "host-b:2:8")
        assert slots.leave(auto.services, auto.company_id, member(runs[1])) == message(auto, runs[13])
    finally:
        auto.services.redis.delete(capacity)


def test_a_process_keeps_one_thread_free_of_any_one_company(c: Engine) -> None:
    roomy = Engine(capped(c.services, cap=100), c.queue)
    roomy.company_id = c.company_id
    wid = roomy.workflow(step("a"))
    runs = [roomy.trigger(wid) for _ in range(3)]
    slots.set_process_threads(3)
    try:
        entered = [slots.enter(roomy.services, message(roomy, run_id)) for run_id in runs]
        assert entered == [True, True, False], "2 of this process's 3 threads, whatever the global cap"
        assert parked(roomy) == [[runs[2], "a", 1]]
        assert slots.leave(roomy.services, roomy.company_id, member(runs[0])) == message(roomy, runs[2])
        assert slots.local.busy[roomy.company_id] == 2
    finally:
        slots.local.limit = 0  # the fixture restores the process's own limit


def test_redis_down_fails_open_and_no_cap_makes_no_call(engine_services: Services, caplog) -> None:
    dead = dataclasses.replace(
        capped(engine_services),
        redis=make_redis(engine_services.config.with_overrides(redis_url="redis://127.0.0.1:1/0")),
    )
    down = slots.Message("run_x", "a", 1, "cmp_x")
    with caplog.at_level(logging.WARNING, logger="baton.slots"):
        assert slots.enter(dead, down) is True
        assert slots.leave(dead, "cmp_x", "run_x") is None
    assert any("not enforced" in r.getMessage() for r in caplog.records)
    assert slots.local.busy == {}
    caplog.clear()
    uncapped = capped(dead, cap=0)
    with caplog.at_level(logging.WARNING, logger="baton.slots"):
        assert slots.enter(uncapped, down) is True
        assert slots.leave(uncapped, "cmp_x", "run_x") is None
        slots.renew(uncapped, [("cmp_x", "run_x")])
        slots.register(uncapped, "host:1:8")
    assert caplog.records == [], "with no cap, Redis is never asked"


def test_the_heartbeat_sends_back_parked_messages_a_failed_holder_left(c: Engine, queue: BrokerQueue) -> None:
    wid = c.workflow(step("a"))
    runs = [c.trigger(wid) for _ in range(CAP + 2)]
    for run_id in runs:
        queue.take(run_id)
        slots.enter(c.services, message(c, run_id))
    assert len(parked(c)) == 2
    assert slots.rescue(c.services) == 0, "at its cap: the holders will take them"
    for run_id in runs[:CAP]:
        slots.release(c.services, c.company_id, member(run_id))  # each holder's message failed: no hand-over
    assert slots.rescue(c.services) == 2
    assert parked(c) == []
    assert [(m.run_id, m.company_id) for r in runs[CAP:] for m in queue.sent(r)] == [
        (r, c.company_id) for r in runs[CAP:]
    ]


def test_each_parallel_branch_of_a_run_holds_its_own_slot(c: Engine) -> None:
    """A DAG's branches run at once: each takes a slot of the company's cap, and one finishing
    frees its own, not its sibling's."""
    run_id = c.trigger(c.workflow(step("a", needs=[]), step("b", needs=[]), step("c", needs=["a", "b"])))
    assert slots.enter(c.services, message(c, run_id, "a"))
    assert slots.enter(c.services, message(c, run_id, "b"))
    assert sorted(held(c)) == [member(run_id, "a"), member(run_id, "b")]
    other = c.trigger(c.workflow(step("a")))
    assert not slots.enter(c.services, message(c, other)), "the two branches fill the cap of 2"
    assert slots.leave(c.services, c.company_id, member(run_id, "a")) == message(c, other)
    assert sorted(held(c)) == [member(run_id, "b"), member(other)]
