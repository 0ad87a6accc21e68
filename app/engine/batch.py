"""Batch trigger: up to 1,000 runs of one workflow in one transaction, their first steps' messages
sent in one pipeline after the commit, and each item's result (created, replayed, invalid) in
request order. Idempotency is the single trigger's: the same key and input replay its run."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import events
from app.engine import statements as sql
from app.engine.reads import definition_for, get_workflow
from app.engine.states import STUCK_AFTER
from app.engine.trigger import IDEMPOTENCY_TTL, request_hash
from app.ids import new_id
from app.services import Services
from app.timeutil import utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus

logger = logging.getLogger("baton.engine")
MAX_ITEMS = 1000
ITEM_FIELDS = frozenset({"input", "idempotencyKey"})
CREATED, REPLAYED, INVALID = "created", "replayed", "invalid"
# A concurrent request may take one of the batch's keys between our read and our commit: the
# next pass sees it as used. Each pass can lose only to keys committed since the previous one.
_PASSES = 3

# One statement per table, whatever the batch size: the per-run values travel as arrays.
_INSERT_RUNS = text(
    """
    INSERT INTO runs (id, company_id, workflow_key, workflow_id, workflow_version, status,
                      trigger_type, input, created_at, deadline_at, idempotency_key, idempotency_hash)
    SELECT t.id, :company_id, :workflow_key, :workflow_id, :version, :status, :trigger_type,
           CAST(t.input AS jsonb), :now, :deadline, t.ikey, t.ihash
    FROM unnest(CAST(:ids AS text[]), CAST(:inputs AS text[]), CAST(:ikeys AS text[]),
                CAST(:ihashes AS text[])) AS t(id, input, ikey, ihash)
    """
)
_INSERT_STEPS = text(
    """
    INSERT INTO step_runs (run_id, step_id, position, status, attempt, queued_at, reused)
    SELECT r.id, s.step_id, s.position,
           CASE WHEN s.position = 0 THEN :queued ELSE :pending END,
           CASE WHEN s.position = 0 THEN 1 ELSE 0 END,
           CASE WHEN s.position = 0 THEN CAST(:now AS timestamptz) END,
           false
    FROM unnest(CAST(:ids AS text[])) AS r(id)
    CROSS JOIN unnest(CAST(:step_ids AS text[]), CAST(:positions AS int[])) AS s(step_id, position)
    """
)


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
    _dispatch(services, created)
    return [p if isinstance(p, ItemResult) else decided[p.index] for p in parsed]


def _insert(
    services: Services, company_id: str, workflow_id: str, items: list[_Item], trigger_type: str
) -> tuple[dict[int, ItemResult], list[tuple[str, str, int, str]]]:
    """One transaction: look up the keys, insert the new runs and their steps, note their events."""
    with services.db.session() as session:
        workflow = get_workflow(session, company_id, workflow_id)
        definition = definition_for(session, workflow.key, workflow.current_version)
        decided, new = _decide(session, workflow.key, items)
        now = utcnow()
        timeout = definition.get("timeoutMs")
        runs = [
            Run(
                id=run_id,
                company_id=company_id,
                workflow_key=workflow.key,
                workflow_id=workflow.id,
                workflow_version=workflow.current_version,
                status=RunStatus.PENDING,
                trigger_type=trigger_type,
                input=item.input,
                created_at=now,
                deadline_at=now + timedelta(milliseconds=timeout) if timeout else None,
                idempotency_key=item.key,
                idempotency_hash=item.fingerprint if item.key else None,
            )
            for run_id, item in new
        ]
        if runs:
            step_ids = [step["id"] for step in definition["steps"]]
            _insert_rows(session, runs, step_ids, now)
            first = {"step_id": step_ids[0], "status": StepStatus.QUEUED, "attempt": 1}
            for run in runs:
                events.note_created(session, run, [first])
        session.commit()
    first_step = definition["steps"][0]["id"]
    return decided, [(run.id, first_step, 1, company_id) for run in runs]


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


def _insert_rows(session: Session, runs: list[Run], step_ids: list[str], now: datetime) -> None:
    """The runs in one statement and all their steps in another (arrays on PostgreSQL)."""
    if session.get_bind().dialect.name != "postgresql":
        _insert_rows_portable(session, runs, step_ids, now)
        return
    first = runs[0]
    session.execute(
        _INSERT_RUNS,
        {
            "company_id": first.company_id,
            "workflow_key": first.workflow_key,
            "workflow_id": first.workflow_id,
            "version": first.workflow_version,
            "status": RunStatus.PENDING.value,
            "trigger_type": first.trigger_type,
            "now": now,
            "deadline": first.deadline_at,
            "ids": [run.id for run in runs],
            "inputs": [json.dumps(run.input) for run in runs],
            "ikeys": [run.idempotency_key for run in runs],
            "ihashes": [run.idempotency_hash for run in runs],
        },
    )
    session.execute(
        _INSERT_STEPS,
        {
            "queued": StepStatus.QUEUED.value,
            "pending": StepStatus.PENDING.value,
            "now": now,
            "ids": [run.id for run in runs],
            "step_ids": step_ids,
            "positions": list(range(len(step_ids))),
        },
    )


def _insert_rows_portable(session: Session, runs: list[Run], step_ids: list[str], now: datetime) -> None:
    """SQLite (the embedded default): the same rows through executemany."""
    columns = [c.key for c in Run.__table__.columns]
    session.execute(insert(Run), [{name: getattr(run, name) for name in columns} for run in runs])
    steps = [
        {
            "run_id": run.id,
            "step_id": step_id,
            "position": position,
            "status": StepStatus.QUEUED if position == 0 else StepStatus.PENDING,
            "attempt": 1 if position == 0 else 0,
            "queued_at": now if position == 0 else None,
            "reused": False,
        }
        for run in runs
        for position, step_id in enumerate(step_ids)
    ]
    session.execute(insert(StepRun), steps)


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
