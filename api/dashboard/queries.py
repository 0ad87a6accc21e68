"""The dashboard's reads: filtered run pages, restart lineage, workflows and the overview's figures."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, Select, and_, cast, func, select
from sqlalchemy.orm import Session

from api.pagination import meta, page
from app.timeutil import utcnow
from models import Run, RunStatus, StepRun, StepStatus, WebhookDelivery, Workflow, WorkflowVersion

RANGES = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "24h": timedelta(days=1),
    "7d": timedelta(days=7),
}
# Most recent finished runs looked at for the duration percentiles (bounded work on a big history).
DURATION_SAMPLE = 20_000


@dataclass(frozen=True)
class RunFilters:
    """The runs list's filters, as the query string names them."""

    workflow_id: str | None = None
    status: str | None = None
    trigger_type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def apply(self, query: Select) -> Select:
        if self.workflow_id:
            query = query.where(Run.workflow_id == self.workflow_id)
        if self.status:
            query = query.where(Run.status == RunStatus(self.status))
        if self.trigger_type:
            query = query.where(Run.trigger_type == self.trigger_type)
        if self.created_after:
            query = query.where(Run.created_at >= self.created_after)
        if self.created_before:
            query = query.where(Run.created_at < self.created_before)
        return query


def runs_page(
    session: Session, company_id: str, filters: RunFilters, cursor: str | None, limit: int = 50
) -> tuple[list[Run], dict[str, Any]]:
    """One page of a company's runs, newest first, with the API's keyset cursor."""
    query = filters.apply(select(Run).where(Run.company_id == company_id))
    rows = list(session.execute(page(query, Run.created_at, Run.id, cursor, limit)).scalars())
    return meta(rows, limit)


def children(session: Session, company_id: str, run_id: str) -> list[Run]:
    """Runs restarted or retried from this one, newest first."""
    query = (
        select(Run)
        .where(Run.company_id == company_id, Run.restarted_from_run_id == run_id)
        .order_by(Run.created_at.desc(), Run.id.desc())
        .limit(100)
    )
    return list(session.execute(query).scalars())


def workflow_names(session: Session, company_id: str) -> dict[str, str]:
    """Public id → name of the company's live workflows."""
    query = (
        select(Workflow.id, Workflow.name)
        .where(Workflow.company_id == company_id, Workflow.deleted_at.is_(None))
        .order_by(Workflow.name)
        .limit(1000)
    )
    return {workflow_id: name for workflow_id, name in session.execute(query)}


def names_by_key(session: Session, workflow_keys: set[str]) -> dict[str, str]:
    """Workflow row key → name (runs point at the exact row, even a deleted one)."""
    if not workflow_keys:
        return {}
    query = select(Workflow.key, Workflow.name).where(Workflow.key.in_(workflow_keys))
    return {key: name for key, name in session.execute(query)}


def versions(session: Session, workflow: Workflow) -> list[WorkflowVersion]:
    query = (
        select(WorkflowVersion)
        .where(WorkflowVersion.workflow_key == workflow.key)
        .order_by(WorkflowVersion.version.desc())
    )
    return list(session.execute(query).scalars())


def last_runs(session: Session, workflow: Workflow, limit: int = 10) -> list[Run]:
    query = (
        select(Run)
        .where(Run.company_id == workflow.company_id, Run.workflow_key == workflow.key)
        .order_by(Run.created_at.desc(), Run.id.desc())
        .limit(limit)
    )
    return list(session.execute(query).scalars())


def deliveries(
    session: Session, workflow: Workflow, cursor: str | None, limit: int = 20
) -> tuple[list[WebhookDelivery], dict[str, Any]]:
    query = select(WebhookDelivery).where(
        WebhookDelivery.company_id == workflow.company_id, WebhookDelivery.workflow_key == workflow.key
    )
    rows = list(
        session.execute(page(query, WebhookDelivery.created_at, WebhookDelivery.id, cursor, limit)).scalars()
    )
    return meta(rows, limit)


@dataclass
class Overview:
    """The overview's figures over one window, in equal time buckets."""

    since: datetime
    until: datetime
    bucket: timedelta
    buckets: list[datetime]
    per_status: dict[str, list[int]]
    durations: list[tuple[str, float, float, int]]
    step_states: dict[str, int] = field(default_factory=dict)
    oldest_queued_at: datetime | None = None

    @property
    def finished(self) -> int:
        return sum(sum(self.per_status.get(s, [])) for s in ("completed", "failed", "timeout", "cancelled"))

    @property
    def failed(self) -> int:
        return sum(sum(self.per_status.get(s, [])) for s in ("failed", "timeout"))

    @property
    def total(self) -> int:
        return sum(sum(v) for v in self.per_status.values())

    def failure_rates(self) -> list[float | None]:
        """Per bucket: failed or timed-out runs over finished ones (None where none finished)."""
        rates: list[float | None] = []
        for i in range(len(self.buckets)):
            done = sum(self.per_status.get(s, [0] * (i + 1))[i] for s in ("completed", "failed", "timeout"))
            bad = sum(self.per_status.get(s, [0] * (i + 1))[i] for s in ("failed", "timeout"))
            rates.append(bad / done if done else None)
        return rates


WINDOWS = {
    "1h": (timedelta(hours=1), timedelta(minutes=5)),
    "24h": (timedelta(days=1), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(hours=6)),
}


def overview(session: Session, company_id: str, window: str, now: datetime | None = None) -> Overview:
    """Runs per status per bucket, duration percentiles per workflow, and the step queue right now."""
    span, bucket = WINDOWS[window]
    until = now or utcnow()
    # Buckets are aligned to multiples of their size, so a refresh keeps the same bars.
    step = int(bucket.total_seconds())
    end = datetime.fromtimestamp((int(until.timestamp()) // step + 1) * step, until.tzinfo)
    since = end - span
    buckets = [since + bucket * i for i in range(int(span / bucket))]
    slot = _epoch_seconds(session, Run.created_at) / step
    if session.get_bind().dialect.name == "postgresql":
        slot = func.floor(slot)
    slot = slot.label("slot")
    rows = session.execute(
        select(slot, Run.status, func.count())
        .where(Run.company_id == company_id, Run.created_at >= since)
        .group_by(slot, Run.status)
    )
    first = int(since.timestamp()) // step
    per_status: dict[str, list[int]] = defaultdict(lambda: [0] * len(buckets))
    for index, status, count in rows:
        per_status[str(status)][min(max(int(index) - first, 0), len(buckets) - 1)] += count
    result = Overview(since, end, bucket, buckets, dict(per_status), _durations(session, company_id, since))
    _queue(session, company_id, result)
    return result


def _epoch_seconds(session: Session, column: Any) -> Any:
    """A timestamp column as whole seconds since the epoch, in this database's dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", column)
    return cast(func.strftime("%s", column), Integer)


def _durations(session: Session, company_id: str, since: datetime) -> list[tuple[str, float, float, int]]:
    """(workflow, p50 ms, p95 ms, runs) of runs that completed in the window, slowest p95 first."""
    query = (
        select(Run.workflow_id, Run.duration_ms)
        .where(
            Run.company_id == company_id,
            Run.created_at >= since,
            Run.status == RunStatus.COMPLETED,
            Run.duration_ms.is_not(None),
        )
        .order_by(Run.created_at.desc())
        .limit(DURATION_SAMPLE)
    )
    by_workflow: dict[str, list[int]] = defaultdict(list)
    for workflow_id, duration in session.execute(query):
        by_workflow[workflow_id].append(duration)
    result = []
    for workflow_id, values in by_workflow.items():
        values.sort()
        if len(values) == 1:
            p50 = p95 = float(values[0])
        else:
            cuts = statistics.quantiles(values, n=100, method="inclusive")
            p50, p95 = cuts[49], cuts[94]
        result.append((workflow_id, p50, p95, len(values)))
    return sorted(result, key=lambda item: item[2], reverse=True)[:12]


def _queue(session: Session, company_id: str, into: Overview) -> None:
    """How many of the company's steps wait in the queue, run, or are parked; the oldest queued one."""
    shown = (StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING)
    query = (
        select(StepRun.status, func.count(), func.min(StepRun.queued_at))
        .join(Run, and_(Run.id == StepRun.run_id, Run.company_id == company_id))
        .where(StepRun.status.in_(shown))
        .group_by(StepRun.status)
    )
    into.step_states = {str(s): 0 for s in shown}
    for status, count, oldest in session.execute(query):
        into.step_states[str(status)] = count
        if status == StepStatus.QUEUED:
            into.oldest_queued_at = oldest
