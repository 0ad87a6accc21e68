"""Python actions for the metrics and logging tests (loaded through ``BATON_ACTION_MODULES``).

Their names are used by no other test, so their counters move only with these tests' runs.
"""

from __future__ import annotations

import time
from typing import Any

from workers.actions import ActionContext, StepError, action


@action("test.metrics-flaky")
def flaky(ctx: ActionContext, params: Any) -> dict[str, int]:
    """Fails its first attempt (retriable) and succeeds on the next."""
    if ctx.attempt == 1:
        raise StepError("FLAKY", "first attempts fail", retriable=True)
    return {"attempt": ctx.attempt}


@action("test.metrics-fail")
def fail(ctx: ActionContext, params: Any) -> Any:
    """Always fails, not retried."""
    raise StepError("BROKEN", "this step always fails", retriable=False)


@action("test.metrics-sleep")
def sleep(ctx: ActionContext, params: Any) -> dict[str, float]:
    """A step that outlives its run's timeout."""
    time.sleep(float(params["seconds"]))
    return {"slept": params["seconds"]}


@action("test.metrics-crash")
def crash(ctx: ActionContext, params: Any) -> Any:
    """An action with a bug whose exception message carries the secret it was given."""
    raise RuntimeError(f"could not use token {params['token']}")
