"""Fan-out: a ``forEach`` step runs its action once per item, at most ``maxParallel`` at a time,
inside the one claimed step (DESIGN §12, "Workflow power").

The items run in a bounded pool of threads of the worker that claimed the step. Each item has its
own retry loop under the step's ``retry`` policy (back-off and Retry-After honoured) and its own
``timeoutMs``; each item attempt is written to the attempt log (``step_attempts.item_index``), so
``GET /runs/:id/logs`` shows them. The step's output is the list of the items' outputs, in order.
The first item that fails for good fails the step (its retries are spent: the step's error is not
retriable); no item starts after that, nor after the run is cancelled; items in flight finish.

The step's lease: the heartbeat caps a lease at ``timeoutMs + LEASE_GRACE`` after the claim was
last *held*; the fan-out holds it again whenever an item makes progress (an attempt starts or ends,
a back-off ticks), so a long forEach keeps its lease while one item stuck past its own limit (one
its worker cannot interrupt) still loses it, as a plain step does.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert

from app import redaction
from app.definition import DEFAULT_MAX_PARALLEL
from app.engine import Claim, Outcome, RetryPolicy
from app.errors import is_transient
from app.timeutil import duration_ms, utcnow
from models import StepAttempt
from models.states import StepStatus

if TYPE_CHECKING:
    from app.services import Services
    from workers.middleware import LeaseHeartbeat

logger = logging.getLogger("baton.worker")
S = StepStatus
# A step's error when its forEach does not render to a list (or has too many items).
FOREACH_ERROR = "FOREACH_ERROR"
# A forEach step's error when the run was cancelled (or timed out) before all its items started.
RUN_ENDED = "RUN_ENDED"
MAX_ITEMS = 10_000  # items of one forEach (each is an attempt-log row and an output entry)
FLUSH_S = 0.5  # how often the driving thread writes finished item attempts to the log
TICK_S = 1.0  # a back-off waits in ticks of this, watching for cancel and holding the lease
WRITE_FOR_S = 120.0  # how long the last write of the log is retried through an outage

# Runs one attempt of one item: (index, attempt, item) -> its outcome; never raises.
Attempt = Callable[[int, int, Any], Outcome]


@dataclass
class Host:
    """What a fan-out needs from the worker running it: the services (the run's cancel flag and the
    attempt log) and the lease heartbeat. Either may be absent (a step run outside a worker)."""

    services: Services | None = None
    leases: LeaseHeartbeat | None = None


def max_parallel(step: dict[str, Any]) -> int:
    return int(step.get("maxParallel") or DEFAULT_MAX_PARALLEL)


def items_error(items: Any) -> dict[str, str] | None:
    """Why a rendered ``forEach`` cannot be fanned out over, or None."""
    if not isinstance(items, list):
        kind = "null" if items is None else type(items).__name__
        kind = {"dict": "object", "str": "string", "bool": "boolean", "int": "number", "float": "number"}.get(
            kind, kind
        )
        return {"code": FOREACH_ERROR, "message": f"forEach must render to a list; it rendered to a {kind}"}
    if len(items) > MAX_ITEMS:
        message = f"forEach rendered {len(items)} items; a step takes at most {MAX_ITEMS}"
        return {"code": FOREACH_ERROR, "message": message}
    return None


class FanOut:
    """One forEach step's items in flight: who runs next, what finished, what the log still needs."""

    def __init__(
        self, claim: Claim, items: list[Any], attempt: Attempt, host: Host, secrets: dict[str, str]
    ) -> None:
        self.claim, self.items, self.attempt, self.host = claim, items, attempt, host
        self.policy = RetryPolicy.of(claim.step)
        self.outputs: list[Any] = [None] * len(items)
        self.failed: tuple[int, int, Outcome] | None = None  # (index, attempts, outcome), the first
        self.cancelled = False
        self.succeeded = 0
        self.secret_forms = redaction.forms(secrets.values()) if secrets else []
        self._lock = threading.Lock()
        self._next = 0
        self._rows: list[dict[str, Any]] = []
        self._progress = 0  # bumped at every attempt's start and end and every back-off tick
        self._stop = threading.Event()

    # -- the driving thread ------------------------------------------------------------------

    def run(self) -> None:
        """Run every item (or until one fails or the run is cancelled); the log is written when
        this returns."""
        workers = min(max_parallel(self.claim.step), len(self.items))
        held = self._progress
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="baton-foreach") as pool:
            # Each thread runs in its own copy of this context: the step's log fields and redaction.
            pending = {pool.submit(contextvars.copy_context().run, self._work) for _ in range(workers)}
            while pending:
                _done, pending = wait(pending, timeout=FLUSH_S, return_when=FIRST_COMPLETED)
                if self._progress != held:
                    held = self._progress
                    self._hold()
                self._flush(final=False)
        self._flush(final=True)

    def _hold(self) -> None:
        if self.host.leases is not None:
            self.host.leases.hold(self.claim)

    def _flush(self, final: bool) -> None:
        """Write the finished item attempts to the attempt log; through an outage the rows wait
        for the next flush, and the last one retries for a while."""
        with self._lock:
            rows, self._rows = self._rows, []
        services = self.host.services
        if not rows or services is None:
            return
        deadline, pause = time.monotonic() + (WRITE_FOR_S if final else 0), 0.1
        while True:
            try:
                with services.db.session() as session:
                    session.execute(insert(StepAttempt.__table__), rows)
                    session.commit()
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    if final:
                        raise
                    with self._lock:
                        self._rows[:0] = rows
                    return
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    # -- the item threads --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            index = self._take()
            if index is None:
                return
            try:
                self._item(index)
            except BaseException as exc:  # a bug here must fail the step, not hang it
                logger.exception("forEach item %s of step %s crashed", index, self.claim.step_id)
                error = {"code": "ACTION_ERROR", "message": f"{type(exc).__name__}: {exc}"}
                self._fail(index, 1, Outcome(S.ERROR, error=error))

    def _take(self) -> int | None:
        """The next item to start, or None: all started, one failed, or the run was cancelled."""
        if self._stopping():
            return None
        with self._lock:
            if self._next >= len(self.items):
                return None
            index, self._next = self._next, self._next + 1
            return index

    def _stopping(self) -> bool:
        if self._stop.is_set():
            return True
        if self._cancel_requested():
            self.cancelled = True
            self._stop.set()
        return self._stop.is_set()

    def _cancel_requested(self) -> bool:
        """The run's cancel flag (set on cancel and on the run's timeout); Redis down: not seen,
        the step's record then finds the run ended."""
        services = self.host.services
        if services is None:
            return False
        try:
            return services.is_cancel_requested(self.claim.run_id)
        except Exception:
            logger.warning("could not read the cancel flag of %s", self.claim.run_id, exc_info=True)
            return False

    def _item(self, index: int) -> None:
        """One item, attempt after attempt under the step's retry policy."""
        number = 1
        while True:
            self._progress += 1
            started = utcnow()
            outcome = self.attempt(index, number, self.items[index])
            outcome.started_at = outcome.started_at or started
            outcome.completed_at = outcome.completed_at or utcnow()
            self._progress += 1
            self._log(index, number, outcome)
            if outcome.status == S.SUCCESS:
                self.outputs[index] = outcome.output
                with self._lock:
                    self.succeeded += 1
                return
            if not outcome.retriable or self.policy.exhausted(number):
                self._fail(index, number, outcome)
                return
            if not self._back_off(self.policy.delay_ms(number, outcome.retry_after_ms)):
                return  # stopped during the back-off: the item is left where it is
            number += 1

    def _back_off(self, delay_ms: int) -> bool:
        """Wait before the item's next attempt; False if the step stops meanwhile."""
        until = time.monotonic() + delay_ms / 1000
        while True:
            if self._stopping():
                return False
            left = until - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, TICK_S))
            self._progress += 1

    def _fail(self, index: int, attempts: int, outcome: Outcome) -> None:
        with self._lock:
            if self.failed is None:
                self.failed = (index, attempts, outcome)
        self._stop.set()

    def _log(self, index: int, number: int, outcome: Outcome) -> None:
        """The attempt's row of the attempt log (redacted as the step's own record is)."""
        step_input, output, error = redaction.step_record(
            self.claim.step.get("action", ""), outcome.input, outcome.output, outcome.error, self.secret_forms
        )
        row = {
            "run_id": self.claim.run_id,
            "step_id": self.claim.step_id,
            "position": self.claim.position,
            "attempt": number,
            "item_index": index,
            "status": outcome.status,
            "input": step_input,
            "output": output,
            "error": error,
            "started_at": outcome.started_at,
            "completed_at": outcome.completed_at,
            "duration_ms": duration_ms(outcome.started_at, outcome.completed_at),
        }
        with self._lock:
            self._rows.append(row)

    # -- the step's outcome ------------------------------------------------------------------

    def outcome(self, started: Any) -> Outcome:
        """The step's outcome: the outputs in order, the first item's failure, or the cancel."""
        step_input = {"forEach": self.items}
        if self.failed is not None:
            index, attempts, failed = self.failed
            error = failed.error or {"code": "STEP_FAILED", "message": "Step failed"}
            tries = f"after {attempts} attempts" if attempts > 1 else "after 1 attempt"
            message = f"forEach item {index} failed {tries}: {error.get('message', '')}"
            # Not retriable: the item's retries are spent (the step's retry policy is the items').
            error = {"code": error.get("code", "STEP_FAILED"), "message": message}
            return Outcome(S.ERROR, input=step_input, error=error, started_at=started)
        if self.cancelled:
            message = (
                f"The run was cancelled or timed out with {self.succeeded} of {len(self.items)} "
                "forEach items done"
            )
            error = {"code": RUN_ENDED, "message": message}
            return Outcome(S.ERROR, input=step_input, error=error, started_at=started)
        return Outcome(S.SUCCESS, input=step_input, output=self.outputs, started_at=started)


def fan_out(
    claim: Claim, items: list[Any], attempt: Attempt, host: Host, secrets: dict[str, str], started: Any
) -> Outcome:
    """Run ``attempt`` over the items (see the module's docstring); the step's outcome."""
    if not items:
        return Outcome(S.SUCCESS, input={"forEach": []}, output=[], started_at=started)
    fan = FanOut(claim, items, attempt, host, secrets)
    fan.run()
    return fan.outcome(started)
