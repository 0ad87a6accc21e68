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
