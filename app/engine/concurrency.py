"""Concurrency keys: a workflow's ``concurrency: {"key": "{{ input.customerId }}", "limit": 1}``.

Runs of one key (without ``key``: of the workflow) hold at most ``limit`` slots. Every new run of
such a workflow is inserted ``waiting`` (pending, no step queued) and then admitted in the same
transaction if a slot is free and no earlier run of its key waits: runs start in arrival order, and
the others wait ``pending`` until a slot frees.

A slot is a column of the run's own row (``runs.slot``: waiting, held or NULL), written in the
transaction of the run's own moves: the move that ends a run (completed, failed, cancelled, timed
out, whoever makes it) frees its slot and admits the next waiting run in the same commit, so no
crash of a worker or a scheduler can lose a slot or leave one held. Moves of one key's slots are
serialized by a transaction-scoped advisory lock on the key (SQLite serializes every writer).
This module keeps the slots; ``transitions.admit`` queues the steps of the runs it admits, and
``sweeps.sweep_slots`` reconciles anyway: a slot on a run that has ended is freed, and a key with waiting
runs and free slots admits them (a new version that raised the limit, say).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app import templating
from app.engine.graph import graph
from app.engine.reads import current_step_runs, definition_for
from app.engine.states import RUN_TERMINAL
from app.errors import ValidationError
from models import Run

WAITING, HELD = "waiting", "held"
_MAX_KEY = 200  # a longer rendered key is stored as its SHA-256
_BATCH = 500


def group_of(definition: dict[str, Any], workflow_key: str, run_input: Any) -> str | None:
    """The run's concurrency group (its workflow and rendered key), or None without a limit.
    A key that does not render is the trigger's 400."""
    spec = definition.get("concurrency")
    if spec is None:
        return None
    template = spec.get("key")
    if template is None:
        return f"{workflow_key}:"
    try:
        value = templating.render(template, {"input": run_input}, "concurrency.key")
    except templating.TemplateError as exc:
        raise ValidationError(
            f"concurrency.key could not be rendered: {exc}", details={"concurrency.key": [str(exc)]}
        ) from exc
    key = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(key) > _MAX_KEY:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return f"{workflow_key}:{key}"


def _lock(session: Session, group: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:g, 0))"), {"g": group})


@dataclass(frozen=True)
class Admitted:
    """A waiting run that took a slot: the steps it starts with are to be queued."""

    run_id: str
    company_id: str
    step_ids: list[str]


def admissions(session: Session, group: str) -> list[Admitted]:
    """Waiting runs of ``group`` take the free slots, oldest first (under the key's lock); the
    caller (``transitions.admit``) queues the steps each one starts with."""
    _lock(session, group)
    held = session.execute(
        select(func.count()).select_from(Run).where(Run.concurrency_key == group, Run.slot == HELD)
    ).scalar_one()
    admitted: list[Admitted] = []
    while True:
        oldest = session.execute(
            select(Run.id, Run.company_id, Run.workflow_key, Run.workflow_version)
            .where(Run.concurrency_key == group, Run.slot == WAITING)
            .order_by(Run.created_at, Run.id)
            .limit(1)
        ).one_or_none()
        if oldest is None:
            return admitted
        definition = definition_for(session, oldest.workflow_key, oldest.workflow_version)
        if held >= (definition.get("concurrency") or {}).get("limit", 1):
            return admitted
        _set_slot(session, oldest.id, HELD)
        admitted.append(Admitted(oldest.id, oldest.company_id, startable(session, oldest.id, definition)))
        held += 1


def startable(session: Session, run_id: str, definition: dict[str, Any]) -> list[str]:
    """The run's pending steps whose needs are all met (a new run: its first steps; a restart:
    the steps it re-runs first)."""
    shape = graph(definition)
    return [shape.ids[p] for p in shape.progress(current_step_runs(session, run_id)).ready]


def free(session: Session, run: Run) -> str | None:
    """The run ended: its slot, or its place in the queue, is freed. Its group, to admit into."""
    if run.concurrency_key is None or run.slot is None:
        return None
    _set_slot(session, run.id, None)
    run.slot = None
    return run.concurrency_key


def free_ended(session: Session) -> tuple[int, set[str]]:
    """Reconcile: slots left on runs that ended are freed. How many, and the groups to admit into
    (with every group that has waiting runs)."""
    ended = list(
        session.execute(
            update(Run)
            .where(Run.slot.is_not(None), Run.status.in_(sorted(RUN_TERMINAL)))
            .values(slot=None)
            .returning(Run.concurrency_key)
            .execution_options(synchronize_session=False)
        ).scalars()
    )
    waiting = session.execute(
        select(Run.concurrency_key).where(Run.slot == WAITING).group_by(Run.concurrency_key).limit(_BATCH)
    ).scalars()
    return len(ended), {g for g in (*ended, *waiting) if g is not None}


def _set_slot(session: Session, run_id: str, slot: str | None) -> None:
    session.execute(
        update(Run).where(Run.id == run_id).values(slot=slot).execution_options(synchronize_session=False)
    )
