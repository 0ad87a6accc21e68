"""The ``baton`` CLI against the real database, Redis and worker."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from click.testing import CliRunner
from flask.cli import ScriptInfo

from app import engine, keys
from app.cli import cli, main


@pytest.fixture
def run_cli(app):
    def invoke(*args: str):
        return CliRunner().invoke(
            cli, list(args), obj=ScriptInfo(create_app=lambda: app), catch_exceptions=False
        )

    return invoke


@pytest.fixture
def company(services) -> str:
    name = f"cli-{uuid.uuid4().hex[:10]}"
    with services.db.session() as session:
        keys.get_or_create_company(session, name)
        session.commit()
    return name


def test_keys_create_prints_only_a_working_key(run_cli, client, company):
    result = run_cli("keys", "create", "--company", company)
    assert result.exit_code == 0
    key = result.stdout.strip()
    assert result.stdout == key + "\n"
    assert re.fullmatch(r"bk_[0-9a-f]{12}_[A-Za-z0-9_-]+", key)
    assert client.get("/api/v1/runs", headers={"x-api-key": key}).status_code == 200


def test_workflows_apply_creates_then_versions(run_cli, client, company, tmp_path):
    wid = f"wf_cli-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"id": wid, "name": "cli", "steps": [{"id": "a", "action": "transform"}]}))
    first = run_cli("workflows", "apply", str(path), "--company", company)
    assert first.exit_code == 0 and first.stdout.strip() == wid
    again = run_cli("workflows", "apply", str(path), "--company", company)
    assert again.exit_code == 0
    path.write_text(json.dumps({"id": wid, "name": "cli v2", "steps": [{"id": "b", "action": "transform"}]}))
    assert run_cli("workflows", "apply", str(path), "--company", company).exit_code == 0
    key = run_cli("keys", "create", "--company", company).stdout.strip()
    body = client.get(f"/api/v1/workflows/{wid}", headers={"x-api-key": key}).get_json()["data"]
    assert body["version"] == 2 and body["name"] == "cli v2"


def test_workflows_apply_rejects_bad_definitions_in_one_line(run_cli, company, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "steps": [{"id": "a", "action": "nope"}]}))
    result = run_cli("workflows", "apply", str(path), "--company", company)
    assert result.exit_code == 1
    assert "VALIDATION_ERROR" in result.stderr and "steps.0.action" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    path.write_text("{not json")
    result = run_cli("workflows", "apply", str(path), "--company", company)
    assert result.exit_code == 1 and "not valid JSON" in result.stderr


def test_runs_commands(worker, services, run_cli, company, tmp_path):
    key = run_cli("keys", "create", "--company", company).stdout.strip()
    assert key
    path = tmp_path / "wf.json"
    wid = f"wf_cli-{uuid.uuid4().hex[:8]}"
    path.write_text(
        json.dumps(
            {
                "id": wid,
                "name": "cli",
                "steps": [
                    {"id": "one", "action": "transform", "input": {"n": "{{ input.n }}"}},
                    {"id": "two", "action": "transform", "input": {"double": "{{ steps.one.output.n * 2 }}"}},
                ],
            }
        )
    )
    assert run_cli("workflows", "apply", str(path), "--company", company).exit_code == 0
    with services.db.session() as session:
        company_id = keys.get_or_create_company(session, company).id
    run, _created = engine.trigger_run(services, company_id, wid, {"n": 21}, "manual")

    watched = run_cli("runs", "watch", run.id, "--company", company, "--interval", "0.05")
    assert watched.exit_code == 0, watched.output
    assert "one: success (attempt 1)" in watched.stdout and "run completed" in watched.stdout

    got = json.loads(run_cli("runs", "get", run.id, "--company", company).stdout)
    assert got["status"] == "completed" and got["output"] == {"double": 42}
    logs = json.loads(run_cli("runs", "logs", run.id, "--company", company).stdout)
    assert [entry["stepId"] for entry in logs] == ["one", "two"]
    listed = json.loads(run_cli("runs", "list", "--company", company).stdout)
    assert [r["id"] for r in listed] == [run.id]

    cancel = run_cli("runs", "cancel", run.id, "--company", company)
    assert cancel.exit_code == 1
    assert "INVALID_STATE" in cancel.stderr


def test_unknown_run_exits_non_zero_with_one_line(run_cli, company, monkeypatch, capsys, app):
    monkeypatch.setattr("sys.argv", ["baton", "runs", "get", "run_nope", "--company", company])
    monkeypatch.setattr("app.cli._create_app", lambda: app)
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "Error: NOT_FOUND: Run not found"


def test_dev_that_fails_to_start_leaves_no_embedded_redis(tmp_path):
    """A start-up failure (here: the SQLite path is a directory) exits non-zero and stops its Redis."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from app.embedded import redis_answers

    (tmp_path / "var" / "baton.sqlite3").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "BATON_VAR_DIR")}
    baton = str(Path(sys.executable).with_name("baton"))
    result = subprocess.run(
        [baton, "dev", "--port", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "starting embedded Redis" in result.stderr
    assert not redis_answers(tmp_path / "var" / "redis.sock")
