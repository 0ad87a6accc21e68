#!/usr/bin/env python3
"""Parked runs cost no worker threads: trigger-to-completed of a 1-step run, idle vs. with N parked runs.

Starts ``baton worker`` (2 processes x 8 threads) against a scratch PostgreSQL database and Redis
db, measures a 1-step run's trigger-to-completed latency at idle, parks N runs (half on a long
delay, half suspended on an approval), measures again, and measures how late a due delay's next
step starts. Prints medians and p99s side by side. Stops its children on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import engine, keys, workflows  # noqa: E402
from app.config import Config  # noqa: E402
from app.db import Database  # noqa: E402
from app.migrate import upgrade  # noqa: E402
from app.queue import StepQueue, make_broker, make_redis  # noqa: E402
from app.services import Services  # noqa: E402
from models import Run, StepRun  # noqa: E402

SERVER = "postgresql+psycopg://root@127.0.0.1:5432"


def log(message: str) -> None:
    print(f"bench-waiting: {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parked", type=int, default=10_000, help="runs to park (half delay, half approval)")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--database", default="baton_bench_waiting")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/4")
    args = parser.parse_args()

    admin = create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {args.database} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {args.database}"))
    admin.dispose()
    config = Config(database_url=f"{SERVER}/{args.database}", redis_url=args.redis_url, log_level="WARNING")
    db = Database(config, pool_size=8)
    upgrade(db)
    redis = make_redis(config)
    redis.flushdb()
    services = Services(db=db, redis=redis, queue=StepQueue(make_broker(config)), config=config)
    with db.session() as session:
        company = keys.get_or_create_company(session, "bench")
        session.commit()
        one, _ = workflows.create(
            session, company.id, {"name": "one", "steps": [{"id": "a", "action": "transform"}]}
        )
        park_delay, _ = workflows.create(
            session,
            company.id,
            {
                "name": "delay",
                "steps": [
                    {"id": "wait", "action": "delay", "input": {"durationMs": 3_600_000}},
                    {"id": "b", "action": "transform"},
                ],
            },
        )
        park_approval, _ = workflows.create(
            session,
            company.id,
            {
                "name": "approval",
                "steps": [{"id": "ok", "action": "approval"}, {"id": "b", "action": "transform"}],
            },
        )
        due, _ = workflows.create(
            session,
            company.id,
            {
                "name": "due",
                "steps": [
                    {"id": "wait", "action": "delay", "input": {"durationMs": 500}},
                    {"id": "b", "action": "transform"},
                ],
            },
        )
        company_id = company.id

    env = dict(
        os.environ, DATABASE_URL=config.database_url, REDIS_URL=args.redis_url, BATON_LOG_LEVEL="WARNING"
    )
    baton = str(Path(sys.executable).with_name("baton"))
    worker = subprocess.Popen([baton, "worker", "--processes", "2", "--threads", "8"], env=env)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    def status(run_id: str) -> str:
        with db.session() as session:
            return session.execute(select(Run.status).where(Run.id == run_id)).scalar_one()

    def latency_samples(label: str) -> list[float]:
        samples = []
        for i in range(args.samples):
            started = time.perf_counter()
            run, _ = engine.trigger_run(services, company_id, one.id, {"i": i}, "api")
            while status(run.id) != "completed":
                time.sleep(0.001)
            samples.append((time.perf_counter() - started) * 1000)
        log(f"{label}: p50 {statistics.median(samples):.1f} ms, p99 {pct(samples, 0.99):.1f} ms")
        return samples

    try:
        time.sleep(3)  # workers boot
        latency_samples("warm-up")
        idle = latency_samples("idle")

        log(f"parking {args.parked} runs")
        for i in range(args.parked):
            engine.trigger_run(services, company_id, (park_delay if i % 2 else park_approval).id, {}, "api")
            if i and i % 1000 == 0:
                log(f"  triggered {i}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with db.session() as session:
                parked = session.execute(
                    select(func.count()).select_from(StepRun).where(StepRun.status == "waiting")
                ).scalar_one()
            log(f"  parked {parked}/{args.parked}")
            if parked >= args.parked:
                break
            time.sleep(2)
        busy = latency_samples(f"with {args.parked} parked")

        lateness = []
        for _ in range(10):
            run, _ = engine.trigger_run(services, company_id, due.id, {}, "api")
            while status(run.id) != "completed":
                time.sleep(0.01)
            with db.session() as session:
                rows = {r.step_id: r for r in engine.step_runs(session, run.id)}
            due_at = rows["wait"].started_at.timestamp() + 0.5
            lateness.append((rows["b"].started_at.timestamp() - due_at) * 1000)
        log(f"delay lateness: median {statistics.median(lateness):.0f} ms, max {max(lateness):.0f} ms")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        db.dispose()

    print(f"{'metric':44} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'1-step trigger-to-completed, idle':44} {statistics.median(idle):8.1f} {pct(idle, 0.99):8.1f}")
    print(f"{f'same, {args.parked} runs parked':44} {statistics.median(busy):8.1f} {pct(busy, 0.99):8.1f}")
    print(f"{'ratio parked/idle (p50)':44} {statistics.median(busy) / statistics.median(idle):8.2f}")
    late = f"{statistics.median(lateness):8.0f} {max(lateness):8.0f}"
    print(f"{'delay: next step start after due (median/max)':44} {late}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
