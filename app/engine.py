"""The run and step state machine: every transition, written once, used by the API and the workers.

Every change is a compare-and-set (``UPDATE … WHERE status = … AND attempt = …``) inside a
transaction that first locks the run row, so a duplicate message, a cancel and a worker can race
without any of them undoing the others (DESIGN §5.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import bindparam, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from app import templating
from app.db import Database
from app.errors import Conflict, InvalidState, InvalidStep, NotFound
from app.errors import ValidationError as BatonValidationError
from app.ids import WORKFLOW_ID, new_id
from app.queue import StepQueue
from app.timeutil import duration_ms, utcnow
from models import Run, StepAttempt, StepRun, Workflow, WorkflowVersion

logger = logging.getLogger("baton.engine")
IDEMPOTENCY_TTL = timedelta(hours=24)
LEASE_GRACE = timedelta(seconds=30)
CANCEL_FLAG_TTL_S = 7 * 24 * 3600
FINISHED_STEP = ("success", "error", "skipped")


@dataclass
class Services:
    """What a process needs to drive runs: the database, Redis and the step queue."""

    db: Database
    redis: redis.Redis
    queue: StepQueue
    namespace: str = "baton"

    def cancel_key(self, run_id: str) -> str:
        return f"{self.namespace}:cancel:{run_id}"

    def is_cancel_requested(self, run_id: str) -> bool:
        return bool(self.redis.exists(self.cancel_key(run_id)))


# --------------------------------------------------------------------------- definitions

_definitions: dict[tuple[str, int], dict[str, Any]] = {}
_definitions_lock = threading.Lock()


def definition_for(session: Session, workflow_id: str, version: int) -> dict[str, Any]:
    """Versions are immutable, so each process caches them forever."""
    key = (workflow_id, version)
    cached = _definitions.get(key)
    if cached is not None:
        return cached
    definition = session.execute(
        select(WorkflowVersion.definition).where(
            WorkflowVersion.workflow_id == workflow_id, WorkflowVersion.version == version
        )
    ).scalar_one()
    with _definitions_lock:
        _definitions[key] = definition
    return definition


# --------------------------------------------------------------------------- trigger


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def get_workflow(session: Session, company_id: str, workflow_id: str, *, lock: bool = False) -> Workflow:
    if not WORKFLOW_ID.match(workflow_id):
        raise NotFound("Workflow not found")
    query = select(Workflow).where(Workflow.id == workflow_id)
    workflow = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if workflow is None or workflow.company_id != company_id or workflow.deleted_at is not None:
        raise NotFound("Workflow not found")
    return workflow


def trigger_run(
    services: Services,
    company_id: str,
    workflow_id: str,
    run_input: Any,
    trigger_type: str,
    *,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> tuple[Run, bool]:
    """Insert a pending run and its steps in one transaction, commit, then enqueue the first step.

    Returns the run and whether it was created (False: an idempotent repeat). ``fingerprint``
    replaces the request hash when a repeat may differ in body yet be the same (a webhook delivery).
    """
    if not isinstance(run_input, dict):
        raise BatonValidationError("input must be a JSON object", details={"input": ["Not a valid object."]})
    fingerprint = fingerprint or request_hash({"input": run_input, "triggerType": trigger_type})

    def build(session: Session) -> tuple[Run, str]:
        workflow = get_workflow(session, company_id, workflow_id)
        definition = definition_for(session, workflow.id, workflow.current_version)
        run = _insert_run(
            session, company_id, workflow.id, workflow.current_version, definition, run_input, trigger_type
        )
        return run, definition["steps"][0]["id"]

    return _create_run(services, company_id, workflow_id, idempotency_key, fingerprint, build)


def _create_run(
    services: Services,
    company_id: str,
    workflow_id: str,
    idempotency_key: str | None,
    fingerprint: str,
    build: Any,
) -> tuple[Run, bool]:
    """Shared by trigger, retry and restart: idempotency, one commit, then enqueue the first step."""
    with services.db.session() as session:
        if idempotency_key:
            existing = _idempotent_run(session, company_id, workflow_id, idempotency_key, fingerprint)
            if existing is not None:
                return existing, False
        run, first_step = build(session)
        if idempotency_key:
            run.idempotency_key, run.idempotency_hash = idempotency_key, fingerprint
        try:
            session.commit()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            session.rollback()
            if not idempotency_key:
                raise
            existing = _idempotent_run(session, company_id, workflow_id, idempotency_key, fingerprint)
            if existing is None:
                raise
            return existing, False
    _enqueue_or_leave_to_sweep(services, run.id, first_step, 1)
    return run, True


def _enqueue_or_leave_to_sweep(services: Services, run_id: str, step_id: str, attempt: int) -> None:
    """The run is committed; if the broker is down, the recovery sweep sends the message later."""
    try:
        services.queue.enqueue(run_id, step_id, attempt)
    except Exception:  # any broker failure: the row is the source of truth
        logger.warning(
            "could not enqueue %s/%s; the recovery sweep will resend it", run_id, step_id, exc_info=True
        )


def _insert_run(
    session: Session,
    company_id: str,
    workflow_id: str,
    version: int,
    definition: dict[str, Any],
    run_input: Any,
    trigger_type: str,
    *,
    start: int = 0,
    reused: dict[str, StepRun] | None = None,
    restarted_from: str | None = None,
) -> Run:
    """A pending run whose steps before ``start`` are copies of ``reused`` and the rest still to run."""
    now = utcnow()
    timeout = definition.get("timeoutMs")
    run = Run(
        id=new_id("run"),
        company_id=company_id,
        workflow_id=workflow_id,
        workflow_version=version,
        status="pending",
        trigger_type=trigger_type,
        input=run_input,
        created_at=now,
        deadline_at=now + timedelta(milliseconds=timeout) if timeout else None,
        restarted_from_run_id=restarted_from,
        restart_from_step_id=definition["steps"][start]["id"] if restarted_from else None,
    )
    session.add(run)
    session.flush()
    rows = []
    for index, step in enumerate(definition["steps"]):
        row: dict[str, Any] = {
            "run_id": run.id,
            "step_id": step["id"],
            "position": index,
            "status": "queued" if index == start else "pending",
            "attempt": 1 if index == start else 0,
            "queued_at": now if index == start else None,
            "reused": False,
        }
        if index < start and reused is not None:
            old = reused[step["id"]]
            row.update(
                status=old.status,
                attempt=old.attempt,
                input=old.input,
                output=old.output,
                error=old.error,
                started_at=old.started_at,
                completed_at=old.completed_at,
                duration_ms=old.duration_ms,
                reused=True,
            )
        rows.append(row)
    session.execute(insert(StepRun), rows)
    return run


def _idempotent_run(
    session: Session, company_id: str, workflow_id: str, key: str, fingerprint: str | None
) -> Run | None:
    existing = session.execute(
        select(Run).where(
            Run.company_id == company_id, Run.workflow_id == workflow_id, Run.idempotency_key == key
        )
    ).scalar_one_or_none()
    if existing is None:
        return None
    if existing.created_at < utcnow() - IDEMPOTENCY_TTL:
        # Expired: release the key so this request makes a new run.
        session.execute(update(Run).where(Run.id == existing.id).values(idempotency_key=None))
        session.flush()
        return None
    if existing.idempotency_hash != fingerprint:
        raise Conflict("Idempotency-Key was already used with a different request body")
    return existing


# --------------------------------------------------------------------------- reads


def get_run(session: Session, company_id: str, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None or run.company_id != company_id:
        raise NotFound("Run not found")
    return run


def step_runs(session: Session, run_id: str) -> list[StepRun]:
    return list(
        session.execute(select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.position)).scalars()
    )


def step_attempts(session: Session, run_id: str) -> list[StepAttempt]:
    return list(
        session.execute(
            select(StepAttempt)
            .where(StepAttempt.run_id == run_id)
            .order_by(StepAttempt.position, StepAttempt.attempt, StepAttempt.id)
        ).scalars()
    )


# --------------------------------------------------------------------------- cancel


def cancel_run(services: Services, company_id: str, run_id: str) -> Run:
    """Pending, running or suspended → cancelled; steps not reached become skipped."""
    with services.db.session() as session:
        run = _lock_run(session, run_id)
        if run is None or run.company_id != company_id:
            raise NotFound("Run not found")
        if run.status not in ("pending", "running", "suspended"):
            raise InvalidState("Can only cancel running or pending runs")
        now = utcnow()
        run.status = "cancelled"
        run.completed_at = now
        run.duration_ms = duration_ms(run.started_at, now)
        _skip_unreached(session, run.id, now)
        session.commit()
    services.redis.set(services.cancel_key(run.id), "1", ex=CANCEL_FLAG_TTL_S)
    return run


# --------------------------------------------------------------------------- retry and restart

RETRIABLE = ("failed", "timeout")
RESTARTABLE = ("completed", "failed", "timeout")


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` merged into ``base``: objects merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base.get(key), value) if key in base else value
        return merged
    return override


def restart_run(
    services: Services,
    company_id: str,
    run_id: str,
    *,
    mode: str,
    from_step_id: str | None = None,
    override_input: dict[str, Any] | None = None,
    version_choice: str = "original",
    idempotency_key: str | None = None,
    dry_run: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Retry (``mode="retry"``, from the first failed step) or restart (from ``from_step_id``) a run.

    A new run linked by ``restarted_from_run_id``; steps before the restart point are copied
    unchanged (never re-executed). Returns the spec's 202 body (or the plan for ``dry_run``)
    and whether a run was created.
    """
    with services.db.session() as session:
        original = get_run(session, company_id, run_id)
        allowed = RETRIABLE if mode == "retry" else RESTARTABLE
        if original.status not in allowed:
            raise InvalidState(
                "Can only retry failed runs"
                if mode == "retry"
                else "Can only restart completed or failed runs"
            )
        old_rows = {r.step_id: r for r in step_runs(session, original.id)}
        if version_choice == "latest":
            version = get_workflow(session, company_id, original.workflow_id).current_version
        else:
            version = original.workflow_version
        definition = definition_for(session, original.workflow_id, version)
        ids = [step["id"] for step in definition["steps"]]
        if mode == "retry":
            failed = [
                r
                for r in sorted(old_rows.values(), key=lambda r: r.position)
                if r.status not in ("success", "skipped")
            ]
            from_step_id = failed[0].step_id if failed else ids[0]
        if from_step_id not in ids:
            raise InvalidStep(f"Step not found: {from_step_id}")
        start = ids.index(from_step_id)
        for step_id in ids[:start]:
            row = old_rows.get(step_id)
            if row is None or row.status not in ("success", "skipped"):
                raise InvalidStep(
                    f"Step {step_id} has no result to reuse; restart from it or an earlier step"
                )
        new_input = deep_merge(original.input, override_input or {})
        base = {
            "originalRunId": original.id,
            "workflowId": original.workflow_id,
            "restartFromStepId": from_step_id,
        }
        if dry_run:
            return {
                **base,
                "dryRun": True,
                "workflowVersion": version,
                "input": new_input,
                "reusedSteps": [
                    {"stepId": i, "status": old_rows[i].status, "output": old_rows[i].output}
                    for i in ids[:start]
                ],
                "stepsToRun": ids[start:],
            }, False
        workflow_id, trigger_type = original.workflow_id, original.trigger_type
    fingerprint = request_hash(
        {"op": mode, "run": run_id, "from": from_step_id, "input": override_input, "version": version_choice}
    )

    def build(session: Session) -> tuple[Run, str]:
        run = _insert_run(
            session,
            company_id,
            workflow_id,
            version,
            definition,
            new_input,
            trigger_type,
            start=start,
            reused=old_rows,
            restarted_from=run_id,
        )
        return run, from_step_id

    run, created = _create_run(services, company_id, workflow_id, idempotency_key, fingerprint, build)
    return {
        **base,
        "newRunId": run.id,
        "restartFromStepId": run.restart_from_step_id or from_step_id,
        "status": "pending" if created else run.status,
        "createdAt": run.created_at,
        "workflowVersion": run.workflow_version,
    }, created


# --------------------------------------------------------------------------- execution


@dataclass
class StepOutcome:
    """What executing one attempt produced."""

    status: str  # success | error | skipped | waiting
    input: Any = None
    output: Any = None
    error: dict[str, str] | None = None
    retriable: bool = False
    retry_after_ms: int | None = None
    started_at: Any = None
    completed_at: Any = None
    # waiting only: when a delay is due (None: until resumed, e.g. an approval without timeout)
    wait_until: Any = None
    suspend: bool = False


@dataclass
class Claim:
    """A step this worker now owns: enough to render and run it without another query."""

    run_id: str
    workflow_id: str
    trigger_type: str
    run_input: Any
    definition: dict[str, Any]
    position: int
    attempt: int
    started_at: Any
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Set when the step was waiting (a delay) and is now due: it completes without running again.
    resumed_input: Any = None
    waited_since: Any = None

    @property
    def step(self) -> dict[str, Any]:
        return self.definition["steps"][self.position]

    @property
    def step_id(self) -> str:
        return self.step["id"]

    def template_context(self) -> dict[str, Any]:
        return {
            "input": self.run_input,
            "steps": self.results,
            "run": {"id": self.run_id, "workflowId": self.workflow_id, "triggerType": self.trigger_type},
            "secrets": {},
        }


@dataclass
class Next:
    """What the worker does after recording a result."""

    claim: Claim | None = None  # run this next step inline, now
    enqueue: tuple[str, str, int, int] | None = None  # (run_id, step_id, attempt, delay_ms)


def _update_steps() -> Any:
    """A bulk UPDATE of step rows; no identity-map sync (measured: a large share of CPU per step)."""
    return update(StepRun).execution_options(synchronize_session=False)


# The hot path's statements, built once: building them per step cost more CPU than running them.
_STEPS = StepRun.__table__
_RECORD = (
    update(_STEPS)
    .where(
        _STEPS.c.run_id == bindparam("b_run"),
        _STEPS.c.step_id == bindparam("b_step"),
        _STEPS.c.status == "running",
        _STEPS.c.attempt == bindparam("b_attempt"),
    )
    .values(
        status=bindparam("status"),
        input=bindparam("input"),
        output=bindparam("output"),
        error=bindparam("error"),
        started_at=bindparam("started_at"),
        completed_at=bindparam("completed_at"),
        duration_ms=bindparam("duration_ms"),
        lease_expires_at=None,
    )
)
_RUNS = Run.__table__
# Claims the next step only while the run is still running. Without a lock on the run row: a
# cancel that committed first makes EXISTS false; one that comes later finds the step running
# (already started, so it finishes) and the worker sees the cancel flag before executing it.
_CLAIM_NEXT = (
    update(_STEPS)
    .where(
        _STEPS.c.run_id == bindparam("b_run"),
        _STEPS.c.step_id == bindparam("b_step"),
        _STEPS.c.status == "pending",
        exists().where(_RUNS.c.id == bindparam("b_run"), _RUNS.c.status == "running"),
    )
    .values(
        status="running",
        attempt=1,
        started_at=bindparam("now"),
        queued_at=bindparam("now"),
        lease_expires_at=bindparam("lease"),
    )
)
_LOG_ATTEMPT = insert(StepAttempt.__table__)
_LOCK_RUN = select(Run).where(Run.id == bindparam("run_id")).with_for_update()
_LOCK_RUN_LEAN = _LOCK_RUN.options(defer(Run.input), defer(Run.output))


def _update_running(session: Session, claim: Claim, **values: Any) -> bool:
    """Compare-and-set on the claimed attempt: only the owner of (step, attempt, running) may change it."""
    result = session.execute(
        _update_steps()
        .where(
            StepRun.run_id == claim.run_id,
            StepRun.step_id == claim.step_id,
            StepRun.status == "running",
            StepRun.attempt == claim.attempt,
        )
        .values(**values)
    )
    return result.rowcount == 1


def _log_attempt(
    session: Session,
    source: Any,
    status: str,
    started: Any,
    now: Any,
    *,
    step_input: Any,
    output: Any = None,
    error: dict | None = None,
) -> None:
    """One ``step_attempts`` row (the log behind ``GET /runs/:id/logs``) for a claim or a step row."""
    session.execute(
        _LOG_ATTEMPT,
        {
            "run_id": source.run_id,
            "step_id": source.step_id,
            "position": source.position,
            "attempt": source.attempt,
            "status": status,
            "input": step_input,
            "output": output,
            "error": error,
            "started_at": started,
            "completed_at": now,
            "duration_ms": duration_ms(started, now),
        },
    )


def _skip_after(session: Session, run_id: str, position: int, now: Any) -> None:
    """Steps after ``position`` that never started will not run."""
    session.execute(
        _update_steps()
        .where(StepRun.run_id == run_id, StepRun.position > position, StepRun.status == "pending")
        .values(status="skipped", completed_at=now)
    )


def _skip_unreached(session: Session, run_id: str, now: Any) -> None:
    """On cancel or timeout: every step not running now is skipped (a running one records its result)."""
    session.execute(
        _update_steps()
        .where(StepRun.run_id == run_id, StepRun.status.in_(("pending", "queued", "waiting")))
        .values(status="skipped", completed_at=now)
    )


def _lock_run(session: Session, run_id: str, *, with_input: bool = False) -> Run | None:
    """Lock the run row; its JSON input and output stay unloaded unless asked for (hot path)."""
    query = _LOCK_RUN if with_input else _LOCK_RUN_LEAN
    return session.execute(query, {"run_id": run_id}).scalar_one_or_none()


def _lease(definition: dict[str, Any], position: int, now: Any) -> Any:
    return now + timedelta(milliseconds=definition["steps"][position]["timeoutMs"]) + LEASE_GRACE


def claim_step(services: Services, run_id: str, step_id: str, attempt: int) -> Claim | None:
    """Take a queued (or due, waiting) step; None when the message is stale or the run is not active."""
    with services.db.session() as session:
        run = _lock_run(session, run_id, with_input=True)
        if run is None or run.status not in ("pending", "running"):
            return None
        now = utcnow()
        if run.deadline_at is not None and run.deadline_at <= now:
            _time_out(session, run, now)
            session.commit()
            return None
        definition = definition_for(session, run.workflow_id, run.workflow_version)
        rows = step_runs(session, run_id)
        target = next((r for r in rows if r.step_id == step_id), None)
        if target is None or target.attempt != attempt:
            return None
        waiting = target.status == "waiting" and target.queued_at is not None and target.queued_at <= now
        if target.status != "queued" and not waiting:
            return None
        values: dict[str, Any] = {
            "status": "running",
            "lease_expires_at": _lease(definition, target.position, now),
        }
        if not waiting:
            values.update(started_at=now, completed_at=None, duration_ms=None)
        claimed = session.execute(
            _update_steps()
            .where(StepRun.id == target.id, StepRun.status == target.status, StepRun.attempt == attempt)
            .values(**values)
        )
        if claimed.rowcount != 1:
            session.rollback()
            return None
        if run.status == "pending":
            run.status = "running"
            run.started_at = now
        session.commit()
        return Claim(
            run_id=run.id,
            workflow_id=run.workflow_id,
            trigger_type=run.trigger_type,
            run_input=run.input,
            definition=definition,
            position=target.position,
            attempt=attempt,
            started_at=target.started_at if waiting else now,
            results={
                r.step_id: {"output": r.output, "status": r.status} for r in rows if r.status in FINISHED_STEP
            },
            resumed_input=target.input if waiting else None,
            waited_since=target.started_at if waiting else None,
        )


def release_claim(services: Services, claim: Claim) -> None:
    """A claimed step that must not run after all (cancel seen before it started): skip it."""
    with services.db.session() as session:
        _update_running(session, claim, status="skipped", completed_at=utcnow(), lease_expires_at=None)
        session.commit()


def backoff_ms(retry: dict[str, Any], attempt: int, retry_after_ms: int | None = None) -> int:
    """Delay before attempt ``attempt + 1``: the policy with jitter, never less than Retry-After."""
    initial, cap = retry["initialDelayMs"], retry["maxDelayMs"]
    if retry["backoff"] == "fixed":
        delay = initial
    elif retry["backoff"] == "linear":
        delay = initial * attempt
    else:
        delay = initial * 2 ** (attempt - 1)
    delay = min(cap, delay)
    # Equal jitter: keep half, randomise half, so synchronized failures spread out.
    delay = delay // 2 + random.randint(0, delay - delay // 2) if delay > 1 else delay
    if retry_after_ms:
        delay = max(delay, min(retry_after_ms, cap))
    return int(delay)


def record_result(services: Services, claim: Claim, outcome: StepOutcome) -> Next:
    """Record one attempt and, in the same transaction, claim what comes next."""
    step = claim.step
    now = outcome.completed_at or utcnow()
    started = outcome.started_at or claim.started_at
    retry = step["retry"]
    will_retry = outcome.status == "error" and outcome.retriable and claim.attempt < retry["maxAttempts"]
    # The common case, a step done and another to follow, needs no lock on the run row (one round
    # trip less per step): the claim of the next step checks the run's status itself.
    chaining = outcome.status in ("success", "skipped") and claim.position + 1 < len(
        claim.definition["steps"]
    )
    with services.db.session() as session:
        run = None if chaining else _lock_run(session, claim.run_id)
        if run is None and not chaining:
            return Next()
        if outcome.status == "waiting":
            assert run is not None
            return _record_wait(session, services, run, claim, outcome, started, now)
        finished = (
            session.execute(
                _RECORD,
                {
                    "b_run": claim.run_id,
                    "b_step": claim.step_id,
                    "b_attempt": claim.attempt,
                    "status": "queued" if will_retry else outcome.status,
                    "input": outcome.input,
                    "output": outcome.output,
                    "error": outcome.error,
                    "started_at": started,
                    "completed_at": None if will_retry else now,
                    "duration_ms": None if will_retry else duration_ms(started, now),
                },
            ).rowcount
            == 1
        )
        if not finished:
            # Someone else recorded this attempt (a duplicate delivery); theirs stands.
            session.rollback()
            return Next()
        _log_attempt(
            session,
            claim,
            outcome.status,
            started,
            now,
            step_input=outcome.input,
            output=outcome.output,
            error=outcome.error,
        )
        nxt = Next()
        if chaining:
            claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
            position = claim.position + 1
            claimed = session.execute(
                _CLAIM_NEXT,
                {
                    "b_run": claim.run_id,
                    "b_step": claim.definition["steps"][position]["id"],
                    "now": now,
                    "lease": _lease(claim.definition, position, now),
                },
            )
            if claimed.rowcount == 1:
                nxt.claim = Claim(
                    run_id=claim.run_id,
                    workflow_id=claim.workflow_id,
                    trigger_type=claim.trigger_type,
                    run_input=claim.run_input,
                    definition=claim.definition,
                    position=position,
                    attempt=1,
                    started_at=now,
                    results=claim.results,
                )
        elif run.status != "running":
            # Cancelled (or otherwise ended) while the step ran: its result stands, nothing follows.
            if will_retry:
                session.execute(
                    _update_steps()
                    .where(StepRun.run_id == claim.run_id, StepRun.step_id == claim.step_id)
                    .values(status="error", completed_at=now, duration_ms=duration_ms(started, now))
                )
        elif will_retry:
            delay = backoff_ms(retry, claim.attempt, outcome.retry_after_ms)
            session.execute(
                _update_steps()
                .where(StepRun.run_id == claim.run_id, StepRun.step_id == claim.step_id)
                .values(attempt=claim.attempt + 1, queued_at=now + timedelta(milliseconds=delay))
            )
            nxt.enqueue = (claim.run_id, claim.step_id, claim.attempt + 1, delay)
        elif outcome.status == "error":
            _skip_after(session, claim.run_id, claim.position, now)
            _finish_run(run, "failed", now, error={"code": "STEP_ERROR", "message": outcome.error["message"]})
        else:
            # The last step succeeded (or was skipped): the run completes.
            claim.results[claim.step_id] = {"output": outcome.output, "status": outcome.status}
            _complete(run, claim, now)
        session.commit()
    if nxt.enqueue is not None:
        services.queue.enqueue(*nxt.enqueue)
    return nxt


def _finish_run(run: Run, status: str, now: Any, *, output: Any = None, error: dict | None = None) -> None:
    run.status = status
    run.completed_at = now
    run.duration_ms = duration_ms(run.started_at, now)
    run.output = output
    run.error = error


def _complete(run: Run, claim: Claim, now: Any) -> None:
    mapping = claim.definition.get("output")
    if mapping is None:
        executed = [r for r in (claim.results.get(s["id"]) for s in claim.definition["steps"]) if r]
        ran = [r for r in executed if r["status"] == "success"]
        _finish_run(run, "completed", now, output=ran[-1]["output"] if ran else None)
        return
    try:
        output = templating.render(mapping, claim.template_context(), "output")
    except templating.TemplateError as exc:
        _finish_run(run, "failed", now, error={"code": "OUTPUT_ERROR", "message": str(exc)})
        return
    _finish_run(run, "completed", now, output=output)


def _record_wait(
    session: Session, services: Services, run: Run, claim: Claim, outcome: StepOutcome, started: Any, now: Any
) -> Next:
    """A delay or approval: the step waits in the database, holding no worker thread."""
    parked = _update_running(
        session,
        claim,
        status="waiting",
        input=outcome.input,
        started_at=started,
        queued_at=outcome.wait_until,
        lease_expires_at=None,
    )
    if not parked or run.status != "running":
        session.rollback()
        return Next()
    if outcome.suspend:
        run.status = "suspended"
    session.commit()
    if outcome.wait_until is not None and not outcome.suspend:
        delay = max(0, int((outcome.wait_until - now).total_seconds() * 1000))
        services.queue.enqueue(claim.run_id, claim.step_id, claim.attempt, delay)
    return Next()


def _time_out(session: Session, run: Run, now: Any) -> None:
    run.status = "timeout"
    run.completed_at = now
    run.duration_ms = duration_ms(run.started_at, now)
    run.error = {"code": "RUN_TIMEOUT", "message": "Run exceeded its timeoutMs"}
    _skip_unreached(session, run.id, now)


def resume_run(services: Services, company_id: str, run_id: str, approved: bool, data: Any) -> Run:
    """Answer a suspended run's approval: continue with ``data`` as the step output, or fail it."""
    with services.db.session() as session:
        run = _lock_run(session, run_id, with_input=True)
        if run is None or run.company_id != company_id:
            raise NotFound("Run not found")
        if run.status != "suspended":
            raise InvalidState("Can only resume suspended runs")
        row = (
            session.execute(
                select(StepRun)
                .where(StepRun.run_id == run.id, StepRun.status == "waiting")
                .order_by(StepRun.position)
            )
            .scalars()
            .first()
        )
        if row is None:
            raise InvalidState("Can only resume suspended runs")
        now = utcnow()
        definition = definition_for(session, run.workflow_id, run.workflow_version)
        status = "success" if approved else "error"
        error = None if approved else {"code": "APPROVAL_REJECTED", "message": "Approval was rejected"}
        output = data if approved else None
        row.status, row.output, row.error = status, output, error
        row.completed_at, row.duration_ms = now, duration_ms(row.started_at, now)
        _log_attempt(
            session, row, status, row.started_at, now, step_input=row.input, output=output, error=error
        )
        enqueue = None
        if not approved:
            _skip_after(session, run.id, row.position, now)
            _finish_run(run, "failed", now, error=error)
        else:
            run.status = "running"
            position = row.position + 1
            if position < len(definition["steps"]):
                next_id = definition["steps"][position]["id"]
                session.execute(
                    _update_steps()
                    .where(StepRun.run_id == run.id, StepRun.step_id == next_id, StepRun.status == "pending")
                    .values(status="queued", attempt=1, queued_at=now)
                )
                enqueue = (run.id, next_id, 1)
            else:
                rows = step_runs(session, run.id)
                claim = Claim(
                    run_id=run.id,
                    workflow_id=run.workflow_id,
                    trigger_type=run.trigger_type,
                    run_input=run.input,
                    definition=definition,
                    position=row.position,
                    attempt=row.attempt,
                    started_at=row.started_at,
                    results={
                        r.step_id: {"output": r.output, "status": r.status}
                        for r in rows
                        if r.status in FINISHED_STEP
                    },
                )
                claim.results[row.step_id] = {"output": output, "status": "success"}
                _complete(run, claim, now)
        session.commit()
    if enqueue:
        services.queue.enqueue(*enqueue)
    return run


# --------------------------------------------------------------------------- recovery sweeps

STUCK_QUEUED = timedelta(seconds=60)
ACTIVE = ("pending", "running", "suspended")


def sweep(services: Services, now: Any = None) -> dict[str, int]:
    """One pass of the recovery sweeps (DESIGN §5.7); safe to run from several processes."""
    now = now or utcnow()
    with services.db.session() as session:
        return {
            "timedOut": _sweep_timeouts(services, session, now),
            "approvalsExpired": _sweep_approvals(session, now),
            "requeued": _sweep_lost_messages(services, session, now),
            "leasesExpired": _sweep_dead_workers(services, session, now),
        }


def _lock_step(session: Session, run_id: str, step_id: str) -> tuple[Run | None, StepRun]:
    run = _lock_run(session, run_id)
    row = session.execute(
        select(StepRun).where(StepRun.run_id == run_id, StepRun.step_id == step_id)
    ).scalar_one()
    return run, row


def _fail_step(
    session: Session, run: Run, row: StepRun, error: dict[str, str], now: Any, run_code: str
) -> None:
    """End a step in error, record the attempt, skip what follows and fail the run."""
    row.status, row.error, row.completed_at, row.lease_expires_at = "error", error, now, None
    row.duration_ms = duration_ms(row.started_at, now)
    _log_attempt(session, row, "error", row.started_at, now, step_input=row.input, error=error)
    _skip_after(session, run.id, row.position, now)
    _finish_run(run, "failed", now, error={"code": run_code, "message": error["message"]})


def _sweep_timeouts(services: Services, session: Session, now: Any) -> int:
    """Runs past their deadline end ``timeout``, even when no worker is looking at them."""
    overdue = (
        session.execute(select(Run.id).where(Run.status.in_(ACTIVE), Run.deadline_at <= now).limit(500))
        .scalars()
        .all()
    )
    count = 0
    for run_id in overdue:
        run = _lock_run(session, run_id)
        if run is not None and run.status in ACTIVE:
            _time_out(session, run, now)
            count += 1
        session.commit()
        services.redis.set(services.cancel_key(run_id), "1", ex=CANCEL_FLAG_TTL_S)
    return count


def _sweep_approvals(session: Session, now: Any) -> int:
    """Approvals past their ``timeoutMs`` fail the run with APPROVAL_TIMEOUT."""
    expired = session.execute(
        select(StepRun.run_id, StepRun.step_id)
        .join(Run, Run.id == StepRun.run_id)
        .where(Run.status == "suspended", StepRun.status == "waiting", StepRun.queued_at <= now)
        .limit(500)
    ).all()
    count = 0
    for run_id, step_id in expired:
        run, row = _lock_step(session, run_id, step_id)
        if run is not None and run.status == "suspended" and row.status == "waiting":
            error = {"code": "APPROVAL_TIMEOUT", "message": "No approval before the step's timeoutMs"}
            _fail_step(session, run, row, error, now, "APPROVAL_TIMEOUT")
            count += 1
        session.commit()
    return count


def _sweep_lost_messages(services: Services, session: Session, now: Any) -> int:
    """Queued steps with no progress (enqueue failed after commit, Redis restarted) are sent again."""
    stuck = session.execute(
        select(StepRun.id, StepRun.run_id, StepRun.step_id, StepRun.attempt)
        .join(Run, Run.id == StepRun.run_id)
        .where(
            Run.status.in_(("pending", "running")),
            StepRun.status == "queued",
            StepRun.queued_at <= now - STUCK_QUEUED,
        )
        .limit(500)
    ).all()
    for row_id, run_id, step_id, attempt in stuck:
        session.execute(_update_steps().where(StepRun.id == row_id).values(queued_at=now))
        session.commit()
        services.queue.enqueue(run_id, step_id, attempt)
    return len(stuck)


def _sweep_dead_workers(services: Services, session: Session, now: Any) -> int:
    """A step whose lease expired (its worker died) gets a new attempt, or fails with WORKER_LOST."""
    lost = session.execute(
        select(StepRun.run_id, StepRun.step_id)
        .where(StepRun.status == "running", StepRun.lease_expires_at <= now)
        .limit(500)
    ).all()
    count = 0
    for run_id, step_id in lost:
        run, row = _lock_step(session, run_id, step_id)
        if run is None or row.status != "running" or row.lease_expires_at > now:
            session.rollback()
            continue
        definition = definition_for(session, run.workflow_id, run.workflow_version)
        error = {"code": "WORKER_LOST", "message": "The worker executing this step stopped"}
        attempts = definition["steps"][row.position]["retry"]["maxAttempts"]
        enqueue = None
        if run.status == "running" and row.attempt < attempts:
            _log_attempt(session, row, "error", row.started_at, now, step_input=row.input, error=error)
            row.status, row.attempt, row.queued_at, row.lease_expires_at = (
                "queued",
                row.attempt + 1,
                now,
                None,
            )
            enqueue = (run_id, step_id, row.attempt)
        elif run.status == "running":
            _fail_step(session, run, row, error, now, "STEP_ERROR")
        else:
            row.status, row.error, row.completed_at, row.lease_expires_at = "error", error, now, None
            _log_attempt(session, row, "error", row.started_at, now, step_input=row.input, error=error)
        session.commit()
        if enqueue:
            services.queue.enqueue(*enqueue)
        count += 1
    return count
