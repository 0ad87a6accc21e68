"""The step actor. Import only after the broker is set (``workers.main`` does both, in order)."""

from __future__ import annotations

import dramatiq

from app.engine import Services
from app.queue import EXECUTE_STEP, STEPS_QUEUE
from workers import executor

_services: Services | None = None


def configure(services: Services) -> None:
    global _services
    _services = services


# The executor enforces each step's own timeout; the message limit only backs it up for
# long inline chains.
@dramatiq.actor(actor_name=EXECUTE_STEP, queue_name=STEPS_QUEUE, time_limit=24 * 3600 * 1000)
def execute_step(run_id: str, step_id: str, attempt: int) -> None:
    """Claim, execute and record a step, then chain the next one inline when it is due now."""
    assert _services is not None, "workers.actors.configure() was not called"
    executor.execute_step(_services, run_id, step_id, attempt)
