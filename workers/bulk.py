"""The bulk-action actor: goes through a bulk cancel or retry a chunk at a time (``app.bulk``)."""

from __future__ import annotations

import dramatiq

from app import bulk
from app.queue import StepQueue
from workers.middleware import ProcessServices

# A message works for about bulk.BUDGET_S, then hands over; the limit only backs that up.
TIME_LIMIT_MS = 10 * 60 * 1000


def run_bulk_action(bulk_id: str) -> None:
    """Carry a bulk action on from where it stands (a repeat or a stale message does nothing)."""
    process = ProcessServices.current
    assert process is not None, "the broker has no ProcessServices middleware (see workers.main)"
    bulk.process(process.services, bulk_id)


def register(queue: StepQueue) -> dramatiq.Actor:
    """Declare ``run_bulk_action`` on the steps queue, which every worker consumes."""
    return dramatiq.actor(
        run_bulk_action,
        actor_name=bulk.BULK_ACTOR,
        queue_name=queue.queue_name,
        time_limit=TIME_LIMIT_MS,
        broker=queue.broker,
    )
