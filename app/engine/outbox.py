"""Step messages a transaction decides to send deep inside another move, sent once it commits.

Most moves return their messages to the caller, which sends them after its commit. A move made
inside another one has no such caller: a run that ends frees its concurrency slot and admits the
next waiting run in the same transaction (``concurrency``), whichever transition ended it. Those
note their messages on the session; the commit keeps them (a rollback drops them), and the caller
that committed sends them with ``flush``. A message the broker does not take is left to the
lost-message sweep (its step is queued), as every other send is.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

logger = logging.getLogger("baton.engine")
_NOTED = "baton_outbox_noted"
_COMMITTED = "baton_outbox_committed"


def note_send(session: Session, run_id: str, step_id: str, attempt: int, company_id: str) -> None:
    session.info.setdefault(_NOTED, []).append((run_id, step_id, attempt, company_id))


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    noted = session.info.pop(_NOTED, None)
    if noted:
        session.info.setdefault(_COMMITTED, []).extend(noted)


@event.listens_for(Session, "after_soft_rollback")
def _rolled_back(session: Session, _previous: Any) -> None:
    session.info.pop(_NOTED, None)


def flush(services: Any, session: Session) -> int:
    """Send what ``session``'s commits kept; the number sent."""
    count = 0
    for run_id, step_id, attempt, company_id in session.info.pop(_COMMITTED, ()):
        try:
            services.queue.enqueue(run_id, step_id, attempt, 0, company_id)
            count += 1
        except Exception:  # the row is queued: the lost-message sweep sends it
            logger.warning("could not enqueue %s/%s; the sweep sends it", run_id, step_id, exc_info=True)
    return count
