"""Cron schedules: fire time arithmetic (DST-aware) and firing exactly once per fire time."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.timeutil import utcnow

logger = logging.getLogger("baton.scheduler")


def _seconds_first(cron: str) -> bool:
    return len(cron.split()) == 6


def check(cron: str, tz: str) -> str | None:
    """A readable problem with a schedule, or None when it is valid."""
    if len(cron.split()) not in (5, 6):
        return "cron needs 5 fields (minute hour day month weekday) or 6 (with seconds first)"
    if not croniter.is_valid(cron, second_at_beginning=_seconds_first(cron)):
        return f"invalid cron expression {cron!r}"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown timezone {tz!r}"
    try:
        next_fire(cron, tz, utcnow())
    except CroniterBadDateError:
        return f"cron expression {cron!r} never fires (no such date)"
    return None


def _fixed_hour(cron: str) -> bool:
    fields = cron.split()
    hour = fields[2] if _seconds_first(cron) else fields[1]
    return "*" not in hour and "/" not in hour


def _second_pass(candidate: datetime, zone: ZoneInfo) -> bool:
    """``candidate`` is the second pass of a local time the clock went through twice (fall back)."""
    naive = candidate.replace(tzinfo=None)
    first, second = naive.replace(tzinfo=zone, fold=0), naive.replace(tzinfo=zone, fold=1)
    return first.utcoffset() != second.utcoffset() and candidate.astimezone(
        timezone.utc
    ) == second.astimezone(timezone.utc)


def next_fire(cron: str, tz: str, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (UTC), as cron users expect across DST.

    Spring forward: a time that does not exist fires at the jump (like Vixie cron). Fall back:
    a job at a fixed hour fires once, not again in the repeated hour.
    """
    zone = ZoneInfo(tz)
    it = croniter(cron, after.astimezone(zone), second_at_beginning=_seconds_first(cron))
    candidate = it.get_next(datetime)
    if _fixed_hour(cron):
        while _second_pass(candidate, zone):
            candidate = it.get_next(datetime)
    return candidate.astimezone(timezone.utc)


def latest_fire(cron: str, tz: str, now: datetime) -> datetime:
    """The most recent fire time at or before ``now`` (UTC), the same times ``next_fire`` gives.

    croniter's previous match is reckoned in local time, which is off by the DST shift around
    a repeated hour; walking forward with ``next_fire`` from just before it settles that.
    """
    local = now.astimezone(ZoneInfo(tz)) + timedelta(microseconds=1)
    approx = croniter(cron, local, second_at_beginning=_seconds_first(cron)).get_prev(datetime)
    approx = approx.astimezone(timezone.utc)
    fire = None
    cursor = approx - timedelta(hours=3) if approx > now else approx - timedelta(microseconds=1)
    for _ in range(20_000):  # a few steps, except right after a DST shift of a per-second cron
        following = next_fire(cron, tz, cursor)
        if following > now:
            break
        fire = cursor = following
    return fire or approx


def sync(
    session: Session, workflow: Any, definition: dict[str, Any] | None, now: datetime | None = None
) -> None:
    """Keep the ``schedules`` row in step with a workflow's current definition."""
    from models import Schedule

    spec = ((definition or {}).get("triggers") or {}).get("schedule")
    row = session.get(Schedule, workflow.key)
    if not spec or workflow.deleted_at is not None:
        if row is not None:
            session.execute(delete(Schedule).where(Schedule.workflow_key == workflow.key))
        return
    now = now or utcnow()
    tz = spec.get("timezone", "UTC")
    if row is None:
        row = Schedule(workflow_key=workflow.key, company_id=workflow.company_id)
        session.add(row)
    row.cron, row.timezone, row.input = spec["cron"], tz, spec.get("input") or {}
    row.next_run_at = next_fire(spec["cron"], tz, now)


def fire_due(services: Any, now: datetime | None = None) -> int:
    """Fire every due schedule once for its most recent fire time; safe from several schedulers.

    Each fire time is an idempotency key of the run, so two schedulers (or a repeat after a crash)
    make one run; after downtime only the latest missed time fires, not a storm. No transaction is
    held while a run is triggered: on SQLite, whose writers take the one database lock, the
    trigger's own transaction would wait on it and time out (no schedule would ever fire).
    """
    from models import Schedule, Workflow

    now = now or utcnow()
    with services.db.session() as session:
        due = session.execute(
            select(
                Schedule.workflow_key,
                Workflow.id.label("workflow_id"),
                Schedule.company_id,
                Schedule.input,
                Schedule.cron,
                Schedule.timezone,
            )
            .join(Workflow, Workflow.key == Schedule.workflow_key)
            .where(Schedule.next_run_at <= now)
            .limit(100)
        ).all()
    fired = 0
    for row in due:
        fire_at = latest_fire(row.cron, row.timezone, now)
        fired += _fire(services, row, fire_at)
        # The run is committed first: a crash here fires the same time again, which its key dedupes.
        with services.db.session() as session:
            session.execute(
                update(Schedule)
                .where(Schedule.workflow_key == row.workflow_key, Schedule.next_run_at <= now)
                .values(last_fire_at=fire_at, next_run_at=next_fire(row.cron, row.timezone, now))
            )
            session.commit()
    return fired


def _fire(services: Any, row: Any, fire_at: datetime) -> int:
    """Trigger one schedule's run for ``fire_at``: 1 when created, 0 for a repeat or a refusal."""
    from app import engine
    from app.errors import BatonError

    try:
        _run, created = engine.trigger_run(
            services,
            row.company_id,
            row.workflow_id,
            row.input,
            "schedule",
            idempotency_key=f"schedule:{fire_at.isoformat()}",
        )
    except BatonError as exc:
        logger.warning("schedule of %s could not fire: %s", row.workflow_id, exc.message)
        return 0
    return int(created)
