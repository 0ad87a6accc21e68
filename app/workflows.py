"""Workflow definitions: create, replace (a new immutable version), delete."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import redaction, schedules, webhooks
from app import secrets as secret_store
from app.config import Config
from app.definition import validate_definition
from app.engine import get_workflow
from app.errors import Conflict, ValidationError
from app.ids import WORKFLOW_ID, new_id, new_short_id
from app.timeutil import utcnow
from models import Schedule, Workflow, WorkflowVersion


def view(session: Session, workflow: Workflow, definition: dict[str, Any]) -> dict[str, Any]:
    """The workflow as the API shows it: secrets masked, the schedule's next fire time."""
    shown = {
        **redaction.definition(definition),
        "id": workflow.id,
        "version": workflow.current_version,
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
    }
    triggers = definition.get("triggers")
    if triggers:
        shown["triggers"] = dict(triggers)
        if "webhook" in triggers:
            shown["triggers"]["webhook"] = webhooks.mask(triggers["webhook"])
        if "schedule" in triggers:
            row = session.get(Schedule, workflow.key)
            shown["next_run_at"] = row.next_run_at if row is not None else None
    return shown


def _keep_masked_secrets(definition: dict[str, Any], previous: dict[str, Any]) -> None:
    """A definition sent back as GET showed it (secrets masked) keeps the stored secrets."""
    new = (definition.get("triggers") or {}).get("webhook")
    old = (previous.get("triggers") or {}).get("webhook")
    if not new or not old:
        return
    masked = webhooks.mask(old)
    for key in ("secret", "secrets"):
        if key in new and new[key] == masked.get(key):
            new[key] = old[key]


def _keep_redacted_headers(definition: dict[str, Any], previous: dict[str, Any]) -> None:
    """A header sent back as GET showed it ([REDACTED]) keeps the stored value of that step."""
    old = {s.get("id"): s for s in previous.get("steps") or []}
    for step in definition.get("steps") or []:
        headers = (step.get("input") or {}).get("headers") if isinstance(step.get("input"), dict) else None
        was = ((old.get(step.get("id")) or {}).get("input") or {}).get("headers")
        if not isinstance(headers, dict) or not isinstance(was, dict):
            continue
        for name, value in headers.items():
            if value == redaction.REDACTED and name in was:
                headers[name] = was[name]


def current_definition(session: Session, workflow: Workflow) -> dict[str, Any]:
    return session.execute(
        select(WorkflowVersion.definition).where(
            WorkflowVersion.workflow_key == workflow.key, WorkflowVersion.version == workflow.current_version
        )
    ).scalar_one()


SAMPLED_FIRES = 30  # consecutive fire times the minimum interval is checked over


def check_schedule_limits(
    session: Session, company_id: str, definition: dict[str, Any], config: Config, workflow_key: str | None
) -> None:
    """A schedule must not fire more often than schedule_min_interval_s, and a company keeps at most
    max_schedules_per_company of them (this workflow's own schedule aside): a 400 naming the cron."""
    spec = (definition.get("triggers") or {}).get("schedule")
    if not spec:
        return
    field = "triggers.schedule.cron"
    cron, tz = spec["cron"], spec.get("timezone", "UTC")
    fires = [schedules.next_fire(cron, tz, utcnow())]
    for _ in range(SAMPLED_FIRES):
        fires.append(schedules.next_fire(cron, tz, fires[-1]))
    gap = min(later - earlier for earlier, later in zip(fires, fires[1:], strict=False))
    minimum = config.schedule_min_interval_s
    if gap.total_seconds() < minimum:
        problem = f"fires every {gap.total_seconds():g} s; the minimum interval is {minimum} s"
        raise ValidationError(f"Invalid {field}: {problem}", details={field: [problem]})
    others = select(func.count()).where(Schedule.company_id == company_id)
    if workflow_key is not None:
        others = others.where(Schedule.workflow_key != workflow_key)
    if session.execute(others).scalar_one() >= config.max_schedules_per_company:
        problem = f"a company keeps at most {config.max_schedules_per_company} schedules"
        raise ValidationError(f"Invalid {field}: {problem}", details={field: [problem]})


def create(
    session: Session, company_id: str, payload: Any, config: Config | None = None
) -> tuple[Workflow, dict[str, Any]]:
    payload = dict(payload) if isinstance(payload, dict) else payload
    workflow_id = payload.pop("id", None) if isinstance(payload, dict) else None
    if workflow_id is not None and (not isinstance(workflow_id, str) or not WORKFLOW_ID.match(workflow_id)):
        raise ValidationError(
            "Invalid workflow id", details={"id": ["Must match ^wf_[a-z0-9][a-z0-9_-]{0,63}$"]}
        )
    definition = validate_definition(payload)
    if config is not None:
        check_schedule_limits(session, company_id, definition, config, None)
    now = utcnow()
    workflow = Workflow(
        key=new_id("wfk"),
        id=workflow_id or new_short_id("wf"),
        company_id=company_id,
        name=definition["name"],
        current_version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(workflow)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"Workflow {workflow_id} already exists") from exc
    if config is not None:
        secret_store.store_literal_credentials(session, config, company_id, definition)
    session.add(WorkflowVersion(workflow_key=workflow.key, version=1, definition=definition, created_at=now))
    schedules.sync(session, workflow, definition, now)
    session.commit()
    return workflow, definition


def replace(
    session: Session, company_id: str, workflow_id: str, payload: Any, config: Config | None = None
) -> tuple[Workflow, dict[str, Any]]:
    """A new immutable version; runs already started keep the version they pinned."""
    if isinstance(payload, dict) and "id" in payload:
        payload = dict(payload)
        if payload.pop("id") != workflow_id:
            raise ValidationError(
                "Body id does not match the URL", details={"id": ["Does not match the URL"]}
            )
    definition = validate_definition(payload)
    workflow = get_workflow(session, company_id, workflow_id, lock=True)
    if config is not None:
        check_schedule_limits(session, company_id, definition, config, workflow.key)
    previous = current_definition(session, workflow)
    _keep_masked_secrets(definition, previous)
    _keep_redacted_headers(definition, previous)
    if config is not None:
        secret_store.store_literal_credentials(session, config, company_id, definition)
    now = utcnow()
    workflow.current_version += 1
    workflow.name = definition["name"]
    workflow.updated_at = now
    session.add(
        WorkflowVersion(
            workflow_key=workflow.key, version=workflow.current_version, definition=definition, created_at=now
        )
    )
    schedules.sync(session, workflow, definition, now)
    session.commit()
    return workflow, definition


def delete(session: Session, company_id: str, workflow_id: str) -> Workflow:
    workflow = get_workflow(session, company_id, workflow_id)
    workflow.deleted_at = utcnow()
    schedules.sync(session, workflow, None)
    session.commit()
    return workflow
