"""Triggering: a pending run and its steps in one commit, then the first step's message; and
the idempotency that trigger, retry and restart share (DESIGN §5.1)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import events, metrics
from app.db import autocommitted
from app.engine import concurrency, outbox
from app.engine import statements as sql
from app.engine import transitions as move
from app.engine.graph import graph
from app.engine.reads import WorkflowRef, definition_for, workflow_ref
from app.engine.states import STUCK_AFTER
from app.errors import Conflict
from app.errors import ValidationError as BatonValidationError
from app.ids import new_id
from app.services import Services
from app.timeutil import utcnow
from models import Run, StepRun
from models.states import RunStatus, StepStatus

logger = logging.getLogger("baton.engine")
# New runs and all their steps in one statement, whatever their number: the per-run values travel
# as arrays, and the steps' foreign key is checked at the end of the statement, after both inserts.
_INSERT_RUNS_AND_STEPS = text(
    """
    WITH new_runs AS (
        INSERT INTO runs (id, company_id, workflow_key, workflow_id, workflow_version, status,
                          trigger_type, input, created_at, deadline_at, idempotency_key,
                          idempotency_hash, concurrency_key, slot)
        SELECT t.id, :company_id, :workflow_key, :workflow_id, :version, :status, :trigger_type,
               CAST(t.input AS jsonb), :now, :deadline, t.ikey, t.ihash, t.ckey,
               CASE WHEN t.ckey IS NOT NULL THEN :waiting END
        FROM unnest(CAST(:ids AS text[]), CAST(:inputs AS text[]), CAST(:ikeys AS text[]),
                    CAST(:ihashes AS text[]), CAST(:ckeys AS text[])) AS t(id, input, ikey, ihash, ckey)
        RETURNING id
    )
    INSERT INTO step_runs (run_id, step_id, position, status, attempt, queued_at, reused)
    SELECT r.id, s.step_id, s.position,
           CASE WHEN s.position = ANY(CAST(:starts AS int[])) THEN :queued ELSE :pending END,
           CASE WHEN s.position = ANY(CAST(:starts AS int[])) THEN 1 ELSE 0 END,
           CASE WHEN s.position = ANY(CAST(:starts AS int[])) THEN CAST(:now AS timestamptz) END,
           false
    FROM new_runs AS r
    CROSS JOIN unnest(CAST(:step_ids AS text[]), CAST(:positions AS int[])) AS s(step_id, position)
    """
)

# One trigger of a workflow version this process has already read (a ``_Plan``): the run and its
# steps in one statement, sent in autocommit (one round trip, one commit). It inserts nothing when
# the workflow has moved on since (a new version, deleted) or the Idempotency-Key is taken; the
# general path then decides, as it did before there was a plan.
_INSERT_RUN_IF_CURRENT = f"""
WITH run AS (
    INSERT INTO runs (id, company_id, workflow_key, workflow_id, workflow_version, status,
                      trigger_type, input, created_at, deadline_at, idempotency_key, idempotency_hash)
    SELECT %s, %s, w.key, w.id, w.current_version, '{RunStatus.PENDING.value}', %s,
           CAST(%s AS jsonb), %s, %s, %s, %s
    FROM workflows AS w
    WHERE w.key = %s AND w.current_version = %s AND w.deleted_at IS NULL
    ON CONFLICT (workflow_key, idempotency_key) DO NOTHING
    RETURNING id, created_at
)
INSERT INTO step_runs (run_id, step_id, position, status, attempt, queued_at, reused)
SELECT run.id, s.step_id, s.n - 1,
       CASE WHEN s.n = 1 THEN '{StepStatus.QUEUED.value}' ELSE '{StepStatus.PENDING.value}' END,
       CASE WHEN s.n = 1 THEN 1 ELSE 0 END,
       CASE WHEN s.n = 1 THEN run.created_at END,
       false
FROM run CROSS JOIN unnest(string_to_array(%s, ',')) WITH ORDINALITY AS s(step_id, n)
"""
IDEMPOTENCY_TTL = timedelta(hours=24)
Build = Callable[[Session], tuple["Run | NewRun", list[str]]]


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a trigger needs of a workflow's current version, as this process last read it."""

    key: str
    id: str
    current_version: int
    step_ids: list[str]
    timeout_ms: int | None
    step_list: str  # the step ids, comma-joined (a step id has no comma: app.definition)


# (company id, workflow id) -> its plan. No expiry: the insert checks the version it names is
# still the current one, and a miss reads the workflow again.
_plans: dict[tuple[str, str], _Plan] = {}
_MAX_PLANS = 10_000


def _remember(company_id: str, ref: WorkflowRef, definition: dict[str, Any]) -> None:
    steps = [step["id"] for step in definition["steps"]]
    if any("," in step for step in steps):  # not a valid step id; the general path takes it
        return
    if not graph(definition).linear:  # the planned statement queues the first step only
        return
    if definition.get("concurrency") is not None:  # its runs wait for a slot (``concurrency``)
        return
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[(company_id, ref.id)] = _Plan(
        ref.key, ref.id, ref.current_version, steps, definition.get("timeoutMs"), ",".join(steps)
    )


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def trigger_run(
    services: Services,
    company_id: str,
    workflow_id: str,
    run_input: Any,
    trigger_type: str,
    *,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> tuple[Run | NewRun, bool]:
    """Insert a pending run and its steps, commit, then enqueue the first step.

    Returns the run and whether it was created (False: an idempotent repeat). ``fingerprint``
    replaces the request hash when a repeat may differ in body yet be the same (a webhook delivery).
    """
    if not isinstance(run_input, dict):
        raise BatonValidationError("input must be a JSON object", details={"input": ["Not a valid object."]})
    if idempotency_key:
        fingerprint = fingerprint or request_hash({"input": run_input, "triggerType": trigger_type})
    plan = None if services.db.is_sqlite else _plans.get((company_id, workflow_id))
    if plan is not None:
        fast = _insert_planned(
            services, plan, company_id, run_input, trigger_type, idempotency_key, fingerprint
        )
        if fast is not None:
            _after_commit(services, fast, plan.step_ids[0])
            return fast, True
    found: list[WorkflowRef] = []

    def workflow(session: Session) -> WorkflowRef:
        """Looked up once per request, by whichever needs it first."""
        if not found:
            found.append(workflow_ref(session, company_id, workflow_id))
        return found[0]

    def build(session: Session) -> tuple[Run | NewRun, list[str]]:
        ref = workflow(session)
        definition = definition_for(session, ref.key, ref.current_version)
        run = new_run(company_id, ref, definition, run_input, trigger_type, utcnow())
        # The key goes in with the row (create_run sets it on the object too, which stays unsaved).
        if idempotency_key:
            run.idempotency_key, run.idempotency_hash = idempotency_key, fingerprint
        starts = first_steps(definition) if run.concurrency_key is None else []
        insert_new_runs(session, [run], definition, run.created_at)
        events.note_created(session, run, [first_step_row(step_id) for step_id in starts])
        move.admit_new(session, [run], run.created_at)
        if not services.db.is_sqlite:
            _remember(company_id, ref, definition)
        return run, starts

    return create_run(
        services, idempotency_key, fingerprint or "", build, lambda session: workflow(session).key
    )


def _insert_planned(
    services: Services,
    plan: _Plan,
    company_id: str,
    run_input: dict[str, Any],
    trigger_type: str,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> NewRun | None:
    """The run of ``plan``'s version in one autocommitted statement; None when nothing was inserted
    (the plan is stale, or the key is taken: the general path decides)."""
    run = new_run(company_id, plan, {"timeoutMs": plan.timeout_ms}, run_input, trigger_type, utcnow())
    if idempotency_key:
        run.idempotency_key, run.idempotency_hash = idempotency_key, fingerprint
    # Positional (psycopg adapts a tuple in half a dict's time), and the step ids as one string:
    # together a seventh of the adaptation time of named parameters with a text[] (measured).
    params = (
        run.id,
        company_id,
        trigger_type,
        json.dumps(run_input),
        run.created_at,
        run.deadline_at,
        run.idempotency_key,
        run.idempotency_hash,
        plan.key,
        plan.current_version,
        plan.step_list,
    )
    # The driver's own connection: one statement needs no ORM session, and autocommit makes it
    # one round trip (no BEGIN, no COMMIT).
    inserted = autocommitted(services.db, _INSERT_RUN_IF_CURRENT, params, lambda cursor: cursor.rowcount)
    if inserted:
        return run
    _plans.pop((company_id, plan.id), None)
    return None


def _after_commit(services: Services, run: NewRun, first_step: str) -> None:
    """Count the run, publish its creation and send its first step: one Redis round trip when the
    broker is the events' Redis; a step the broker did not take is left to the sweep."""
    metrics.run_started(run.workflow_id)
    created = events.created(run, [first_step_row(first_step)])
    publisher = events.publisher_for(services.db)
    step = (run.id, first_step, 1, run.company_id)
    pipe = None
    if publisher is not None and not publisher.shipping:  # a shipping process keeps its events' order
        pipe = services.queue.shared_pipeline(publisher.redis)
    if publisher is None or pipe is None:
        if publisher is not None:
            publisher.publish(created)
        sent = send_or_leave_to_sweep(services, run.id, first_step, 1, company_id=run.company_id)
    else:
        publisher.stage(pipe, created)
        staged = services.queue.stage(pipe, [step])
        try:
            results = pipe.execute(raise_on_error=False)
        except Exception as exc:  # Redis is unreachable: neither went
            logger.warning("could not enqueue %s/%s; the sweep will send it: %s", run.id, first_step, exc)
            publisher.staged_result(created, exc)
            sent = False
        else:
            publisher.staged_result(created, results[0])
            sent = services.queue.staged_results(staged, results[1:])[0]
    if not sent:
        _mark_unsent(services, run.id, first_step, 1)


@dataclass(slots=True)
class NewRun:
    """A run being triggered, as the API and the events show it: a plain object, since building an
    ORM instance per run cost a batch of 1,000 about a fifth of its time (profiled)."""

    id: str
    company_id: str
    workflow_key: str
    workflow_id: str
    workflow_version: int
    trigger_type: str
    input: Any
    created_at: datetime
    deadline_at: datetime | None
    idempotency_key: str | None = None
    idempotency_hash: str | None = None
    status: RunStatus = RunStatus.PENDING
    output: Any = None
    error: Any = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    restarted_from_run_id: str | None = None
    restart_from_step_id: str | None = None
    concurrency_key: str | None = None  # its group when the workflow limits concurrency
    slot: str | None = None


def new_run(
    company_id: str,
    workflow: WorkflowRef,
    definition: dict[str, Any],
    run_input: Any,
    trigger_type: str,
    now: datetime,
    run_id: str | None = None,
) -> NewRun:
    """A pending run of the workflow's current version, still to be inserted (insert_new_runs)."""
    timeout = definition.get("timeoutMs")
    group = concurrency.group_of(definition, workflow.key, run_input)
    return NewRun(
        concurrency_key=group,
        slot=concurrency.WAITING if group is not None else None,
        id=run_id or new_id("run"),
        company_id=company_id,
        workflow_key=workflow.key,
        workflow_id=workflow.id,
        workflow_version=workflow.current_version,
        trigger_type=trigger_type,
        input=run_input,
        created_at=now,
        deadline_at=now + timedelta(milliseconds=timeout) if timeout else None,
    )


def first_steps(definition: dict[str, Any]) -> list[str]:
    """The steps a new run starts with: the first, or every step that needs none (``graph``)."""
    shape = graph(definition)
    return [shape.ids[i] for i in shape.roots]


def first_step_row(step_id: str) -> dict[str, Any]:
    """What ``events.note_created`` needs of a new run's queued first step."""
    return {"step_id": step_id, "status": StepStatus.QUEUED, "attempt": 1}


def create_run(
    services: Services,
    idempotency_key: str | None,
    fingerprint: str,
    build: Build,
    scope: Callable[[Session], str],
) -> tuple[Run | NewRun, bool]:
    """Shared by trigger, retry and restart: idempotency, one commit, then enqueue the first step.

    ``scope`` names the workflow row an Idempotency-Key belongs to (asked only when one is given).
    """
    with services.db.session() as session:
        workflow_key = scope(session) if idempotency_key else ""
        if idempotency_key:
            existing = idempotent_run(session, workflow_key, idempotency_key, fingerprint)
            if existing is not None:
                return existing, False
        try:
            run, starts = build(session)
            if idempotency_key:
                run.idempotency_key, run.idempotency_hash = idempotency_key, fingerprint
            session.commit()
            outbox.flush(services, session)
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            session.rollback()
            if not idempotency_key:
                raise
            existing = idempotent_run(session, workflow_key, idempotency_key, fingerprint)
            if existing is None:
                raise
            return existing, False
    metrics.run_started(run.workflow_id)
    for step_id in starts:
        if not send_or_leave_to_sweep(services, run.id, step_id, 1, company_id=run.company_id):
            _mark_unsent(services, run.id, step_id, 1)
    return run, True


def send_or_leave_to_sweep(
    services: Services, run_id: str, step_id: str, attempt: int, delay_ms: int = 0, *, company_id: str
) -> bool:
    """The step is committed (queued or waiting); if the broker is down, the sweep sends it later."""
    try:
        services.queue.enqueue(run_id, step_id, attempt, delay_ms, company_id)
        return True
    except Exception:  # any broker failure: the row is the source of truth
        logger.warning("could not enqueue %s/%s; the sweep will send it", run_id, step_id, exc_info=True)
        return False


def _mark_unsent(services: Services, run_id: str, step_id: str, attempt: int) -> None:
    """Backdate the step so the first sweep that can reach the broker sends it, not 30 s later."""
    try:
        with services.db.session() as session:
            session.execute(
                sql.update_steps()
                .where(
                    StepRun.run_id == run_id,
                    StepRun.step_id == step_id,
                    StepRun.attempt == attempt,
                    StepRun.status == StepStatus.QUEUED,
                )
                .values(queued_at=utcnow() - STUCK_AFTER)
            )
            session.commit()
    except Exception:  # the sweep still finds it, STUCK_AFTER later
        logger.warning("could not mark %s/%s unsent", run_id, step_id, exc_info=True)


def insert_run(
    session: Session,
    company_id: str,
    workflow_key: str,
    workflow_id: str,
    version: int,
    definition: dict[str, Any],
    run_input: Any,
    trigger_type: str,
    *,
    start: int = 0,
    rerun: set[int] | None = None,
    reused: dict[str, StepRun] | None = None,
    restarted_from: str | None = None,
) -> tuple[Run, list[str]]:
    """A pending run whose steps outside ``rerun`` (default: from ``start`` on) are copies of
    ``reused`` and the rest still to run; with the ids of the steps it starts with (queued)."""
    now = utcnow()
    timeout = definition.get("timeoutMs")
    group = concurrency.group_of(definition, workflow_key, run_input)
    run = Run(
        concurrency_key=group,
        slot=concurrency.WAITING if group is not None else None,
        id=new_id("run"),
        company_id=company_id,
        workflow_key=workflow_key,
        workflow_id=workflow_id,
        workflow_version=version,
        status=RunStatus.PENDING,
        trigger_type=trigger_type,
        input=run_input,
        created_at=now,
        deadline_at=now + timedelta(milliseconds=timeout) if timeout else None,
        restarted_from_run_id=restarted_from,
        restart_from_step_id=definition["steps"][start]["id"] if restarted_from else None,
    )
    session.add(run)
    session.flush()
    shape = graph(definition)
    to_run = rerun if rerun is not None else set(range(start, len(shape.ids)))
    # Steps to run whose needs are all reused start at once (a chain: the restart step alone).
    starts = {i for i in to_run if not set(shape.needs[i]) & to_run} if group is None else set()
    rows = [
        _step_row(run.id, index, step, index in starts, index not in to_run, now, reused)
        for index, step in enumerate(definition["steps"])
    ]
    session.execute(insert(StepRun), rows)
    events.note_created(session, run, rows)
    move.admit_new(session, [run], now)
    return run, [shape.ids[i] for i in sorted(starts)]


def insert_new_runs(session: Session, runs: list[NewRun], definition: dict[str, Any], now: datetime) -> None:
    """New runs of one workflow version (from :func:`new_run`) and all their steps, each run's first
    steps queued: one statement on PostgreSQL, no ORM flush."""
    shape = graph(definition)
    # A run of a workflow with a concurrency limit waits with nothing queued until admitted.
    step_ids = list(shape.ids)
    starts = list(shape.roots) if definition.get("concurrency") is None else []
    if session.get_bind().dialect.name != "postgresql":
        _insert_portable(session, runs, step_ids, starts, now)
        return
    first = runs[0]
    session.execute(
        _INSERT_RUNS_AND_STEPS,
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
            "ckeys": [run.concurrency_key for run in runs],
            "waiting": concurrency.WAITING,
            "queued": StepStatus.QUEUED.value,
            "pending": StepStatus.PENDING.value,
            "step_ids": step_ids,
            "positions": list(range(len(step_ids))),
            "starts": starts,
        },
    )


def _insert_portable(
    session: Session, runs: list[NewRun], step_ids: list[str], starts: list[int], now: datetime
) -> None:
    """SQLite (the embedded default): the same rows through executemany."""
    columns = [c.key for c in Run.__table__.columns]
    session.execute(insert(Run), [{name: getattr(run, name) for name in columns} for run in runs])
    steps = [
        {
            "run_id": run.id,
            "step_id": step_id,
            "position": position,
            "status": StepStatus.QUEUED if position in starts else StepStatus.PENDING,
            "attempt": 1 if position in starts else 0,
            "queued_at": now if position in starts else None,
            "reused": False,
        }
        for run in runs
        for position, step_id in enumerate(step_ids)
    ]
    session.execute(insert(StepRun), steps)


def _step_row(
    run_id: str,
    index: int,
    step: dict[str, Any],
    first: bool,
    copied: bool,
    now: datetime,
    reused: dict[str, StepRun] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": run_id,
        "step_id": step["id"],
        "position": index,
        "status": StepStatus.QUEUED if first else StepStatus.PENDING,
        "attempt": 1 if first else 0,
        "queued_at": now if first else None,
        "reused": False,
    }
    if copied and reused is not None:
        old = reused[step["id"]]
        columns = (
            "status",
            "attempt",
            "input",
            "output",
            "error",
            "started_at",
            "completed_at",
            "duration_ms",
        )
        row.update({name: getattr(old, name) for name in columns}, reused=True)
    return row


def idempotent_run(session: Session, workflow_key: str, key: str, fingerprint: str | None) -> Run | None:
    """The run an Idempotency-Key already made (24 h), or None; a different request is 409."""
    existing = session.execute(
        select(Run).where(Run.workflow_key == workflow_key, Run.idempotency_key == key)
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
