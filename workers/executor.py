"""Execute a step, record it, and keep going inline while the next step is due now (DESIGN §11)."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from datetime import timedelta
from typing import Any

from dramatiq.threading import raise_thread_exception

from app import engine, templating
from app.engine import Claim, Services, StepOutcome
from app.timeutil import duration_ms, utcnow
from workers import actions
from workers.actions import builtin

logger = logging.getLogger("baton.worker")


class StepTimeout(Exception):
    """Raised asynchronously into a worker thread whose step ran past its ``timeoutMs``."""


class Watchdog:
    """One thread that interrupts steps running past their deadline (cheaper than a timer each)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int]] = []
        self._armed: dict[int, int] = {}  # token -> thread id
        self._tokens = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float) -> int:
        token = next(self._tokens)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="baton-watchdog", daemon=True)
                self._thread.start()
            self._armed[token] = threading.get_ident()
            heapq.heappush(self._heap, (time.monotonic() + timeout_s, token, threading.get_ident()))
            self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][1] not in self._armed:
                    if self._heap and self._heap[0][1] not in self._armed:
                        heapq.heappop(self._heap)
                        continue
                    self._cond.wait()
                deadline, token, thread_id = self._heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                if self._armed.pop(token, None) is not None:
                    raise_thread_exception(thread_id, StepTimeout)


watchdog = Watchdog()


def run_action(claim: Claim, step_input: Any) -> Any:
    """Call the step's action under its timeout; errors come back as ``StepError``."""
    step = claim.step
    func = actions.get(step["action"])
    if func is None:
        raise actions.StepError("UNKNOWN_ACTION", f"Unknown action {step['action']!r}")
    timeout_s = step["timeoutMs"] / 1000
    ctx = actions.ActionContext(claim.run_id, claim.step_id, claim.attempt, timeout_s)
    try:
        token = watchdog.arm(timeout_s)
        try:
            return func(ctx, step_input)
        finally:
            watchdog.disarm(token)
    except StepTimeout:
        raise actions.StepError(
            "STEP_TIMEOUT",
            f"Step {claim.step_id!r} exceeded its timeout of {step['timeoutMs']} ms",
            retriable=True,
        ) from None


def execute(claim: Claim) -> StepOutcome:
    """Render, evaluate ``if``, run the action; never raises for a step failure."""
    started = utcnow()
    step = claim.step
    if claim.waited_since is not None:
        # A delay that is now due: it completes without running anything.
        return StepOutcome(
            "success",
            input=claim.resumed_input,
            output={"delayedMs": duration_ms(claim.waited_since, started)},
            started_at=claim.waited_since,
            completed_at=started,
        )
    context = claim.template_context()
    try:
        if "if" in step and not templating.truthy(step["if"], context):
            return StepOutcome("skipped", started_at=started, completed_at=utcnow())
        step_input = templating.render(step.get("input", {}), context, "input")
    except templating.TemplateError as exc:
        return StepOutcome(
            "error",
            error={"code": "TEMPLATE_ERROR", "message": str(exc)},
            started_at=started,
            completed_at=utcnow(),
        )
    if step["action"] in ("delay", "approval"):
        return _park(claim, step_input, started)
    try:
        output = run_action(claim, step_input)
        output = templating.to_json(output)
    except actions.StepError as exc:
        return StepOutcome(
            "error",
            input=step_input,
            error=exc.to_dict(),
            retriable=exc.retriable,
            retry_after_ms=exc.retry_after_ms,
            started_at=started,
            completed_at=utcnow(),
        )
    except Exception as exc:  # an action's bug must fail the step, not the worker
        logger.exception("action %s of step %s crashed", step["action"], claim.step_id)
        return StepOutcome(
            "error",
            input=step_input,
            error={"code": "ACTION_ERROR", "message": f"{type(exc).__name__}: {exc}"},
            retriable=True,
            started_at=started,
            completed_at=utcnow(),
        )
    return StepOutcome("success", input=step_input, output=output, started_at=started, completed_at=utcnow())


def _park(claim: Claim, step_input: Any, started: Any) -> StepOutcome:
    """Delays and approvals wait in the database, not in a worker thread."""
    if claim.step["action"] == "approval":
        timeout = step_input.get("timeoutMs") if isinstance(step_input, dict) else None
        due = (
            started + timedelta(milliseconds=timeout)
            if isinstance(timeout, (int, float)) and timeout > 0
            else None
        )
        return StepOutcome("waiting", input=step_input, started_at=started, wait_until=due, suspend=True)
    try:
        due = builtin.wait_until(step_input, started)
    except actions.StepError as exc:
        return StepOutcome(
            "error", input=step_input, error=exc.to_dict(), started_at=started, completed_at=utcnow()
        )
    if due <= started:
        return StepOutcome(
            "success", input=step_input, output={"delayedMs": 0}, started_at=started, completed_at=utcnow()
        )
    return StepOutcome("waiting", input=step_input, started_at=started, wait_until=due)


def execute_step(services: Services, run_id: str, step_id: str, attempt: int) -> None:
    """Handle one ``execute_step`` message: claim, execute, record, and chain inline."""
    if services.is_cancel_requested(run_id):
        return
    claim = engine.claim_step(services, run_id, step_id, attempt)
    while claim is not None:
        outcome = execute(claim)
        nxt = engine.record_result(services, claim, outcome)
        claim = nxt.claim
        if claim is not None and services.is_cancel_requested(run_id):
            engine.release_claim(services, claim)
            return
