"""The ``baton`` CLI over the HTTP API: a live API in a thread, the real worker, two companies.

Most commands run through click's CliRunner (the same ``main`` and error handling as the console
script); ``watch``, ``--help`` and the infrastructure errors run the installed ``baton`` in a
subprocess, as an operator would.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from app.cli import cli
from tests.conftest import new_key

BATON = str(Path(sys.executable).with_name("baton"))
# Variables of the machine that would change what the CLI talks to.
SCRUBBED = ("BATON_URL", "BATON_API_KEY", "DATABASE_URL", "REDIS_URL", "BROKER_URL", "BATON_VAR_DIR")


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI process: nothing of the machine's Baton settings, a fresh config dir."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "config"), **extra}


def one_line_error(result: Any) -> str:
    """The single stderr line of a failed command (and no traceback anywhere)."""
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def run_cli(live_server: str, api_key: str, tmp_path: Path) -> Callable[..., Result]:
    """``baton ARGS`` with BATON_URL and BATON_API_KEY only (no database or Redis settings)."""

    def invoke(*args: str, key: str | None = None, stdin: str | None = None, **env: str) -> Result:
        variables = {
            "BATON_URL": live_server,
            "BATON_API_KEY": key or api_key,
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            **env,
        }
        return CliRunner().invoke(cli, list(args), input=stdin, env=variables, prog_name="baton")

    return invoke


@pytest.fixture
def other_key(services: Any) -> str:
    """A second company's key: several companies exist, and the CLI needs only the key."""
    return new_key(services, "other")


def _apply(
    run_cli: Callable[..., Result],
    tmp_path: Path,
    steps: list[dict[str, Any]],
    key: str | None = None,
    **extra: Any,
) -> str:
    """``baton workflows apply`` of a new workflow; its id."""
    wid = f"wf_cli-{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{wid}.json"
    path.write_text(json.dumps({"id": wid, "name": "cli", "steps": steps, **extra}))
    result = run_cli("workflows", "apply", str(path), key=key)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{wid}: version 1 (created)"
    return wid


def _trigger(run_cli: Callable[..., Result], wid: str, run_input: str = "{}", key: str | None = None) -> str:
    result = run_cli("runs", "trigger", wid, "--input", run_input, "--json", key=key)
    assert result.exit_code == 0, result.output
    envelope = json.loads(result.stdout)
    assert envelope["success"] is True and envelope["data"]["triggerType"] == "manual"
    return envelope["data"]["id"]


# --------------------------------------------------------------------------- no Redis, no database


def test_help_and_remote_commands_start_no_redis(tmp_path):
    """On the embedded default, `--help` and API commands leave no Redis and no ./var behind."""
    env = base_env(tmp_path, BATON_URL="http://127.0.0.1:9", BATON_API_KEY="bk_x")
    for args in (["--help"], ["runs", "--help"], ["runs", "list"], ["workflows", "list", "--json"]):
        result = subprocess.run(
            [BATON, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == (0 if "--help" in args else 1), result.stderr
        assert "Traceback" not in result.stderr
    assert (
        "runs"
        in subprocess.run([BATON, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    )
    assert not (tmp_path / "var").exists()
    assert not (tmp_path / "var" / "redis.sock").exists()
    assert not _processes_mentioning(str(tmp_path / "var"))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


# --------------------------------------------------------------------------- runs: list, get, logs


def test_runs_list_json_is_the_api_envelope_of_this_company_only(
    worker, run_cli, client, headers, other_key, tmp_path, wait_run
):
    wid = _apply(run_cli, tmp_path, [{"id": "a", "action": "transform", "input": {"n": "{{ input.n }}"}}])
    mine = [_trigger(run_cli, wid, json.dumps({"n": n})) for n in range(3)]
    for run_id in mine:
        wait_run(run_id)
    theirs = _trigger(
        run_cli, _apply(run_cli, tmp_path, [{"id": "a", "action": "transform"}], other_key), key=other_key
    )
    assert run_cli("runs", "trigger", wid, key=other_key).exit_code == 1  # not their workflow
    other = json.loads(run_cli("runs", "list", "--json", key=other_key).stdout)
    assert [r["id"] for r in other["data"]] == [theirs]

    listed = run_cli("runs", "list", "--json")
    assert listed.exit_code == 0, listed.output
    envelope = json.loads(listed.stdout)
    assert envelope == client.get("/api/v1/runs?limit=20", headers=headers).get_json()
    assert [r["id"] for r in envelope["data"]] == list(reversed(mine))

    table = run_cli("runs", "list", "--workflow", wid, "--status", "completed")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "WORKFLOW", "STATUS", "TRIGGER", "CREATED", "DURATION", "ERROR"]
    assert [line.split()[0] for line in lines[1:]] == list(reversed(mine))
    assert all(line.index(wid) == lines[0].index("WORKFLOW") for line in lines[1:])  # aligned
    assert "s ago" in lines[1]


def test_runs_list_filters_by_trigger_type_and_time(worker, run_cli, client, headers, tmp_path, wait_run):
    wid = _apply(run_cli, tmp_path, [{"id": "a", "action": "transform"}])
    manual = _trigger(run_cli, wid)  # the CLI triggers as "manual"
    api = client.post(f"/api/v1/workflows/{wid}/runs", json={"input": {}}, headers=headers).get_json()["data"]
    created = client.get(f"/api/v1/runs/{api['id']}", headers=headers).get_json()["data"]["createdAt"]

    def ids(*args: str) -> list[str]:
        result = run_cli("runs", "list", "--workflow", wid, "--json", *args)
        assert result.exit_code == 0, result.output
        return [r["id"] for r in json.loads(result.stdout)["data"]]

    assert ids("--trigger-type", "manual") == [manual]
    assert ids("--trigger-type", "api") == [api["id"]]
    assert ids("--created-after", created) == [api["id"]]
    assert ids("--created-before", created) == [manual]
    bad = run_cli("runs", "list", "--created-after", "yesterday")
    assert bad.exit_code == 1 and "VALIDATION_ERROR" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_runs_list_pages_by_cursor(worker, run_cli, tmp_path, wait_run):
    wid = _apply(run_cli, tmp_path, [{"id": "a", "action": "transform"}])
    runs = [_trigger(run_cli, wid) for _ in range(3)]
    first = run_cli("runs", "list", "--limit", "2")
    assert first.exit_code == 0
    cursor = first.stdout.split("next cursor: ", 1)[1].split()[0]
    assert f"baton runs list --limit 2 --cursor {cursor}" in first.stdout
    second = json.loads(run_cli("runs", "list", "--limit", "2", "--cursor", cursor, "--json").stdout)
    assert [r["id"] for r in second["data"]] == [runs[0]] and second["meta"]["hasMore"] is False
    everything = json.loads(run_cli("runs", "list", "--limit", "1", "--all", "--json").stdout)
    assert [r["id"] for r in everything["data"]] == list(reversed(runs))
    assert everything["meta"] == {"cursor": None, "hasMore": False}


def test_runs_get_and_logs(worker, run_cli, client, headers, tmp_path, wait_run):
    steps = [
        {"id": "one", "action": "transform", "input": {"n": "{{ input.n }}"}},
        {"id": "two", "action": "transform", "input": {"double": "{{ steps.one.output.n * 2 }}"}},
    ]
    wid = _apply(run_cli, tmp_path, steps)
    run_id = _trigger(run_cli, wid, '{"n": 21}')
    wait_run(run_id)
    got = run_cli("runs", "get", run_id)
    assert got.exit_code == 0, got.output
    assert f"workflow: {wid} v1" in got.stdout and "status:   completed" in got.stdout
    assert '"double": 42' in got.stdout
    assert [line.split()[0] for line in got.stdout.split("STEP", 1)[1].splitlines()[1:3]] == ["one", "two"]
    as_json = json.loads(run_cli("runs", "get", run_id, "--json").stdout)
    assert as_json == client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()
    logs = run_cli("runs", "logs", run_id)
    assert [line.split()[:3] for line in logs.stdout.splitlines()[1:]] == [
        ["one", "success", "1"],
        ["two", "success", "1"],
    ]
    assert json.loads(run_cli("runs", "logs", run_id, "--json").stdout)["data"]["runId"] == run_id


# --------------------------------------------------------------------------- runs: actions


def test_trigger_from_inline_input_and_a_file(worker, run_cli, tmp_path, wait_run):
    wid = _apply(run_cli, tmp_path, [{"id": "a", "action": "transform", "input": {"x": "{{ input.x }}"}}])
    inline = run_cli("runs", "trigger", wid, "--input", '{"x": 5}')
    assert inline.exit_code == 0 and inline.stdout.startswith("run_")
    assert wait_run(inline.stdout.split(":")[0])["output"] == {"x": 5}
    path = tmp_path / "in.json"
    path.write_text('{"x": 6}')
    from_file = run_cli("runs", "trigger", wid, "--input-file", str(path), "--json")
    run = json.loads(from_file.stdout)["data"]
    assert run["triggerType"] == "manual" and wait_run(run["id"])["output"] == {"x": 6}
    not_an_object = run_cli("runs", "trigger", wid, "--input", "[1]")
    assert not_an_object.exit_code == 2 and "must be a JSON object" in one_line_error(not_an_object)
    both = run_cli("runs", "trigger", wid, "--input", "{}", "--input-file", str(path))
    assert both.exit_code == 2 and "not both" in one_line_error(both)


def test_retry_restart_and_dry_run(worker, run_cli, tmp_path, wait_run):
    steps = [
        {"id": "a", "action": "transform", "input": {"x": "{{ input.x }}"}},
        {"id": "b", "action": "fail", "input": {"code": "NOPE", "message": "not yet"}},
    ]
    wid = _apply(run_cli, tmp_path, steps)
    failed = _trigger(run_cli, wid, '{"x": 1}')
    assert wait_run(failed)["status"] == "failed"
    fixed = {
        "id": wid,
        "name": "cli",
        "steps": [steps[0], {"id": "b", "action": "transform", "input": {"y": "{{ input.x }}"}}],
    }
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    assert (
        run_cli("workflows", "apply", str(tmp_path / "fixed.json")).stdout.strip()
        == f"{wid}: version 2 (updated)"
    )

    retried = run_cli("runs", "retry", failed, "--latest")
    assert retried.exit_code == 0, retried.output
    new_run = retried.stdout.split(":")[0]
    assert f"restarted from step b of {failed} (workflow {wid} v2)" in retried.stdout
    done = wait_run(new_run)
    assert done["status"] == "completed" and done["restartedFromRunId"] == failed

    plan = run_cli(
        "runs", "restart", new_run, "--from-step", "b", "--override-input", '{"x": 2}', "--dry-run"
    )
    assert plan.exit_code == 0, plan.output
    assert "reused steps: a" in plan.stdout and "steps to run: b" in plan.stdout and '"x": 2' in plan.stdout
    restarted = run_cli(
        "runs", "restart", new_run, "--from-step", "b", "--override-input", '{"x": 2}', "--json"
    )
    data = json.loads(restarted.stdout)["data"]
    assert data["restartFromStepId"] == "b" and wait_run(data["newRunId"])["output"] == {"y": 2}
    bad_step = run_cli("runs", "restart", new_run, "--from-step", "zzz")
    assert bad_step.exit_code == 1 and one_line_error(bad_step).startswith("INVALID_STEP: ")
    missing = run_cli("runs", "restart", new_run)
    assert missing.exit_code == 2 and "--from-step" in one_line_error(missing)


def test_resume_approve_reject_and_cancel(worker, run_cli, tmp_path, wait_run):
    wid = _apply(
        run_cli,
        tmp_path,
        [
            {"id": "approve", "action": "approval"},
            {"id": "ship", "action": "transform", "input": {"ok": "{{ steps.approve.output.ok }}"}},
        ],
    )
    approved, rejected = _trigger(run_cli, wid), _trigger(run_cli, wid)
    for run_id in (approved, rejected):
        wait_run(run_id, ("suspended",))
    neither = run_cli("runs", "resume", approved)
    assert neither.exit_code == 2 and "--approve or --reject" in one_line_error(neither)
    resumed = run_cli("runs", "resume", approved, "--approve", "--data", '{"ok": true}')
    assert resumed.exit_code == 0 and "Run resumed" in resumed.stdout
    assert wait_run(approved)["output"] == {"ok": True}
    assert "Run rejected" in run_cli("runs", "resume", rejected, "--reject").stdout
    assert wait_run(rejected)["status"] == "failed"

    waiting = _trigger(run_cli, wid)
    wait_run(waiting, ("suspended",))
    cancelled = run_cli("runs", "cancel", waiting)
    assert cancelled.exit_code == 0 and cancelled.stdout.startswith(f"{waiting}: cancelled")
    again = run_cli("runs", "cancel", waiting)
    assert again.exit_code == 1 and one_line_error(again).startswith("INVALID_STATE: ")


# --------------------------------------------------------------------------- watch


def _watch(live_server: str, key: str, run_id: str, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = base_env(tmp_path, BATON_URL=live_server, BATON_API_KEY=key)
    return subprocess.Popen(
        [BATON, "runs", "watch", run_id, "--interval", "0.1", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_shows_each_step_of_a_three_step_run_and_exits_0(
    worker, run_cli, live_server, api_key, tmp_path
):
    steps = [
        {"id": "first", "action": "transform"},
        {"id": "pause", "action": "delay", "input": {"durationMs": 4000}},
        {"id": "last", "action": "transform", "input": {"done": True}},
    ]
    wid = _apply(run_cli, tmp_path, steps)
    run_id = _trigger(run_cli, wid)
    watcher = _watch(live_server, api_key, run_id, tmp_path)
    assert watcher.stdout is not None
    seen = []
    for line in watcher.stdout:  # read as it is written: the delay is shown before the run ends
        seen.append(line.rstrip("\n"))
        if " pause " in line and "waiting" in line:
            assert not any("last" in s for s in seen)
    assert watcher.wait(timeout=60) == 0, watcher.stderr.read() if watcher.stderr else ""
    text = "\n".join(seen)
    assert seen[0] == f"watching {run_id} (workflow {wid} v1)"
    positions = [re.search(rf"  {step} +success +attempt 1", text) for step in ("first", "pause", "last")]
    assert all(positions) and sorted(positions, key=lambda m: m.start()) == positions, text
    assert "[3/3]" in text and re.search(r"  pause +waiting", text), text
    assert seen[-1].startswith("run completed in ") and seen[-1].endswith("(3/3 steps)")


def test_watch_exits_1_on_failure_and_2_on_cancel(
    worker, run_cli, live_server, api_key, tmp_path, client, headers
):
    failing = _apply(
        run_cli, tmp_path, [{"id": "boom", "action": "fail", "input": {"code": "E", "message": "bad"}}]
    )
    failed = _watch(live_server, api_key, _trigger(run_cli, failing), tmp_path)
    out, _err = failed.communicate(timeout=60)
    assert failed.returncode == 1 and "run failed" in out and "E: bad" in out

    slow = _apply(
        run_cli,
        tmp_path,
        [
            {"id": "long", "action": "delay", "input": {"durationMs": 60000}},
            {"id": "never", "action": "transform"},
        ],
    )
    run_id = _trigger(run_cli, slow)
    watcher = _watch(live_server, api_key, run_id, tmp_path)
    assert watcher.stdout is not None
    for line in watcher.stdout:
        if "long" in line and "waiting" in line:
            break
    assert client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers).status_code == 200
    rest, _err = watcher.communicate(timeout=60)
    assert watcher.returncode == 2 and "run cancelled" in rest

    gave_up = _watch(live_server, api_key, _trigger(run_cli, slow), tmp_path, "--timeout", "1", "--json")
    out, err = gave_up.communicate(timeout=60)
    assert gave_up.returncode == 2 and out == "" and "gave up after 1 s" in err


def test_watch_json_prints_the_final_envelope(worker, run_cli, live_server, api_key, tmp_path, wait_run):
    wid = _apply(run_cli, tmp_path, [{"id": "a", "action": "transform", "input": {"v": 1}}])
    run_id = _trigger(run_cli, wid)
    watcher = _watch(live_server, api_key, run_id, tmp_path, "--json")
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    assert json.loads(out)["data"]["output"] == {"v": 1} and "run completed" in err


# --------------------------------------------------------------------------- workflows, deliveries, secrets


def test_workflows_list_get_delete_and_deliveries(worker, run_cli, live_server, tmp_path):
    wid = _apply(
        run_cli,
        tmp_path,
        [{"id": "a", "action": "transform"}],
        triggers={"webhook": {"scheme": "hmac-sha256", "header": "X-Sig", "secret": "s3cret-value"}},
    )
    listed = run_cli("workflows", "list")
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "VERSION"]
    assert any(line.split()[:4] == [wid, "cli", "1", "1"] for line in listed.stdout.splitlines())
    got = json.loads(run_cli("workflows", "get", wid).stdout)
    assert got["id"] == wid and "s3cret-value" not in json.dumps(got)

    import requests

    assert (
        requests.post(
            f"{live_server}/api/v1/webhooks/{wid}", data=b"{}", headers={"X-Sig": "nope"}
        ).status_code
        == 401
    )
    deliveries = run_cli("deliveries", "list", wid)
    assert deliveries.exit_code == 0, deliveries.output
    assert deliveries.stdout.splitlines()[0].split()[:2] == ["RECEIVED", "DELIVERY"]
    assert " no " in deliveries.stdout and "401" in deliveries.stdout
    assert json.loads(run_cli("deliveries", "list", wid, "--json").stdout)["data"][0]["verified"] is False

    assert run_cli("workflows", "delete", wid).stdout.strip() == f"deleted {wid}"
    gone = run_cli("workflows", "get", wid)
    assert gone.exit_code == 1 and one_line_error(gone).startswith("NOT_FOUND: ")


def test_workflows_apply_refuses_bad_definitions_in_one_line(run_cli, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "steps": [{"id": "a", "action": "nope"}]}))
    result = run_cli("workflows", "apply", str(path))
    assert result.exit_code == 1 and one_line_error(result).startswith("VALIDATION_ERROR: ")
    path.write_text("{not json")
    result = run_cli("workflows", "apply", str(path))
    assert result.exit_code == 2 and "not valid JSON" in one_line_error(result)


def test_secrets_set_list_delete(run_cli, client, headers):
    assert run_cli("secrets", "set", "API_TOKEN", stdin="tok-value\n").exit_code == 0
    listed = run_cli("secrets", "list")
    assert listed.exit_code == 0 and "API_TOKEN" in listed.stdout and "tok-value" not in listed.stdout
    shown = client.get("/api/v1/secrets", headers=headers).get_json()["data"]
    assert [s["name"] for s in shown] == ["API_TOKEN"]
    bad = run_cli("secrets", "set", "bad-name", stdin="v\n")
    assert bad.exit_code == 1 and one_line_error(bad).startswith("VALIDATION_ERROR: ")
    assert run_cli("secrets", "delete", "API_TOKEN").exit_code == 0
    missing = run_cli("secrets", "delete", "API_TOKEN")
    assert missing.exit_code == 1 and one_line_error(missing).startswith("NOT_FOUND: ")


# --------------------------------------------------------------------------- login and errors


def test_login_writes_a_private_profile_that_the_environment_overrides(
    run_cli, live_server, api_key, tmp_path
):
    refused = run_cli(
        "login", "--url", live_server, key="", stdin="bk_000000000000_wrong\n", BATON_API_KEY=""
    )
    assert refused.exit_code == 1 and one_line_error(refused).startswith("UNAUTHORIZED: ")
    profile = tmp_path / "config" / "baton" / "profile.json"
    assert not profile.exists()

    logged_in = run_cli("login", "--url", live_server, stdin=api_key + "\n", BATON_API_KEY="", BATON_URL="")
    assert logged_in.exit_code == 0, logged_in.output
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert json.loads(profile.read_text()) == {"url": live_server, "apiKey": api_key}
    assert api_key not in logged_in.output

    from_profile = run_cli("runs", "list", "--json", BATON_API_KEY="", BATON_URL="")
    assert from_profile.exit_code == 0 and json.loads(from_profile.stdout)["success"] is True
    overridden = run_cli("runs", "list", key="bk_000000000000_wrong", BATON_URL="")
    assert overridden.exit_code == 1 and one_line_error(overridden) == "UNAUTHORIZED: Invalid API key"


def test_errors_are_one_line_with_their_exit_codes(run_cli, tmp_path):
    not_found = run_cli("runs", "get", "run_nope")
    assert not_found.exit_code == 1 and one_line_error(not_found) == "NOT_FOUND: Run not found"
    refused = run_cli("runs", "list", BATON_URL="http://127.0.0.1:9")
    assert refused.exit_code == 1
    assert one_line_error(refused) == (
        "Error: cannot reach the Baton API at http://127.0.0.1:9 (BATON_URL): connection refused"
    )
    no_key = run_cli("runs", "list", BATON_API_KEY="")
    assert no_key.exit_code == 1 and "BATON_API_KEY" in one_line_error(no_key)
    usage = run_cli("runs", "list", "--status", "bogus")
    assert usage.exit_code == 2 and "--status" in one_line_error(usage)
    unknown = run_cli("runs", "frobnicate")
    assert unknown.exit_code == 2 and "frobnicate" in one_line_error(unknown)


def test_local_infrastructure_errors_are_one_line(tmp_path):
    """Database and Redis unreachable, or RabbitMQ without its client: one line, exit 1."""
    cases = [
        (
            ["db", "upgrade"],
            {"DATABASE_URL": "postgresql://root@127.0.0.1:9/test"},
            "database (DATABASE_URL)",
        ),
        (
            ["keys", "create", "--company", "x"],
            {"DATABASE_URL": "postgresql://root@127.0.0.1:9/x"},
            "DATABASE_URL",
        ),
        (["worker"], {"REDIS_URL": "redis://127.0.0.1:9/0"}, "no Redis answers at REDIS_URL"),
        (["scheduler"], {}, "no Redis answers on"),
    ]
    try:
        import pika  # noqa: F401
    except ImportError:
        amqp = {"REDIS_URL": "redis://127.0.0.1:6379/0", "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672"}
        cases.append((["api"], amqp, "RabbitMQ client"))
    for args, extra, expected in cases:
        result = subprocess.run(
            [BATON, *args],
            cwd=tmp_path,
            env=base_env(tmp_path, **extra),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, (args, result.stderr)
        assert expected in one_line_error(result), (args, result.stderr)


def test_dev_that_fails_to_start_leaves_no_embedded_redis(tmp_path):
    """A start-up failure (here: the SQLite path is a directory) is one line, exit 1, no Redis left."""
    from app.embedded import redis_answers

    (tmp_path / "var" / "baton.sqlite3").mkdir(parents=True)
    result = subprocess.run(
        [BATON, "dev", "--port", "0"],
        cwd=tmp_path,
        env=base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "starting embedded Redis" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: database (DATABASE_URL): ")
    assert not redis_answers(tmp_path / "var" / "redis.sock")
