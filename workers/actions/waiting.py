"""Built-in actions whose steps wait in the database, holding no worker thread: ``delay`` and
``approval`` return a ``Park``; the engine parks the step and brings it back when due."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from app.actions import ActionContext, Park, StepError, action
from app.timeutil import utcnow


@action("delay")
def delay(ctx: ActionContext, params: Any) -> Any:
    """Wait ``durationMs`` or ``until`` an ISO time; a time already past completes at once."""
    now = ctx.started_at or utcnow()
    due = wait_until(params, now)
    if due <= now:
        return {"delayedMs": 0}
    return Park(until=due)


@action("approval")
def approval(ctx: ActionContext, params: Any) -> Park:
    """Suspend the run until ``POST /runs/:id/resume``; ``timeoutMs`` bounds the wait."""
    timeout = params.get("timeoutMs") if isinstance(params, dict) else None
    valid = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    now = ctx.started_at or utcnow()
    return Park(until=now + timedelta(milliseconds=timeout) if valid else None, suspend=True)


def wait_until(params: Any, now: datetime) -> datetime:
    """When a ``delay`` step is due: ``{"durationMs": n}`` or ``{"until": "2024-01-15T10:30:00Z"}``."""
    if not isinstance(params, dict):
        raise StepError("INVALID_INPUT", "delay needs an object input with durationMs or until")
    if "durationMs" in params:
        duration = params["durationMs"]
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0:
            raise StepError("INVALID_INPUT", "delay durationMs must be a non-negative number")
        return now + timedelta(milliseconds=duration)
    if "until" in params:
        try:
            until = datetime.fromisoformat(str(params["until"]).replace("Z", "+00:00"))
        except ValueError as exc:
            raise StepError(
                "INVALID_INPUT", f"delay until is not an ISO 8601 time: {params['until']!r}"
            ) from exc
        return until if until.tzinfo else until.replace(tzinfo=timezone.utc)
    raise StepError("INVALID_INPUT", "delay needs durationMs or until")
