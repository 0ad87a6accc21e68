"""Retry and restart (DESIGN §5.6): a plan first (the dry run is the plan), then a new run linked
by ``restartedFromRunId`` whose steps before the restart point are copies, never re-executed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.engine.graph import graph
from app.engine.reads import definition_for, get_run, step_runs
from app.engine.states import RUN_RESTARTABLE, RUN_RETRIABLE, reusable
from app.engine.trigger import create_run, insert_run, request_hash
from app.errors import InvalidState, InvalidStep, NotFound
from app.services import Services
from models import Run, StepRun, Workflow


@dataclass
class RestartPlan:
    """What a retry or restart would do: from which step, with which input and version."""

    mode: str  # retry | restart
    company_id: str
    original: Run
    version: int
    definition: dict[str, Any]
    start: int
    rerun: set[int]  # positions run again: the start step, its descendants (a retry: every unfinished)
    input: Any
    old_steps: dict[str, StepRun]
    fingerprint: str

    @property
    def from_step_id(self) -> str:
        return self.definition["steps"][self.start]["id"]

    @property
    def reused_step_ids(self) -> list[str]:
        return [step["id"] for i, step in enumerate(self.definition["steps"]) if i not in self.rerun]

    @property
    def step_ids_to_run(self) -> list[str]:
        return [step["id"] for i, step in enumerate(self.definition["steps"]) if i in self.rerun]


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` merged into ``base``: objects merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


def plan_restart(
    services: Services,
    company_id: str,
    run_id: str,
    *,
    mode: str,
    from_step_id: str | None = None,
    override_input: dict[str, Any] | None = None,
    version_choice: str = "original",
) -> RestartPlan:
    """Check the run may be retried (``mode="retry"``: from its first failed step) or restarted
    (from ``from_step_id``) and return the plan; nothing is written."""
    with services.db.session() as session:
        original = get_run(session, company_id, run_id)
        allowed = RUN_RETRIABLE if mode == "retry" else RUN_RESTARTABLE
        if original.status not in allowed:
            raise InvalidState(
                "Can only retry failed runs"
                if mode == "retry"
                else "Can only restart completed or failed runs"
            )
        old_steps = {row.step_id: row for row in step_runs(session, original.id)}
        version = _version(session, company_id, original, version_choice)
        definition = definition_for(session, original.workflow_key, version)
    ids = [step["id"] for step in definition["steps"]]
    if mode == "retry":
        failed = [
            r
            for r in sorted(old_steps.values(), key=lambda r: r.position)
            if not reusable(r.status, r.duration_ms)
        ]
        from_step_id = failed[0].step_id if failed else ids[0]
    if from_step_id not in ids:
        raise InvalidStep(f"Step not found: {from_step_id}")
    start = ids.index(from_step_id)
    shape = graph(definition)
    unfinished = {i for i, step_id in enumerate(ids) if not _reusable(old_steps.get(step_id))}
    # A chain reruns from the start step on; a DAG reruns it and what needs it, and a retry every
    # step without a result to reuse and what needs those.
    rerun = shape.descendants({start} | (unfinished if mode == "retry" else set()))
    if mode == "retry":  # a later version may add a step before the failed one: it starts there
        start = min(rerun)
        from_step_id = ids[start]
    for i, step_id in enumerate(ids):
        if i not in rerun and i in unfinished:
            raise InvalidStep(f"Step {step_id} has no result to reuse; restart from it or an earlier step")
    fingerprint = request_hash(
        {"op": mode, "run": run_id, "from": from_step_id, "input": override_input, "version": version_choice}
    )
    new_input = deep_merge(original.input, override_input or {})
    return RestartPlan(
        mode, company_id, original, version, definition, start, rerun, new_input, old_steps, fingerprint
    )


def _reusable(row: StepRun | None) -> bool:
    return row is not None and reusable(row.status, row.duration_ms)


def _version(session: Session, company_id: str, original: Run, choice: str) -> int:
    if choice == "latest":
        # The latest version of the run's own workflow row, not of a newer workflow reusing its id.
        workflow = session.get(Workflow, original.workflow_key)
        if workflow is None or workflow.company_id != company_id or workflow.deleted_at is not None:
            raise NotFound("Workflow not found")
        return workflow.current_version
    return original.workflow_version


def start_restart(
    services: Services, plan: RestartPlan, idempotency_key: str | None = None
) -> tuple[Run, bool]:
    """Create the plan's new run (or return the one this Idempotency-Key made) and enqueue it."""
    original = plan.original

    def build(session: Session) -> tuple[Run, list[str]]:
        return insert_run(
            session,
            plan.company_id,
            original.workflow_key,
            original.workflow_id,
            plan.version,
            plan.definition,
            plan.input,
            original.trigger_type,
            start=plan.start,
            rerun=plan.rerun,
            reused=plan.old_steps,
            restarted_from=original.id,
        )

    return create_run(services, idempotency_key, plan.fingerprint, build, lambda _: original.workflow_key)
