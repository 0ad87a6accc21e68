"""Reads shared by the API, the CLI and the engine: runs, steps, attempts, workflow versions."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.engine import statements as sql
from app.engine.states import STEP_FINISHED
from app.errors import NotFound
from app.ids import WORKFLOW_ID
from models import Run, StepAttempt, StepRun, Workflow, WorkflowVersion

_definitions: dict[tuple[str, int], dict[str, Any]] = {}
_definitions_lock = threading.Lock()


def definition_for(session: Session, workflow_key: str, version: int) -> dict[str, Any]:
    """Versions are immutable, so each process caches them forever."""
    key = (workflow_key, version)
    cached = _definitions.get(key)
    if cached is not None:
        return cached
    definition = session.execute(
        select(WorkflowVersion.definition).where(
            WorkflowVersion.workflow_key == workflow_key, WorkflowVersion.version == version
        )
    ).scalar_one()
    with _definitions_lock:
        _definitions[key] = definition
    return definition


def cached_definition(workflow_key: str, version: int) -> dict[str, Any] | None:
    return _definitions.get((workflow_key, version))


def remember_definition(workflow_key: str, version: int, definition: dict[str, Any]) -> None:
    with _definitions_lock:
        _definitions[(workflow_key, version)] = definition


class WorkflowRef(Protocol):
    """What a trigger needs of a workflow row."""

    key: str
    id: str
    current_version: int


def workflow_ref(session: Session, company_id: str, workflow_id: str) -> WorkflowRef:
    """``get_workflow`` for a trigger: three columns, no ORM entity."""
    if not WORKFLOW_ID.match(workflow_id):
        raise NotFound("Workflow not found")
    row = session.execute(
        select(Workflow.key, Workflow.id, Workflow.current_version).where(
            Workflow.company_id == company_id, Workflow.id == workflow_id, Workflow.deleted_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        raise NotFound("Workflow not found")
    return row


def get_workflow(session: Session, company_id: str, workflow_id: str, *, lock: bool = False) -> Workflow:
    """The company's live workflow of that id (ids are per company, and reusable once deleted)."""
    if not WORKFLOW_ID.match(workflow_id):
        raise NotFound("Workflow not found")
    query = select(Workflow).where(
        Workflow.company_id == company_id, Workflow.id == workflow_id, Workflow.deleted_at.is_(None)
    )
    workflow = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if workflow is None:
        raise NotFound("Workflow not found")
    return workflow


def get_run(session: Session, company_id: str, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None or run.company_id != company_id:
        raise NotFound("Run not found")
    return run


def lock_run(session: Session, run_id: str, *, with_input: bool = False) -> Run | None:
    """Lock the run row; its JSON input and output stay unloaded unless asked for (hot path)."""
    query = sql.LOCK_RUN if with_input else sql.LOCK_RUN_LEAN
    return session.execute(query, {"run_id": run_id}).scalar_one_or_none()


def lock_company_run(session: Session, company_id: str, run_id: str) -> Run:
    """Lock a run of this company, or 404."""
    run = lock_run(session, run_id, with_input=True)
    if run is None or run.company_id != company_id:
        raise NotFound("Run not found")
    return run


def restarted_run_ids(session: Session, run: Run) -> list[str]:
    """The runs retried or restarted from ``run``, newest first (its restart lineage's children)."""
    return list(
        session.execute(
            select(Run.id)
            .where(Run.restarted_from_run_id == run.id, Run.company_id == run.company_id)
            .order_by(Run.created_at.desc(), Run.id.desc())
        ).scalars()
    )


def step_runs(session: Session, run_id: str) -> list[StepRun]:
    return list(
        session.execute(select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.position)).scalars()
    )


def current_step_runs(session: Session, run_id: str) -> list[StepRun]:
    """``step_runs`` as the database has them now, even for rows this session loaded before (the
    caller holds the run's lock; the hot path's statements update rows past the identity map)."""
    query = select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.position)
    return list(session.execute(query.execution_options(populate_existing=True)).scalars())


def step_row(session: Session, run_id: str, step_id: str) -> StepRun:
    return session.execute(
        select(StepRun).where(StepRun.run_id == run_id, StepRun.step_id == step_id)
    ).scalar_one()


def step_attempts(session: Session, run_id: str) -> list[StepAttempt]:
    return list(
        session.execute(
            select(StepAttempt)
            .where(StepAttempt.run_id == run_id)
            .order_by(StepAttempt.position, StepAttempt.attempt, StepAttempt.id)
        ).scalars()
    )


def results_of(rows: list[StepRun]) -> dict[str, dict[str, Any]]:
    """The finished steps' outputs and statuses: the ``steps`` of the template context."""
    return {r.step_id: {"output": r.output, "status": r.status} for r in rows if r.status in STEP_FINISHED}
