"""Python actions for the worker-process tests (loaded through ``BATON_ACTION_MODULES``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from workers.actions import ActionContext, action


@action("test.kill-own-worker")
def kill_own_worker(ctx: ActionContext, params: Any) -> Any:
    """The worker process executing this step dies at once (as on an OOM kill)."""
    os.kill(os.getpid(), signal.SIGKILL)


@action("test.sleep")
def sleep(ctx: ActionContext, params: Any) -> dict[str, float]:
    """A slow step whose worker stays alive."""
    time.sleep(float(params["seconds"]))
    return {"slept": params["seconds"]}


@action("test.kill-first-attempt")
def kill_first_attempt(ctx: ActionContext, params: Any) -> dict[str, int]:
    """With ``{"kill": true}``, the first attempt's worker process dies at once; later attempts
    (and runs without it) succeed."""
    if params.get("kill") and ctx.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"attempt": ctx.attempt}
