"""``baton runs bulk-cancel`` and ``bulk-retry`` over the HTTP API: flags to the request, the dry
run, --wait following the progress to the end, --json, and usage errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from app import keys
from app.cli import cli
from app.timeutil import iso, utcnow
from tests import factories


@pytest.fixture
def run_cli(live_server: str, api_key: str, tmp_path: Path) -> Callable[..., Result]:
    """``baton ARGS`` with BATON_URL and BATON_API_KEY only (no database or Redis settings)."""

    def invoke(*args: str) -> Result:
        env = {
            "BATON_URL": live_server,
            "BATON_API_KEY": api_key,
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }
        return CliRunner().invoke(cli, list(args), env=env, prog_name="baton")

    return invoke


@pytest.fixture
def runs(services: Any, api_key: str) -> Callable[..., list[str]]:
    """``make(status, count)``: runs of one two-step workflow of the key's company (no messages)."""
    with services.db.session() as session:
        company_id = keys.authenticate(session, api_key).company_id
        workflow = factories.workflow(
            session, company_id, [{"id": "a", "action": "transform"}, {"id": "b", "action": "transform"}]
        )
        session.commit()

    def make(status: str, count: int, **fields: Any) -> list[str]:
        steps = {"a": {"status": "success"}, "b": {"status": "error"}} if status == "failed" else None
        start = utcnow() - timedelta(minutes=5)
        with services.db.session() as session:
            ids = [
                factories.run(
                    session, workflow.id, status, steps, created_at=start + timedelta(seconds=i), **fields
                ).id
                for i in range(count)
            ]
            session.commit()
        return ids

    make.workflow_id = workflow.id  # type: ignore[attr-defined]
    return make


def test_bulk_retry_dry_run_then_wait_shows_progress_to_the_end(worker, run_cli, runs, client, headers):
    failed = runs("failed", 12)
    wid = runs.workflow_id  # type: ignore[attr-defined]

    dry = run_cli("runs", "bulk-retry", "--workflow", wid, "--status", "failed", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert lines[0] == "dry run: would retry 12 run(s)"
    assert [line.strip() for line in lines[1:11]] == failed[:10]
    assert lines[11].strip() == "… and 2 more"

    done = run_cli(
        "runs", "bulk-retry", "--workflow", wid, "--status", "failed", "--wait", "--interval", "0.05"
    )
    assert done.exit_code == 0, done.output
    last = done.output.strip().splitlines()[-1]
    assert last.endswith(": retry completed: 12/12 (12 done, 0 failed)"), done.output
    for run_id in failed:
        original = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        assert len(original["restartedRunIds"]) == 1


def test_bulk_cancel_by_run_ids_with_json_and_an_idempotency_key(worker, run_cli, runs, client, headers):
    pending = runs("pending", 2)
    finished = runs("completed", 1)
    args = ["runs", "bulk-cancel", "--run-id", pending[0], "--run-id", pending[1], "--run-id", finished[0]]
    first = run_cli(*args, "--idempotency-key", "clean-up", "--json")
    assert first.exit_code == 0, first.output
    envelope = json.loads(first.output)
    assert envelope["success"] is True and envelope["data"]["action"] == "cancel"
    # The same key again, now following it: the same action, waited for to its end.
    again = run_cli(*args, "--idempotency-key", "clean-up", "--wait", "--interval", "0.05", "--json")
    assert again.exit_code == 0, again.output
    final = json.loads(again.stdout)
    assert final["data"] == {
        "id": envelope["data"]["id"],
        "action": "cancel",
        "status": "completed",
        "total": 2,
        "done": 2,
        "failed": 0,
    }
    statuses = [
        client.get(f"/api/v1/runs/{r}", headers=headers).get_json()["data"]["status"] for r in pending
    ]
    assert statuses == ["cancelled", "cancelled"]


def test_wait_exits_1_when_some_runs_could_not_be_acted_on(worker, run_cli, runs, client, headers):
    failed = runs("failed", 2)
    wid = runs.workflow_id  # type: ignore[attr-defined]
    # The latest version has no step "b", where these runs failed: a retry on it is refused.
    replaced = client.put(
        f"/api/v1/workflows/{wid}",
        json={"name": "v2", "steps": [{"id": "x", "action": "transform"}]},
        headers=headers,
    )
    assert replaced.status_code == 200, replaced.get_json()
    ids = [arg for run_id in failed for arg in ("--run-id", run_id)]
    result = run_cli("runs", "bulk-retry", *ids, "--latest", "--wait", "--interval", "0.05")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].endswith(": retry completed: 2/2 (0 done, 2 failed)")
    # On each run's own version the same runs are retried.
    result = run_cli("runs", "bulk-retry", *ids, "--wait", "--interval", "0.05")
    assert result.exit_code == 0 and "(2 done, 0 failed)" in result.output, result.output


def test_time_window_flags_and_usage_errors(worker, run_cli, runs):
    runs("running", 1)
    now = utcnow()
    window = [
        "--created-after",
        iso(now - timedelta(hours=1)),
        "--created-before",
        iso(now + timedelta(minutes=1)),
    ]
    dry = run_cli("runs", "bulk-cancel", "--trigger-type", "api", *window, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["data"]["count"] >= 1

    nothing = run_cli("runs", "bulk-cancel")
    assert nothing.exit_code == 2 and "say which runs" in nothing.output
    both = run_cli("runs", "bulk-retry", "--status", "failed", "--run-id", "run_x")
    assert both.exit_code == 2 and "not both" in both.output
    refused = run_cli("runs", "bulk-cancel", "--status", "failed")
    assert refused.exit_code == 1
    assert "VALIDATION_ERROR" in refused.output and "filter.status" in refused.output
