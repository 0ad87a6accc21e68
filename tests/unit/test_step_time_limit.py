"""StepTimeLimit: a step past its own timeout is interrupted, whatever deadlines other threads hold."""

from __future__ import annotations

import math
import threading
import time

import pytest

from workers.middleware import StepTimeLimit, StepTimeout

DEADLINE_S = 10.0  # a test fails after this, never waits on a bare sleep


def interrupted_within(limit: StepTimeLimit, timeout_s: float) -> bool:
    """Arm ``timeout_s`` in this thread and spin until StepTimeout arrives (True) or DEADLINE_S."""
    token = limit.arm(timeout_s)
    try:
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end:
            time.sleep(0.005)
        return False
    except StepTimeout:
        return True
    finally:
        limit.disarm(token)


def test_a_step_past_its_timeout_is_interrupted() -> None:
    assert interrupted_within(StepTimeLimit(), 0.05)


def test_a_shorter_deadline_armed_after_a_longer_one_still_fires() -> None:
    """The timer thread sleeps towards the earliest deadline; a new earlier one must wake it."""
    limit = StepTimeLimit()
    long_armed = threading.Event()
    done = threading.Event()

    def long_step() -> None:
        token = limit.arm(3600)
        long_armed.set()
        done.wait(DEADLINE_S)
        limit.disarm(token)

    other = threading.Thread(target=long_step, daemon=True)
    other.start()
    try:
        assert long_armed.wait(DEADLINE_S)
        assert interrupted_within(limit, 0.05)
    finally:
        done.set()
        other.join(DEADLINE_S)


def test_steps_done_leave_no_deadlines_behind() -> None:
    """Each arm drops the deadlines of steps already done (the timer thread is not woken for them)."""
    limit = StepTimeLimit()
    for _ in range(1000):
        limit.disarm(limit.arm(3600))
    assert len(limit._heap) <= 1 and not limit._armed
    assert interrupted_within(limit, 0.05), "a limit armed after them still fires"


@pytest.mark.parametrize("count", [2, 8])
def test_each_of_several_threads_gets_its_own_timeout(count: int) -> None:
    limit = StepTimeLimit()
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(interrupted_within(limit, 0.05 * (i + 1))))
        for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 2)
    assert results == [True] * count


def test_steps_of_similar_timeouts_do_not_wake_the_timer_thread() -> None:
    """Only a deadline earlier than the timer's own next wake notifies it (a wake per step cost CPU)."""
    limit = StepTimeLimit()
    held = limit.arm(3600)  # starts the timer thread, which then sleeps towards that deadline
    deadline = time.monotonic() + DEADLINE_S
    while limit._wakes_at == math.inf and time.monotonic() < deadline:
        time.sleep(0.001)
    notified: list[int] = []
    real = limit._cond.notify
    limit._cond.notify = lambda n=1: (notified.append(n), real(n))  # type: ignore[method-assign]
    for _ in range(100):
        limit.disarm(limit.arm(3600))
    assert notified == []
    assert interrupted_within(limit, 0.05), "an earlier deadline still wakes it and fires"
    assert notified
    limit.disarm(held)
