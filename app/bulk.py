"""Bulk actions: cancel or retry many runs, chosen by a filter or by id, in the background.

The request snapshots the runs it selects into ``bulk_action_runs`` (one INSERT … SELECT, in the
commit that creates the action), so the action's set of runs is fixed when it is accepted: runs
created later, or that change status later, are not added. A ``run_bulk_action`` message then goes
through the runs in order, a chunk at a time, committing each chunk's outcomes with the counters.

Only the holder of an unexpired lease goes through an action's runs. A message that stops (its
worker died, the broker lost it, the API died before sending it) leaves the action unmoved; the
scheduler's sweep sends it again. Going through a run twice acts once: a retry's Idempotency-Key
is the action's id and the run's (the engine returns the run it made the first time), and a run
found already cancelled counts as cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dramatiq import Message
from sqlalchemy import ColumnElement, Select, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import engine, metrics
from app.engine.states import RUN_CANCELLABLE, RUN_RETRIABLE, STUCK_AFTER
from app.engine.trigger import IDEMPOTENCY_TTL
from app.errors import BatonError, Conflict, NotFound, ValidationError, is_transient
from app.ids import new_id
from app.services import Services
from app.timeutil import utcnow
from models import BulkAction, BulkActionRun, BulkItemState, BulkKind, BulkStatus, Run, RunStatus

logger = logging.getLogger("baton.bulk")

BULK_ACTOR = "run_bulk_action"
ELIGIBLE: dict[BulkKind, frozenset[RunStatus]] = {
    BulkKind.CANCEL: RUN_CANCELLABLE,
    BulkKind.RETRY: RUN_RETRIABLE,
}
MAX_RUNS = 100_000  # runs one action may select (a wider filter is a 400: narrow it)
MAX_RUN_IDS = 1_000  # ids one request may name
SAMPLE = 10  # ids a dry run shows
CHUNK = 50  # runs whose outcomes are committed together
LANES = 4  # runs of a chunk acted on at once
BUDGET_S = 5.0  # then the message hands over to a new one, so no worker thread is held for long
LEASE = timedelta(seconds=60)  # renewed at every chunk
STALLED_AFTER = STUCK_AFTER  # an action that has not moved for this long is sent again
STOPPED = {"code": "INTERNAL_ERROR", "message": "The bulk action stopped on an internal error"}


@dataclass(frozen=True)
class Selection:
    """Which runs an action takes: a filter or ids, always within the company and the statuses the
    action applies to (cancel: pending, running, suspended; retry: failed, timeout)."""

    kind: BulkKind
    workflow_id: str | None = None
    status: str | None = None
    trigger_type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    run_ids: tuple[str, ...] | None = None
    workflow_version: str = "original"  # retry: the original run's version, or the latest

    def __post_init__(self) -> None:
        if self.status is not None and RunStatus(self.status) not in ELIGIBLE[self.kind]:
            allowed = ", ".join(sorted(ELIGIBLE[self.kind]))
            raise ValidationError(
                f"Invalid filter.status: a bulk {self.kind} applies to {allowed} runs",
                details={"filter.status": [f"Must be one of: {allowed}."]},
            )

    def conditions(self, company_id: str) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = [Run.company_id == company_id]
        if self.status is not None:
            where.append(Run.status == RunStatus(self.status))
        else:
            where.append(Run.status.in_(sorted(ELIGIBLE[self.kind])))
        if self.run_ids is not None:
            where.append(Run.id.in_(self.run_ids))
        if self.workflow_id is not None:
            where.append(Run.workflow_id == self.workflow_id)
        if self.trigger_type is not None:
            where.append(Run.trigger_type == self.trigger_type)
        if self.created_after is not None:
            where.append(Run.created_at >= self.created_after)
        if self.created_before is not None:
            where.append(Run.created_at < self.created_before)
        return where

    def ordered(self, company_id: str, *columns: Any) -> Select[Any]:
        """The selected runs, oldest first: the order the action goes through them."""
        return select(*columns).where(*self.conditions(company_id)).order_by(Run.created_at, Run.id)


def preview(services: Services, company_id: str, selection: Selection) -> tuple[int, list[str]]:
    """The dry run: how many runs the action would take, and the first of them."""
    with services.db.session() as session:
        count = session.execute(
            select(func.count()).select_from(Run).where(*selection.conditions(company_id))
        ).scalar_one()
        sample = list(session.execute(selection.ordered(company_id, Run.id).limit(SAMPLE)).scalars())
    return count, sample


def create(
    services: Services,
    company_id: str,
    selection: Selection,
    request: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    fingerprint: str = "",
) -> tuple[BulkAction, bool]:
    """Accept an action: its runs are selected and committed with it, then its message is sent.

    Returns the action and whether it was created (False: the Idempotency-Key's earlier action).
    """
    with services.db.session() as session:
        if idempotency_key:
            existing = _idempotent(session, company_id, idempotency_key, fingerprint)
            if existing is not None:
                return existing, False
        now = utcnow()
        bulk = BulkAction(
            id=new_id("bulk"),
            company_id=company_id,
            action=selection.kind,
            status=BulkStatus.RUNNING,
            request=request,
            total=0,
            done=0,
            failed=0,
            next_position=0,
            created_at=now,
            updated_at=now,
            idempotency_key=idempotency_key,
            idempotency_hash=fingerprint if idempotency_key else None,
        )
        session.add(bulk)
        try:
            session.flush()
            total = _snapshot(session, bulk.id, company_id, selection)
            if total > MAX_RUNS:
                session.rollback()
                raise ValidationError(
                    f"The selection holds more than {MAX_RUNS} runs; narrow the filter "
                    "(a dry run counts them)",
                    details={"filter": [f"Selects more than {MAX_RUNS} runs."]},
                )
            bulk.total = total
            if total == 0:
                bulk.status, bulk.completed_at = BulkStatus.COMPLETED, now
            session.commit()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key made its action first.
            session.rollback()
            if not idempotency_key:
                raise
            existing = _idempotent(session, company_id, idempotency_key, fingerprint)
            if existing is None:
                raise
            return existing, False
    if bulk.total:
        send_or_leave_to_sweep(services, bulk.id)
    return bulk, True


def _snapshot(session: Session, bulk_id: str, company_id: str, selection: Selection) -> int:
    """Copy the selected runs' ids, numbered in order, into bulk_action_runs (one statement)."""
    position = func.row_number().over(order_by=(Run.created_at, Run.id)) - 1
    source = selection.ordered(
        company_id, literal(bulk_id), position, Run.id, literal(BulkItemState.PENDING.value)
    ).limit(MAX_RUNS + 1)
    columns = ["bulk_action_id", "position", "run_id", "state"]
    # Core, not the ORM's bulk insert; SQLAlchemy keeps an INSERT's row count only when asked.
    statement = insert(BulkActionRun.__table__).from_select(columns, source)
    result = session.connection().execute(statement.execution_options(preserve_rowcount=True))
    return int(result.rowcount)


def _idempotent(session: Session, company_id: str, key: str, fingerprint: str) -> BulkAction | None:
    """The action an Idempotency-Key already made (24 h), or None; another request's key is 409."""
    existing = session.execute(
        select(BulkAction).where(BulkAction.company_id == company_id, BulkAction.idempotency_key == key)
    ).scalar_one_or_none()
    if existing is None:
        return None
    if existing.created_at < utcnow() - IDEMPOTENCY_TTL:
        # Expired: the key is free again for this request.
        session.execute(update(BulkAction).where(BulkAction.id == existing.id).values(idempotency_key=None))
        session.flush()
        return None
    if existing.idempotency_hash != fingerprint:
        raise Conflict("Idempotency-Key was already used with a different request body")
    return existing


def get(services: Services, company_id: str, bulk_id: str) -> BulkAction:
    """The company's bulk action, or 404 (another company's too)."""
    with services.db.session() as session:
        bulk = session.get(BulkAction, bulk_id)
    if bulk is None or bulk.company_id != company_id:
        raise NotFound("Bulk action not found")
    return bulk


def items(services: Services, bulk_id: str) -> list[BulkActionRun]:
    """Every run of an action with its outcome, in the order the action takes them."""
    with services.db.session() as session:
        return list(
            session.execute(
                select(BulkActionRun)
                .where(BulkActionRun.bulk_action_id == bulk_id)
                .order_by(BulkActionRun.position)
            ).scalars()
        )


# --------------------------------------------------------------------------- the message


def send(services: Services, bulk_id: str) -> None:
    """Enqueue ``run_bulk_action(bulk_id)`` on the steps queue (every worker consumes it)."""
    queue = services.queue
    message = Message(
        queue_name=queue.queue_name, actor_name=BULK_ACTOR, args=(bulk_id,), kwargs={}, options={}
    )
    queue.broker.enqueue(message)


def send_or_leave_to_sweep(services: Services, bulk_id: str) -> bool:
    """The action is committed; if the broker does not take its message, the sweep sends it (at
    its next pass: the action is marked as stalled)."""
    try:
        send(services, bulk_id)
        return True
    except Exception:  # any broker failure: the row is the source of truth
        logger.warning("could not enqueue bulk action %s; the sweep will send it", bulk_id, exc_info=True)
    try:
        with services.db.session() as session:
            session.execute(
                update(BulkAction)
                .where(BulkAction.id == bulk_id)
                .values(updated_at=utcnow() - STALLED_AFTER - timedelta(seconds=1))
            )
            session.commit()
    except Exception:  # then the sweep finds it STALLED_AFTER later
        logger.warning("could not mark bulk action %s unsent", bulk_id, exc_info=True)
    return False


@dataclass(frozen=True)
class _Held:
    """What the lease holder needs of its action."""

    id: str
    company_id: str
    kind: BulkKind
    request: dict[str, Any]
    token: str
    next_position: int

    @property
    def workflow_version(self) -> str:
        return str(self.request.get("workflowVersion") or "original")


@dataclass
class _Outcome:
    position: int
    state: BulkItemState
    result_run_id: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Progress:
    """What one message did (for tests and logs)."""

    acted: int = 0
    finished: bool = False
    handed_over: bool = False


def process(services: Services, bulk_id: str, *, budget_s: float = BUDGET_S, chunk: int = CHUNK) -> Progress:
    """Go through the action's runs from where it stands, for about ``budget_s``, then hand over to
    a new message; complete it after its last run. Drops the message when another holds the lease."""
    progress = Progress()
    held = _claim(services, bulk_id)
    if held is None:
        return progress
    deadline = time.monotonic() + budget_s
    try:
        while True:
            batch = _next_items(services, held, chunk)
            if not batch:
                progress.finished = _finish(services, held)
                return progress
            outcomes, trouble = _act_all(services, held, batch)
            if outcomes and not _record(services, held, outcomes):
                return progress  # the lease was lost to another message, which carries on
            if trouble is not None:
                raise trouble
            progress.acted += len(outcomes)
            held = _Held(
                held.id, held.company_id, held.kind, held.request, held.token, outcomes[-1].position + 1
            )
            if time.monotonic() >= deadline:
                break
    except Exception as exc:
        if is_transient(exc):
            _release(services, held)  # best effort; the lease expires anyway
            raise  # redelivered with a back-off (the broker's Retries middleware)
        logger.exception("bulk action %s stopped", bulk_id)
        _fail(services, held, STOPPED)
        return progress
    _release(services, held)
    send_or_leave_to_sweep(services, held.id)
    progress.handed_over = True
    return progress


def _claim(services: Services, bulk_id: str) -> _Held | None:
    token = uuid.uuid4().hex
    now = utcnow()
    with services.db.session() as session:
        result = session.execute(
            update(BulkAction)
            .where(
                BulkAction.id == bulk_id,
                BulkAction.status == BulkStatus.RUNNING,
                or_(BulkAction.lease_expires_at.is_(None), BulkAction.lease_expires_at < now),
            )
            .values(lease_token=token, lease_expires_at=now + LEASE, updated_at=now)
        )
        if result.rowcount != 1:
            session.rollback()
            return None
        row = session.execute(
            select(
                BulkAction.company_id, BulkAction.action, BulkAction.request, BulkAction.next_position
            ).where(BulkAction.id == bulk_id)
        ).one()
        session.commit()
    return _Held(bulk_id, row.company_id, BulkKind(row.action), row.request or {}, token, row.next_position)


def _next_items(services: Services, held: _Held, chunk: int) -> list[BulkActionRun]:
    with services.db.session() as session:
        return list(
            session.execute(
                select(BulkActionRun)
                .where(
                    BulkActionRun.bulk_action_id == held.id,
                    BulkActionRun.position >= held.next_position,
                )
                .order_by(BulkActionRun.position)
                .limit(chunk)
            ).scalars()
        )


_lanes: ThreadPoolExecutor | None = None
_lanes_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's bulk lanes: long-lived threads, so each keeps its broker connection."""
    global _lanes
    with _lanes_lock:
        if _lanes is None:
            _lanes = ThreadPoolExecutor(LANES, thread_name_prefix="baton-bulk")
        return _lanes


def _act_all(
    services: Services, held: _Held, batch: list[BulkActionRun]
) -> tuple[list[_Outcome], Exception | None]:
    """The chunk's runs, ``LANES`` at a time (a retry mostly waits on the database). Returns the
    outcomes of the runs before the first that met an outage, and that outage: the runs after it
    are gone through again by the next message (acting once, as any repeat)."""
    if LANES <= 1 or len(batch) == 1:
        results: list[_Outcome] = []
        for item in batch:
            try:
                results.append(_act(services, held, item))
            except Exception as exc:  # transient: ``_act`` turns every other failure into an outcome
                return results, exc
        return results, None
    futures = [_pool().submit(_act, services, held, item) for item in batch]
    outcomes: list[_Outcome] = []
    trouble: Exception | None = None
    for future in futures:  # every one awaited: none may still be acting when the chunk is recorded
        try:
            outcome = future.result()
        except Exception as exc:
            trouble = trouble or exc
            continue
        if trouble is None:
            outcomes.append(outcome)
    return outcomes, trouble


def _act(services: Services, held: _Held, item: BulkActionRun) -> _Outcome:
    """Cancel or retry one run through the engine's own operations; a refusal is the run's failure."""
    try:
        if held.kind == BulkKind.RETRY:
            plan = engine.plan_restart(
                services, held.company_id, item.run_id, mode="retry", version_choice=held.workflow_version
            )
            run, _created = engine.start_restart(services, plan, f"{held.id}:{item.run_id}")
            return _Outcome(item.position, BulkItemState.DONE, result_run_id=run.id)
        engine.cancel_run(services, held.company_id, item.run_id)
        return _Outcome(item.position, BulkItemState.DONE)
    except BatonError as exc:
        if held.kind == BulkKind.CANCEL and _status_of(services, item.run_id) == RunStatus.CANCELLED:
            # Cancelled since it was selected (by this action's earlier message, or by someone else).
            return _Outcome(item.position, BulkItemState.DONE)
        return _Outcome(item.position, BulkItemState.FAILED, error={"code": exc.code, "message": exc.message})
    except Exception as exc:
        if is_transient(exc):
            raise
        logger.exception("bulk action %s: %s of %s failed", held.id, held.kind, item.run_id)
        error = {"code": "INTERNAL_ERROR", "message": f"Could not {held.kind} this run"}
        return _Outcome(item.position, BulkItemState.FAILED, error=error)


def _status_of(services: Services, run_id: str) -> RunStatus | None:
    with services.db.session() as session:
        return session.execute(select(Run.status).where(Run.id == run_id)).scalar_one_or_none()


def _record(services: Services, held: _Held, outcomes: list[_Outcome]) -> bool:
    """The chunk's outcomes and the counters in one commit, if the lease is still ours."""
    now = utcnow()
    done = sum(1 for o in outcomes if o.state == BulkItemState.DONE)
    with services.db.session() as session:
        moved = session.execute(
            update(BulkAction)
            .where(
                BulkAction.id == held.id,
                BulkAction.lease_token == held.token,
                BulkAction.status == BulkStatus.RUNNING,
            )
            .values(
                done=BulkAction.done + done,
                failed=BulkAction.failed + (len(outcomes) - done),
                next_position=outcomes[-1].position + 1,
                updated_at=now,
                lease_expires_at=now + LEASE,
            )
        )
        if moved.rowcount != 1:
            session.rollback()
            return False
        for outcome in outcomes:
            session.execute(
                update(BulkActionRun)
                .where(
                    BulkActionRun.bulk_action_id == held.id,
                    BulkActionRun.position == outcome.position,
                    BulkActionRun.state == BulkItemState.PENDING,
                )
                .values(state=outcome.state, result_run_id=outcome.result_run_id, error=outcome.error)
            )
        session.commit()
    return True


def _end(services: Services, held: _Held, status: BulkStatus, error: dict[str, Any] | None = None) -> bool:
    now = utcnow()
    with services.db.session() as session:
        result = session.execute(
            update(BulkAction)
            .where(BulkAction.id == held.id, BulkAction.lease_token == held.token)
            .values(
                status=status,
                error=error,
                completed_at=now,
                updated_at=now,
                lease_token=None,
                lease_expires_at=None,
            )
        )
        session.commit()
    return result.rowcount == 1


def _finish(services: Services, held: _Held) -> bool:
    finished = _end(services, held, BulkStatus.COMPLETED)
    if finished:
        logger.info("bulk action %s completed", held.id)
    return finished


def _fail(services: Services, held: _Held, error: dict[str, Any]) -> None:
    try:
        _end(services, held, BulkStatus.FAILED, error)
    except Exception:
        logger.warning("could not mark bulk action %s failed", held.id, exc_info=True)


def _release(services: Services, held: _Held) -> None:
    """Give the lease up so the next message (or the sweep's) may carry on at once."""
    try:
        with services.db.session() as session:
            session.execute(
                update(BulkAction)
                .where(BulkAction.id == held.id, BulkAction.lease_token == held.token)
                .values(lease_token=None, lease_expires_at=None)
            )
            session.commit()
    except Exception:
        logger.warning("could not release bulk action %s", held.id, exc_info=True)


# --------------------------------------------------------------------------- the sweep


def sweep(services: Services, now: datetime | None = None, limit: int = 100) -> int:
    """Send again the running actions that stopped moving and that no live lease holds."""
    now = now or utcnow()
    stalled = (
        BulkAction.status == BulkStatus.RUNNING,
        BulkAction.updated_at < now - STALLED_AFTER,
        or_(BulkAction.lease_expires_at.is_(None), BulkAction.lease_expires_at < now),
    )
    resend = []
    with services.db.session() as session:
        ids = list(session.execute(select(BulkAction.id).where(*stalled).limit(limit)).scalars())
        for bulk_id in ids:
            # Moved on by this sweep, so the next pass waits STALLED_AFTER again before re-sending.
            result = session.execute(
                update(BulkAction).where(BulkAction.id == bulk_id, *stalled).values(updated_at=now)
            )
            if result.rowcount == 1:
                resend.append(bulk_id)
        session.commit()
    for bulk_id in resend:
        try:
            send(services, bulk_id)
        except Exception:
            logger.warning("could not re-send bulk action %s", bulk_id, exc_info=True)
    if resend:
        logger.info("re-sent %d stalled bulk action(s)", len(resend))
    metrics.swept({"bulk_action_stalled": len(resend)})
    return len(resend)
