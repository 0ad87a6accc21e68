"""Cron schedules: fire-time arithmetic with an injected clock (DST included), exactly-once firing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from sqlalchemy import func, select

from app import schedules
from models import Run, Schedule, Workflow
from tests.conftest import wait_for

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def test_weekday_mornings_in_a_timezone():
    # Saturday 2026-11-28 12:00 Berlin → next weekday 09:00 is Monday 30th, 08:00 UTC.
    assert schedules.next_fire("0 9 * * 1-5", "Europe/Berlin", local(2026, 11, 28, 12)) == utc(
        2026, 11, 30, 8
    )


def test_six_fields_have_seconds_first():
    assert schedules.next_fire("*/15 * * * * *", "UTC", utc(2026, 1, 1, 0, 0, 1)) == utc(2026, 1, 1, 0, 0, 15)
    assert schedules.check("* * * * * *", "UTC") is None
    assert schedules.check("61 * * * *", "UTC") is not None
    assert schedules.check("* * * *", "UTC") is not None
    assert schedules.check("* * * * *", "Nowhere/City") is not None


def test_spring_forward_fires_at_the_jump_once():
    # 2026-03-29: 02:00 → 03:00 in Berlin; 02:30 does not exist that day.
    fire = schedules.next_fire("30 2 * * *", "Europe/Berlin", local(2026, 3, 28, 12))
    assert fire == local(2026, 3, 29, 3, 0).astimezone(timezone.utc)
    after = schedules.next_fire("30 2 * * *", "Europe/Berlin", fire)
    assert after == local(2026, 3, 30, 2, 30).astimezone(timezone.utc)


def test_fall_back_fires_a_fixed_time_once():
    # 2026-10-25: 03:00 → 02:00 in Berlin; 02:30 happens twice, the job runs once.
    first = schedules.next_fire("30 2 * * *", "Europe/Berlin", local(2026, 10, 24, 12))
    assert first == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    second = schedules.next_fire("30 2 * * *", "Europe/Berlin", first)
    assert second == utc(2026, 10, 26, 1, 30), "not again at 02:30 CET the same night"


def test_hourly_jobs_keep_running_through_the_repeated_hour():
    fires, at = [], utc(2026, 10, 24, 23, 59)
    for _ in range(4):
        at = schedules.next_fire("0 * * * *", "Europe/Berlin", at)
        fires.append(at)
    assert fires == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)]


def _schedule(session, wid):
    """The schedule row of the (only) workflow of that id."""
    query = select(Schedule).join(Workflow, Workflow.key == Schedule.workflow_key).where(Workflow.id == wid)
    return session.execute(query).scalar_one_or_none()


def test_after_downtime_only_the_latest_missed_time_fires(services, client, headers, make_workflow):
    wid = make_workflow(
        [{"id": "a", "action": "transform"}],
        triggers={"schedule": {"cron": "*/5 * * * *", "timezone": "UTC", "input": {"k": 1}}},
    )
    shown = client.get(f"/api/v1/workflows/{wid}", headers=headers).get_json()["data"]
    assert shown["nextRunAt"].endswith(":00.000Z")
    with services.db.session() as session:
        row = _schedule(session, wid)
        row.next_run_at = utc(2026, 1, 1, 0, 0)
        session.commit()
    clock = utc(2026, 1, 1, 3, 7)  # three hours down: 36 missed fire times
    assert schedules.fire_due(services, now=clock) >= 1
    assert schedules.fire_due(services, now=clock) == 0, "a second pass at the same time fires nothing"
    runs = client.get(f"/api/v1/runs?workflowId={wid}", headers=headers).get_json()["data"]
    assert len(runs) == 1 and runs[0]["triggerType"] == "schedule"
    with services.db.session() as session:
        row = _schedule(session, wid)
        assert row.last_fire_at == utc(2026, 1, 1, 3, 5) and row.next_run_at == utc(2026, 1, 1, 3, 10)
    detail = client.get(f"/api/v1/runs/{runs[0]['id']}", headers=headers).get_json()["data"]
    assert detail["input"] == {"k": 1}


def test_deleting_a_workflow_drops_its_schedule(services, client, headers, make_workflow):
    wid = make_workflow([{"id": "a", "action": "transform"}], triggers={"schedule": {"cron": "* * * * *"}})
    assert client.delete(f"/api/v1/workflows/{wid}", headers=headers).status_code == 200
    with services.db.session() as session:
        assert _schedule(session, wid) is None


def test_two_scheduler_processes_fire_once_per_second(config, services, make_workflow):
    """Every-second schedule, two schedulers, the first killed mid-way: one run per second, no gaps."""
    wid = make_workflow([{"id": "a", "action": "transform"}], triggers={"schedule": {"cron": "* * * * * *"}})
    env = dict(
        os.environ,
        DATABASE_URL=config.database_url,
        REDIS_URL=config.redis_url,
        BATON_QUEUE_NAMESPACE=config.queue_namespace,
        BATON_LOG_LEVEL="WARNING",
    )
    command = [sys.executable, "-c", "from workers.scheduler import main; main()"]
    procs = {p.pid: p for p in (subprocess.Popen(command, env=env), subprocess.Popen(command, env=env))}
    lock_key = f"{config.queue_namespace}:scheduler:lock"

    def fire_times() -> list[datetime]:
        with services.db.session() as session:
            keys = session.execute(select(Run.idempotency_key).where(Run.workflow_id == wid)).scalars().all()
        return sorted(datetime.fromisoformat(k.split(":", 1)[1]) for k in keys)

    try:
        # Waits on conditions (process start-up takes seconds on a busy machine), never on a sleep.
        lock = wait_for(lambda: services.redis.get(lock_key), timeout=30, what="a scheduler to lead")
        holder = int(lock.decode().split(":", 1)[0])
        assert holder in procs, "one of the two schedulers holds the lock"
        wait_for(lambda: len(fire_times()) >= 3, timeout=30, what="the leader to fire")
        procs[holder].send_signal(signal.SIGKILL)  # the lock holder dies without releasing it
        killed = datetime.now(timezone.utc)
        wait_for(
            lambda: len([t for t in fire_times() if t > killed]) >= 3, timeout=30, what="the survivor to fire"
        )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    second = next(p for pid, p in procs.items() if pid != holder)
    assert second.returncode == 0, "the survivor stops cleanly on SIGTERM"
    with services.db.session() as session:
        count = session.execute(
            select(func.count()).select_from(Run).where(Run.workflow_id == wid)
        ).scalar_one()
    fired = fire_times()
    assert count == len(set(fired)) and len(fired) >= 6, "no duplicate fire times"
    gaps = [(b - a).total_seconds() for a, b in zip(fired, fired[1:], strict=False)]
    assert all(gap == 1 for gap in gaps), f"every second fires once, none missed: {gaps}"
    assert fired[0] >= datetime.now(timezone.utc) - timedelta(seconds=120)


def test_a_schedule_that_never_fires_is_a_validation_error(client, headers):
    body = {
        "name": "never",
        "steps": [{"id": "a", "action": "transform"}],
        "triggers": {"schedule": {"cron": "0 0 30 2 *"}},
    }
    response = client.post("/api/v1/workflows", json=body, headers=headers)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert "never fires" in error["message"]
