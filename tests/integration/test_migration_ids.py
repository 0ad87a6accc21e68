"""Migration 0005 (workflow ids per company) keeps every row of a 0004 database, on PostgreSQL and on
SQLite (where altering a table copies it, and a cascade on the dropped parent would empty its
children)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from app import workflows
from app.config import Config
from app.db import Database
from app.errors import Conflict
from app.migrate import upgrade
from tests.conftest import SCHEMA

AT = "2026-11-01 10:00:00.000000"
ROWS = [
    "INSERT INTO companies (id, name, created_at) VALUES ('co_a', 'a', :at), ('co_b', 'b', :at)",
    "INSERT INTO workflows (id, company_id, name, current_version, created_at, updated_at) "
    "VALUES ('wf_main', 'co_a', 'main', 2, :at, :at)",
    "INSERT INTO workflow_versions (workflow_id, version, definition, created_at) "
    "VALUES ('wf_main', 1, '{\"v\": 1}', :at), ('wf_main', 2, '{\"v\": 2}', :at)",
    "INSERT INTO runs (id, company_id, workflow_id, workflow_version, status, trigger_type, input, "
    "created_at, idempotency_key) VALUES ('run_1', 'co_a', 'wf_main', 1, 'completed', 'api', '{}', :at, 'k')",
    "INSERT INTO step_runs (run_id, step_id, position, status, attempt, reused) "
    "VALUES ('run_1', 's', 0, 'success', 1, false)",
    "INSERT INTO step_attempts (run_id, step_id, position, attempt, status) "
    "VALUES ('run_1', 's', 0, 1, 'success')",
    "INSERT INTO schedules (workflow_id, company_id, cron, timezone, input) "
    "VALUES ('wf_main', 'co_a', '* * * * *', 'UTC', '{}')",
    "INSERT INTO webhook_deliveries (id, company_id, workflow_id, created_at, verified, duplicate, "
    "status_code) VALUES ('dlv_1', 'co_a', 'wf_main', :at, true, false, 202)",
]


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, config: Config, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(config.with_overrides(database_url=None, var_dir=tmp_path))
        yield db
        db.dispose()
        return
    schema = f"baton_mig_{uuid.uuid4().hex[:8]}"
    db = Database(config.with_overrides(database_url=str(config.database_url).replace(SCHEMA, schema)))
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield db
    finally:
        db.dispose()
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        db.dispose()


def _count(db: Database, table: str) -> int:
    with db.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_every_row_survives_and_points_at_its_workflow_key(database: Database, config: Config) -> None:
    upgrade(database, "0004")
    with database.engine.begin() as conn:
        for statement in ROWS:
            conn.execute(text(statement), {"at": AT})
    tables = ("workflows", "workflow_versions", "runs", "step_runs", "step_attempts", "schedules")
    before = {table: _count(database, table) for table in (*tables, "webhook_deliveries")}

    upgrade(database)

    assert {table: _count(database, table) for table in before} == before
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT key, id FROM workflows")).all() == [("wf_main", "wf_main")]
        for table in ("runs", "webhook_deliveries"):
            keys = conn.execute(text(f"SELECT workflow_key, workflow_id FROM {table}")).all()
            assert keys == [("wf_main", "wf_main")], table
        versions = conn.execute(text("SELECT workflow_key, version FROM workflow_versions ORDER BY 2")).all()
        assert versions == [("wf_main", 1), ("wf_main", 2)]
        assert conn.execute(text("SELECT workflow_key FROM schedules")).scalar_one() == "wf_main"
        if database.is_sqlite:
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []

    # The other company may now take the same id; the first company still may not.
    definition = {"id": "wf_main", "name": "b", "steps": [{"id": "s", "action": "transform", "input": {}}]}
    with database.session() as session:
        created, _ = workflows.create(session, "co_b", dict(definition), config)
        assert (created.id, created.company_id) == ("wf_main", "co_b") and created.key != "wf_main"
    with database.session() as session, pytest.raises(Conflict):
        workflows.create(session, "co_a", dict(definition), config)
