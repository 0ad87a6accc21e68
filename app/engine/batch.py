"""Batch trigger: up to 1,000 runs of one workflow in one transaction, their first steps' messages
sent in one pipeline after the commit, and each item's result (created, replayed, invalid) in
request order. Idempotency is the single trigger's: the same key and input replay its run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import events, metrics
from app.engine import outbox
from app.engine import statements as sql
from app.engine import transitions as move
from app.engine.reads import definition_for, workflow_ref
from app.engine.states import STUCK_AFTER
from app.engine.trigger import (
    IDEMPOTENCY_TTL,
    first_step_row,
    first_steps,
    insert_new_runs,
    new_run,
    request_hash,
)
from app.errors import ValidationError as BatonValidationError
from app.ids import new_id
from app.services import Services
from app.timeutil import utcnow
from models import Run, StepRun
from models.states import StepStatus

logger = logging.getLogger("baton.engine")
MAX_ITEMS = 1000
ITEM_FIELDS = frozenset({"input", "idempotencyKey"})
CREATED, REPLAYED, INVALID = "created", "replayed", "invalid"
# A concurrent request may take one of the batch's keys between our read and our commit: the
# next pass sees it as used. Each pass can lose only to keys committed since the previous one.
_PASSES = 3


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's answer: ``created`` or ``replayed`` with its run, or ``invalid`` with an error."""

    status: str
    run_id: str | None = None
    error: dict[str, str] | None = None

    def view(self) -> dict[str, Any]:
        if self.error is not None:
            return {"status": self.status, "error": self.error}
        return {"status": self.status, "runId": self.run_id}


@dataclass(frozen=True, slots=True)
class _Item:
    index: int
    input: dict[str, Any]
    key: str | None
    fingerprint: str


def _invalid(code: str, message: str) -> ItemResult:
    return ItemResult(INVALID, error={"code": code, "message": message})


def parse_item(index: int, raw: Any, trigger_type: str) -> _Item | ItemResult:
    """An item as the single trigger would take it (body ``input``, ``Idempotency-Key``), or why not."""
    if not isinstance(raw, dict):
        return _invalid("VALIDATION_ERROR", "Item must be a JSON object")
    unknown = sorted(raw.keys() - ITEM_FIELDS)
    if unknown:
        return _invalid("VALIDATION_ERROR", f"Unknown field: {unknown[0]}")
    run_input = raw.get("input", {})
    if not isinstance(run_input, dict):
        return _invalid("VALIDATION_ERROR", "input must be a JSON object")
    key = raw.get("idempotencyKey")
    if key is not None and not (isinstance(key, str) and 1 <= len(key) <= 255 and key.isprintable()):
        return _invalid("VALIDATION_ERROR", "idempotencyKey must be 1 to 255 printable characters")
    fingerprint = request_hash({"input": run_input, "triggerType": trigger_type})
    return _Item(index, run_input, key, fingerprint)


def trigger_batch(
    services: Services, company_id: str, workflow_id: str, raw_items: Sequence[Any], trigger_type: str = "api"
) -> list[ItemResult]:
    """Create the valid, new items' runs in one commit, then send their first steps; results in order."""
    parsed = [parse_item(i, raw, trigger_type) for i, raw in enumerate(raw_items)]
    items = [p for p in parsed if isinstance(p, _Item)]
    for attempt in range(_PASSES):
        try:
            decided, created = _insert(services, company_id, workflow_id, items, trigger_type)
            break
        except IntegrityError:
            if attempt == _PASSES - 1:
                raise
    if created:
        metrics.run_started(workflow_id, len(created))
    _dispatch(services, created)
    return [p if isinstance(p, ItemResult) else decided[p.index] for p in parsed]


def _insert(
    services: Services, company_id: str, workflow_id: str, items: list[_Item], trigger_type: str
) -> tuple[dict[int, ItemResult], list[tuple[str, str, int, str]]]:
    """One transaction: look up the keys, insert the new runs and their steps, note their events."""
    with services.db.session() as session:
        workflow = workflow_ref(session, company_id, workflow_id)
        definition = definition_for(session, workflow.key, workflow.current_version)
        decided, new = _decide(session, workflow.key, items)
        now = utcnow()
        runs = []
        for run_id, item in new:
            try:
                run = new_run(company_id, workflow, definition, item.input, trigger_type, now, run_id)
            except BatonValidationError as exc:  # its concurrency key does not render
                decided[item.index] = _invalid("VALIDATION_ERROR", exc.message)
                continue
            if item.key is not None:
                run.idempotency_key, run.idempotency_hash = item.key, item.fingerprint
            runs.append(run)
        starts = first_steps(definition) if definition.get("concurrency") is None else []
        if runs:
            insert_new_runs(session, runs, definition, now)
            first = [first_step_row(step_id) for step_id in starts]
            for run in runs:
                events.note_created(session, run, first)
            move.admit_new(session, runs, now)
        session.commit()
        outbox.flush(services, session)
    return decided, [(run.id, step_id, 1, company_id) for run in runs for step_id in starts]


def _decide(
    session: Session, workflow_key: str, items: list[_Item]
) -> tuple[dict[int, ItemResult], list[tuple[str, _Item]]]:
    """Each item's fate: a replay or a conflict of a key used within 24 h (or earlier in the batch),
    else a new run id. Expired keys are released, as the single trigger does."""
    used: dict[str, tuple[str, str | None]] = {}
    keys = {item.key for item in items if item.key}
    if keys:
        rows = session.execute(
            select(Run.id, Run.idempotency_key, Run.idempotency_hash, Run.created_at).where(
                Run.workflow_key == workflow_key, Run.idempotency_key.in_(keys)
            )
        ).all()
        cutoff = utcnow() - IDEMPOTENCY_TTL
        expired = [row.id for row in rows if row.created_at < cutoff]
        if expired:
            session.execute(update(Run).where(Run.id.in_(expired)).values(idempotency_key=None))
        used = {r.idempotency_key: (r.id, r.idempotency_hash) for r in rows if r.created_at >= cutoff}
    decided: dict[int, ItemResult] = {}
    new: list[tuple[str, _Item]] = []
    for item in items:
        if item.key is not None and item.key in used:
            run_id, fingerprint = used[item.key]
            decided[item.index] = (
                ItemResult(REPLAYED, run_id)
                if fingerprint == item.fingerprint
                else _invalid("CONFLICT", "idempotencyKey was already used with a different input")
            )
            continue
        run_id = new_id("run")
        if item.key is not None:
            used[item.key] = (run_id, item.fingerprint)
        new.append((run_id, item))
        decided[item.index] = ItemResult(CREATED, run_id)
    return decided, new


def _dispatch(services: Services, created: list[tuple[str, str, int, str]]) -> None:
    """Send the committed first steps; any the broker did not take are left to the sweep, backdated
    so its first pass that reaches the broker sends them."""
    if not created:
        return
    sent = services.queue.enqueue_many(created)
    unsent = [run_id for (run_id, *_), ok in zip(created, sent, strict=True) if not ok]
    if not unsent:
        return
    try:
        with services.db.session() as session:
            session.execute(
                sql.update_steps()
                .where(
                    StepRun.run_id.in_(unsent),
                    StepRun.position == 0,
                    StepRun.attempt == 1,
                    StepRun.status == StepStatus.QUEUED,
                )
                .values(queued_at=utcnow() - STUCK_AFTER)
            )
            session.commit()
    except Exception:  # the sweep still finds them, STUCK_AFTER later
        logger.warning("could not mark %d batch-triggered step(s) unsent", len(unsent), exc_info=True)
