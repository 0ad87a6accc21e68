"""Row factories: companies, keys, workflows, runs, steps and attempts written straight to the database.

For integration tests (and end-to-end tests that need a state no trigger produces). Each factory
adds its rows to the given session and flushes; the caller commits. Defaults are consistent with
what the engine writes (a ``failed`` run has a failed step, a ``running`` step a lease, …) and every
column can be overridden. Statuses are plain strings (``"pending"``, ``"success"``); the status
columns take them as they take the enum members.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

import workers.actions  # noqa: F401  (registers the built-in actions that definitions name)
from app import keys, schedules
from app.definition import validate_definition
from app.ids import new_id, new_short_id
from app.timeutil import duration_ms, utcnow
from models import Company, Run, StepAttempt, StepRun, Workflow, WorkflowVersion

FINISHED_RUN = frozenset({"completed", "failed", "cancelled", "timeout"})
RAN_STEP = frozenset({"running", "waiting", "success", "error"})
FINISHED_STEP = frozenset({"success", "error", "skipped"})
STEP_ERROR = {"code": "STEP_ERROR", "message": "boom"}
RUN_TIMEOUT = {"code": "RUN_TIMEOUT", "message": "Run exceeded its timeoutMs"}
DEFAULT_STEPS: tuple[dict[str, Any], ...] = ({"id": "a", "action": "transform", "input": {}},)
LEASE_GRACE = timedelta(seconds=30)  # as the engine: a running step's lease is its timeoutMs plus this

_RUN_COLUMNS = frozenset(Run.__table__.columns.keys())
_STEP_COLUMNS = frozenset(StepRun.__table__.columns.keys()) - {"id", "run_id", "step_id", "position"}
_ATTEMPT_COLUMNS = frozenset(StepAttempt.__table__.columns.keys()) - {"id", "run_id", "step_id", "attempt"}
_UNSET: Any = object()


def _check(fields: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(f"{what} has no column {', '.join(sorted(unknown))}")


# --------------------------------------------------------------------------- tenancy


def company(session: Session, name: str | None = None) -> Company:
    """A company (a fresh one unless ``name`` already exists)."""
    return keys.get_or_create_company(session, name or f"test-{uuid.uuid4().hex[:12]}")


def api_key(session: Session, owner: Company, name: str = "default") -> str:
    """A key for ``owner``, in clear (only its hash is stored)."""
    return keys.create_key(session, owner, name)


# --------------------------------------------------------------------------- workflows


def workflow(
    session: Session,
    company_id: str,
    steps: Iterable[Mapping[str, Any]] | None = None,
    *,
    workflow_id: str | None = None,
    name: str = "test",
    created_at: datetime | None = None,
    **extra: Any,
) -> Workflow:
    """A workflow whose validated definition (``steps`` plus ``extra``: output, timeoutMs, triggers…)
    is stored as version 1, its schedule row included, as ``POST /workflows`` stores it."""
    definition = validate_definition(
        {"name": name, "steps": [dict(s) for s in (steps if steps is not None else DEFAULT_STEPS)], **extra}
    )
    now = created_at or utcnow()
    row = Workflow(
        key=new_id("wfk"),
        id=workflow_id or new_short_id("wf"),
        company_id=company_id,
        name=definition["name"],
        current_version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    session.add(WorkflowVersion(workflow_key=row.key, version=1, definition=definition, created_at=now))
    schedules.sync(session, row, definition, now)
    session.flush()
    return row


def _live(session: Session, workflow_id: str) -> Workflow:
    """The live workflow of that public id (tests use ids no other company of theirs shares)."""
    found = (
        session.execute(select(Workflow).where(Workflow.id == workflow_id, Workflow.deleted_at.is_(None)))
        .scalars()
        .all()
    )
    if len(found) != 1:
        raise LookupError(f"{len(found)} live workflows {workflow_id!r}")
    return found[0]


def definition_of(session: Session, workflow: Workflow, version: int) -> dict[str, Any]:
    """The stored (validated, normalised) definition of one version."""
    return session.execute(
        select(WorkflowVersion.definition).where(
            WorkflowVersion.workflow_key == workflow.key, WorkflowVersion.version == version
        )
    ).scalar_one()


# --------------------------------------------------------------------------- runs


def run_values(
    workflow: Workflow, status: str = "pending", *, workflow_version: int = 1, **fields: Any
) -> dict[str, Any]:
    """The columns of one ``runs`` row with consistent defaults, for ``run()`` and for bulk inserts.

    Defaults: created now; started at creation unless pending; a finished run completed a second
    later; ``duration_ms`` from the two; a failed run's error ``STEP_ERROR``, a timed-out one's
    ``RUN_TIMEOUT``.
    """
    _check(fields, _RUN_COLUMNS, "runs")
    created = fields.pop("created_at", None) or utcnow()
    started = fields.pop("started_at", _UNSET)
    if started is _UNSET:
        started = created if status != "pending" else None
    completed = fields.pop("completed_at", _UNSET)
    if completed is _UNSET:
        completed = started + timedelta(seconds=1) if status in FINISHED_RUN and started else None
    values: dict[str, Any] = {
        "id": new_id("run"),
        "company_id": workflow.company_id,
        "workflow_key": workflow.key,
        "workflow_id": workflow.id,
        "workflow_version": workflow_version,
        "status": status,
        "trigger_type": "api",
        "input": {},
        "output": None,
        "error": STEP_ERROR if status == "failed" else RUN_TIMEOUT if status == "timeout" else None,
        "created_at": created,
        "started_at": started,
        "completed_at": completed,
        "duration_ms": duration_ms(started, completed),
        "deadline_at": None,
        "restarted_from_run_id": None,
        "restart_from_step_id": None,
        "idempotency_key": None,
        "idempotency_hash": None,
    }
    values.update(fields)
    return values


def insert_runs(session: Session, rows: list[dict[str, Any]]) -> None:
    """Many ``run_values`` rows in one statement (no step rows): for list and pagination tests."""
    if rows:
        session.execute(insert(Run), rows)


def _default_step_status(run_status: str, position: int) -> str:
    """Where a run in ``run_status`` has left each step (the first step is the one in play)."""
    first = position == 0
    if run_status == "pending":
        return "queued" if first else "pending"
    if run_status == "running":
        return "running" if first else "pending"
    if run_status == "suspended":
        return "waiting" if first else "pending"
    if run_status == "completed":
        return "success"
    if run_status == "failed":
        return "error" if first else "skipped"
    return "skipped"  # cancelled, timeout: steps not reached are skipped


def _step_values(
    row: Run, spec: Mapping[str, Any], position: int, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    _check(overrides, _STEP_COLUMNS, f"step_runs ({spec['id']})")
    status = overrides.get("status", _default_step_status(str(row.status), position))
    ran = status in RAN_STEP
    base = row.started_at or row.created_at
    values: dict[str, Any] = {
        "run_id": row.id,
        "step_id": spec["id"],
        "position": position,
        "status": status,
        "attempt": 1 if ran or status == "queued" else 0,
        "input": {} if ran else None,
        "output": {} if status == "success" else None,
        "error": STEP_ERROR if status == "error" else None,
        "queued_at": row.created_at if ran or status == "queued" else None,
        "reused": False,
    }
    values.update(overrides)
    started = values.setdefault("started_at", base if ran else None)
    completed = values.setdefault("completed_at", started if status in FINISHED_STEP and started else None)
    values.setdefault("duration_ms", duration_ms(started, completed))
    lease = None
    if status == "running" and started is not None:
        lease = started + timedelta(milliseconds=spec.get("timeoutMs", 300_000)) + LEASE_GRACE
    values.setdefault("lease_expires_at", lease)
    return values


def run(
    session: Session,
    workflow: Workflow | str,
    status: str = "pending",
    steps: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    with_steps: bool = True,
    **fields: Any,
) -> Run:
    """A run of ``workflow`` (the object, or the live workflow of that id) in ``status``, and one
    ``step_runs`` row per step.

    ``fields`` override the run's columns (see ``run_values``); ``steps`` override step rows by step
    id, e.g. ``{"a": {"status": "success"}, "b": {"status": "running", "lease_expires_at": past}}``.
    Unless overridden, step times follow the run's, a running step holds a lease, and the run has the
    deadline its definition's ``timeoutMs`` gives. ``with_steps=False`` writes the run row alone.
    No message is enqueued: nothing executes the run unless the test makes it.
    """
    owner = workflow if isinstance(workflow, Workflow) else _live(session, workflow)
    version = fields.pop("workflow_version", owner.current_version)
    definition = definition_of(session, owner, version)
    values = run_values(owner, status, workflow_version=version, **fields)
    if "deadline_at" not in fields and definition.get("timeoutMs"):
        values["deadline_at"] = values["created_at"] + timedelta(milliseconds=definition["timeoutMs"])
    row = Run(**values)
    session.add(row)
    session.flush()
    overrides = dict(steps or {})
    unknown = set(overrides) - {spec["id"] for spec in definition["steps"]}
    if unknown:
        raise ValueError(f"workflow {owner.id} has no step {', '.join(sorted(unknown))}")
    if with_steps:
        for position, spec in enumerate(definition["steps"]):
            session.add(StepRun(**_step_values(row, spec, position, overrides.get(spec["id"], {}))))
        session.flush()
    elif overrides:
        raise ValueError("steps overrides given with with_steps=False")
    return row


def step(session: Session, run_id: str, step_id: str) -> StepRun:
    """One step row of a run."""
    return session.execute(
        select(StepRun).where(StepRun.run_id == run_id, StepRun.step_id == step_id)
    ).scalar_one()


# --------------------------------------------------------------------------- attempts


def attempt(
    session: Session, run_id: str, step_id: str, attempt: int = 1, status: str = "success", **fields: Any
) -> StepAttempt:
    """One finished attempt (a line of ``GET /runs/:id/logs``); its position is the step row's."""
    _check(fields, _ATTEMPT_COLUMNS, "step_attempts")
    if "position" not in fields:
        fields["position"] = session.execute(
            select(StepRun.position).where(StepRun.run_id == run_id, StepRun.step_id == step_id)
        ).scalar_one()
    values: dict[str, Any] = {
        "run_id": run_id,
        "step_id": step_id,
        "attempt": attempt,
        "status": status,
        "input": {},
        "output": {} if status == "success" else None,
        "error": STEP_ERROR if status == "error" else None,
    }
    values.update(fields)
    started = values.setdefault("started_at", utcnow())
    completed = values.setdefault("completed_at", started)
    values.setdefault("duration_ms", duration_ms(started, completed))
    row = StepAttempt(**values)
    session.add(row)
    session.flush()
    return row
