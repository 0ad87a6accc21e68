"""The step actor, declared on a broker by ``register`` (``workers.main`` does it once per process)."""

from __future__ import annotations

import dramatiq

from app.queue import EXECUTE_STEP, StepQueue
from workers import bulk, executor
from workers.middleware import ProcessServices

# Each step's own timeout is enforced by StepTimeLimit; the message limit only backs it up for
# long inline chains.
TIME_LIMIT_MS = 24 * 3600 * 1000


def execute_step(run_id: str, step_id: str, attempt: int, company_id: str | None = None) -> None:
    """Claim, execute and record a step, then chain the next one inline when it is due now."""
    process = ProcessServices.current
    assert process is not None, "the broker has no ProcessServices middleware (see workers.main)"
    executor.execute_step(
        process.services, process.leases, process.time_limit, run_id, step_id, attempt, company_id
    )


def register(queue: StepQueue) -> dramatiq.Actor:
    """Declare ``execute_step`` on the queue's broker and steps queue (namespaced on RabbitMQ, so
    it is known only once the broker is built), and the bulk-action actor beside it."""
    bulk.register(queue)
    return dramatiq.actor(
        execute_step,
        actor_name=EXECUTE_STEP,
        queue_name=queue.queue_name,
        time_limit=TIME_LIMIT_MS,
        broker=queue.broker,
    )
