"""The step actor. Import only after the broker is set (``workers.main`` does both, in order)."""

from __future__ import annotations

import dramatiq

from app.queue import EXECUTE_STEP, STEPS_QUEUE
from workers import executor
from workers.middleware import ProcessServices


# Each step's own timeout is enforced by StepTimeLimit; the message limit only backs it up for
# long inline chains.
@dramatiq.actor(actor_name=EXECUTE_STEP, queue_name=STEPS_QUEUE, time_limit=24 * 3600 * 1000)
def execute_step(run_id: str, step_id: str, attempt: int, company_id: str | None = None) -> None:
    """Claim, execute and record a step, then chain the next one inline when it is due now."""
    process = ProcessServices.current
    assert process is not None, "the broker has no ProcessServices middleware (see workers.main)"
    executor.execute_step(
        process.services, process.leases, process.time_limit, run_id, step_id, attempt, company_id
    )
