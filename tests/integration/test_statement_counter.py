"""The SQL statement counter (``app.db.statements_executed``) and its metric ``baton_db_statements_total``
on the real PostgreSQL and Redis.

The counter is process-wide, and this test process runs other threads that talk to the database,
so the exact counts are taken in a child process of the test's own that does nothing else: it runs
known statements, reports what it counted, publishes through the metrics snapshots and retires, as
a worker process does when it stops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import metrics

ROOT = Path(__file__).resolve().parents[2]
SERIES = metrics.series_key(metrics.DB_STATEMENTS_SERIES, {})

CHILD = textwrap.dedent(
    """
    import json, os, sys

    from sqlalchemy import text

    from app import db as dbmod, metrics
    from app.config import Config
    from app.db import Database
    from app.queue import make_redis

    config = Config(database_url=sys.argv[1], redis_url=sys.argv[2])
    namespace = sys.argv[3]
    seen = {}

    def mark(name):
        seen[name] = dbmod.statements_executed()

    database = Database(config, pool_size=2)
    mark("start")
    with database.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        mark("select")
        conn.execute(text("CREATE TEMPORARY TABLE counted (n int)"))
        conn.execute(text("INSERT INTO counted (n) VALUES (:n)"), [{"n": n} for n in range(50)])
        mark("executemany")
        conn.commit()  # COMMIT (and the implicit BEGIN) are no statements of their own
        mark("commit")
        try:
            conn.execute(text("SELECT * FROM no_such_table"))
        except Exception:
            conn.rollback()
        mark("failed")
    with database.session() as session:
        session.execute(text("SELECT count(*) FROM counted"))
        session.commit()
    mark("session")
    dbmod.count_statements()
    dbmod.count_statements(3)
    mark("raw")
    mark_metric = metrics.local_samples().get(metrics.series_key(metrics.DB_STATEMENTS_SERIES, {}))

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked process has sent nothing yet
        os.write(write, str(dbmod.statements_executed()).encode())
        os._exit(0)
    os.waitpid(child, 0)
    forked = int(os.read(read, 64))

    redis = make_redis(config)
    metrics.start_publisher(redis, namespace, at_exit=False)
    metrics.stop_publisher()  # retire: the final count joins the retired totals
    database.dispose()
    print(json.dumps({"seen": seen, "metric": mark_metric, "forked": forked}))
    """
)


@pytest.fixture
def namespace(services: Any) -> Iterator[str]:
    name = f"{services.namespace}-statements-{uuid.uuid4().hex[:6]}"
    yield name
    for key in services.redis.scan_iter(f"{name}:*"):
        services.redis.delete(key)


def run_child(config: Any, namespace: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(config.database_url), str(config.redis_url), namespace],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_statements_are_counted_once_per_execute_and_published_when_the_process_retires(
    config, services, namespace
):
    report = run_child(config, namespace)
    seen = report["seen"]
    steps = {
        name: seen[name] - seen[previous]
        for previous, name in zip(
            ["start", "select", "executemany", "commit", "failed", "session"],
            ["select", "executemany", "commit", "failed", "session", "raw"],
            strict=True,
        )
    }
    assert steps == {
        "select": 1,
        "executemany": 2,  # CREATE TABLE, then 50 rows through one executemany
        "commit": 0,
        "failed": 0,  # a statement the server refused is not counted
        "session": 1,
        "raw": 4,  # count_statements() and count_statements(3)
    }
    assert report["metric"] == seen["raw"]  # the metric reads the same counter
    assert report["forked"] == 0

    # What the API's /metrics sums: the retired process's total, read back from Redis.
    totals = metrics.cluster_samples(services.redis, namespace, local={})
    assert totals[SERIES] == seen["raw"]
    assert metrics.retired_samples(services.redis, namespace)[SERIES] == seen["raw"]
