"""The ``baton`` command (a Flask ``FlaskGroup``): processes, database, keys, workflows, runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import FlaskGroup
from sqlalchemy import select

from app.config import Config
from app.engine.states import is_terminal
from app.errors import BatonError
from models.states import RunStatus

EXAMPLE = Path(__file__).resolve().parent / "examples" / "hello.json"


def _create_app() -> Any:
    from app.factory import create_app

    return create_app()


class BatonGroup(FlaskGroup):
    """Turns Baton's errors into one readable line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatonError as exc:
            raise click.ClickException(f"{exc.code}: {exc.message}") from exc


@click.group(
    cls=BatonGroup, create_app=lambda: _create_app(), add_default_commands=False, add_version_option=False
)
def cli() -> None:
    """Baton: execute and monitor multi-step workflow runs."""


def main() -> None:
    cli.main(prog_name="baton")


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _services() -> Any:
    return current_app.extensions["baton"]


def _config() -> Config:
    return Config.from_env()


# --------------------------------------------------------------------------- processes


def _child_env(config: Config) -> dict[str, str]:
    env = dict(os.environ)
    env["BATON_VAR_DIR"] = str(config.var_dir.resolve())
    return env


def _exec(args: list[str], env: dict[str, str]) -> None:
    """Replace this process, so signals reach the server directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(args[0], args, env)


def api_command(config: Config, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "app.wsgi:app",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--threads",
        "4",
        "--graceful-timeout",
        "20",
        "--access-logfile",
        "/dev/stderr",
        "--no-control-socket",
        "--log-level",
        config.log_level.lower(),
    ]


def worker_command(processes: int, threads: int) -> list[str]:
    """The worker pool's supervisor (workers/pool.py): it restarts a worker process that dies."""
    return [
        sys.executable,
        "-m",
        "workers.pool",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]


def worker_env(config: Config) -> dict[str, str]:
    return _child_env(config)


@cli.command("api", with_appcontext=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
def api_cmd(host: str, port: int, workers: int) -> None:
    """Run the HTTP API under gunicorn."""
    config = _config()
    _prepare_embedded(config)
    _exec(api_command(config, host, port, workers), _child_env(config))


@cli.command("worker", with_appcontext=False)
@click.option("--processes", "-p", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", "-t", default=8, show_default=True, type=click.IntRange(min=1))
def worker_cmd(processes: int, threads: int) -> None:
    """Run Dramatiq worker processes that execute steps; a worker process that dies is restarted."""
    config = _config()
    _prepare_embedded(config)
    # exec: the supervisor keeps this PID, so its worker processes are this command's children.
    _exec(worker_command(processes, threads), worker_env(config))


def _prepare_embedded(config: Config) -> None:
    """Only `baton dev` starts the embedded Redis; other processes need it running already."""
    if config.embedded_redis:
        from app.embedded import redis_answers

        if not redis_answers(config.redis_socket):
            _fail(f"no Redis answers on {config.redis_socket}: set REDIS_URL, or start `baton dev`")
    if config.embedded_database:
        _upgrade(config)


def _upgrade(config: Config) -> None:
    from app.db import Database
    from app.migrate import upgrade

    db = Database(config)
    try:
        upgrade(db)
    finally:
        db.dispose()


def scheduler_command() -> list[str]:
    return [sys.executable, "-c", "from workers.scheduler import main; main()"]


@cli.command("scheduler", with_appcontext=False)
def scheduler_cmd() -> None:
    """Run the scheduler: recovery sweeps and run timeouts (one active instance, others stand by)."""
    config = _config()
    _prepare_embedded(config)
    _exec(scheduler_command(), _child_env(config))


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade", with_appcontext=False)
def db_upgrade() -> None:
    """Apply every migration."""
    config = _config()
    _upgrade(config)
    click.echo("database is at the latest schema", err=True)


# --------------------------------------------------------------------------- dev


@cli.command("dev", with_appcontext=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--processes", default=2, show_default=True, type=int, help="worker processes")
@click.option("--threads", default=8, show_default=True, type=int, help="threads per worker process")
def dev(host: str, port: int, processes: int, threads: int) -> None:
    """API, workers, scheduler and embedded services in one command; Ctrl-C stops all of them."""
    from app.embedded import stop_redis

    config = _config()
    redis_process, key, workflow_id = _dev_prepare(config)
    # A dev instance calls local targets: loopback is reachable unless the allow list is set.
    env = {"BATON_HTTP_ALLOW_NETWORKS": "127.0.0.0/8,::1/128", **_child_env(config)}
    base_url = f"http://{host}:{port}"
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        _say(f"starting API on {base_url}")
        children.append(("api", subprocess.Popen(api_command(config, host, port, 1), env=env)))
        _say(f"starting {processes} worker processes x {threads} threads, and the scheduler")
        children.append(("worker", subprocess.Popen(worker_command(processes, threads), env=env)))
        children.append(("scheduler", subprocess.Popen(scheduler_command(), env=env)))
        if not _wait_ready(base_url, children, lambda: stopping):
            exit_code = 1
        else:
            _print_ready(base_url, key, workflow_id)
        while not stopping and exit_code == 0:
            for name, child in children:
                if child.poll() is not None:
                    _say(f"{name} exited with code {child.returncode}; stopping")
                    exit_code = 1
            time.sleep(0.2)
    finally:
        _say("stopping")
        _stop_children(children)
        stop_redis(redis_process)
        _say("stopped")
    sys.exit(exit_code)


def _say(message: str) -> None:
    click.echo(f"baton dev: {message}", err=True)


def _dev_prepare(config: Config) -> tuple[subprocess.Popen[bytes] | None, str, str]:
    """Embedded Redis (when no REDIS_URL), migrations, the dev key and the example workflow."""
    from app.embedded import ensure_redis, stop_redis

    redis_process = None
    if config.embedded_redis:
        _say(f"starting embedded Redis ({config.redis_socket})")
        redis_process = ensure_redis(config, daemonize=False)
    try:
        where = "embedded SQLite " + str(config.sqlite_path) if config.embedded_database else "database"
        _say(f"migrating {where}")
        _upgrade(config)
        return redis_process, _dev_key(config), _load_example(config)
    except BaseException:
        stop_redis(redis_process)  # a failed start must not leave the embedded Redis behind
        raise


def _print_ready(base_url: str, key: str, workflow_id: str) -> None:
    curl = (
        f"curl -s -X POST {base_url}/api/v1/workflows/{workflow_id}/runs "
        f"-H 'x-api-key: {key}' -H 'Content-Type: application/json' "
        f'-d \'{{"input": {{"name": "Ada", "baseUrl": "{base_url}"}}}}\''
    )
    click.echo(f"Baton is running at {base_url}")
    click.echo(f"API key: {key}")
    click.echo(f"Trigger a run:\n  {curl}")
    click.echo(f"Then: curl -s {base_url}/api/v1/runs -H 'x-api-key: {key}'")
    sys.stdout.flush()


def _stop_children(children: list[tuple[str, subprocess.Popen[bytes]]], timeout_s: float = 40) -> None:
    """SIGTERM every child, wait for all of them, SIGKILL what is left at the deadline."""
    for _name, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for _name, child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _wait_ready(base_url: str, children: list[tuple[str, subprocess.Popen[bytes]]], stopping: Any) -> bool:
    import requests

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stopping():
        if any(child.poll() is not None for _n, child in children):
            return False
        try:
            if requests.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def _dev_key(config: Config) -> str:
    """The dev company's key, kept in clear in ./var/ (dev only) so restarts print the same one."""
    from app import keys
    from app.db import Database

    key_file = config.var_dir / "dev-api-key"
    db = Database(config)
    try:
        with db.session() as session:
            if key_file.exists():
                existing = key_file.read_text().strip()
                if keys.authenticate(session, existing):
                    return existing
            company = keys.get_or_create_company(session, "dev")
            key = keys.create_key(session, company, "dev")
            session.commit()
    finally:
        db.dispose()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def _load_example(config: Config) -> str:
    import workers.actions  # noqa: F401  (the example's actions must be registered to validate it)
    from app import keys, workflows
    from app.db import Database
    from models import Workflow

    payload = json.loads(EXAMPLE.read_text())
    db = Database(config)
    try:
        with db.session() as session:
            company = keys.get_or_create_company(session, "dev")
            session.commit()
            return _apply(session, company.id, payload, workflows, Workflow)
    finally:
        db.dispose()


def _apply(
    session: Any, company_id: str, payload: dict[str, Any], workflows: Any, workflow_model: Any
) -> str:
    """Create the workflow, or add a version when its definition changed."""
    from sqlalchemy import select

    workflow_id = payload.get("id")
    existing = session.execute(
        select(workflow_model).where(
            workflow_model.company_id == company_id,
            workflow_model.id == workflow_id,
            workflow_model.deleted_at.is_(None),
        )
    ).scalar_one_or_none()
    if existing is not None:
        current = workflows.current_definition(session, existing)
        candidate = {k: v for k, v in payload.items() if k != "id"}
        from app.definition import validate_definition

        if validate_definition(candidate) == current:
            return existing.id
        workflow, _ = workflows.replace(session, company_id, workflow_id, payload)
        return workflow.id
    workflow, _ = workflows.create(session, company_id, payload)
    return workflow.id


# --------------------------------------------------------------------------- keys and workflows


@cli.group("keys")
def keys_group() -> None:
    """API keys."""


@keys_group.command("create")
@click.option("--company", required=True, help="company name; created when new")
@click.option("--name", default="default", show_default=True, help="a label for the key")
@click.option(
    "--scopes", default="admin", show_default=True, help="comma-separated, e.g. runs:read,runs:write"
)
def keys_create(company: str, name: str, scopes: str) -> None:
    """Create an API key and print it, alone, on stdout (it is not shown again)."""
    from app import keys

    with _services().db.session() as session:
        row = keys.get_or_create_company(session, company)
        key = keys.create_key(session, row, name, [s.strip() for s in scopes.split(",") if s.strip()])
        session.commit()
    click.echo(key)


@keys_group.command("list")
@click.option("--company", required=True, help="company name")
def keys_list(company: str) -> None:
    """The company's active keys: prefix, name, scopes, created, last used (never the key)."""
    from app import keys
    from app.timeutil import iso

    with _services().db.session() as session:
        rows = keys.list_keys(session, _company_id(session, company))
    for row in rows:
        used = iso(row.last_used_at) if row.last_used_at else "never"
        scopes = ",".join(keys.scope_list(row))
        click.echo(f"{row.prefix}\t{row.name}\t{scopes}\t{iso(row.created_at)}\t{used}")


@keys_group.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key whose prefix (the part after bk_) is PREFIX."""
    from app import keys

    with _services().db.session() as session:
        if not keys.revoke(session, prefix):
            _fail(f"no key with prefix {prefix!r}")
    click.echo(f"revoked {prefix}", err=True)


def _company_id(session: Any, name: str | None) -> str:
    from models import Company

    if name:
        company = session.execute(select(Company).where(Company.name == name)).scalar_one_or_none()
        if company is None:
            _fail(f"no company named {name!r}")
        return company.id
    companies = list(session.execute(select(Company).limit(2)).scalars())
    if len(companies) != 1:
        _fail("several companies (or none) exist: pass --company NAME")
    return companies[0].id


company_option = click.option("--company", default=None, help="company name (needed when there are several)")


@cli.group("workflows")
def workflows_group() -> None:
    """Workflow definitions."""


@workflows_group.command("apply")
@click.argument("file", type=click.File("r"))
@company_option
def workflows_apply(file: Any, company: str | None) -> None:
    """Create or update a workflow from a JSON file; prints its id."""
    from app import workflows
    from models import Workflow

    try:
        payload = json.load(file)
    except json.JSONDecodeError as exc:
        _fail(f"{file.name} is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        _fail(f"{file.name} must hold a JSON object")
    with _services().db.session() as session:
        company_id = _company_id(session, company)
        try:
            workflow_id = _apply(session, company_id, payload, workflows, Workflow)
        except BatonError as exc:
            details = "; ".join(f"{k}: {v[0]}" for k, v in (exc.details or {}).items()) or exc.message
            _fail(f"{exc.code}: {details}")
    click.echo(workflow_id)


@cli.group("secrets")
def secrets_group() -> None:
    """Encrypted secrets, used in templates as {{ secrets.NAME }}."""


@secrets_group.command("set")
@click.argument("name")
@company_option
def secrets_set(name: str, company: str | None) -> None:
    """Create or replace secret NAME; the value is read from stdin (a hidden prompt on a terminal)."""
    from app import secrets

    tty = sys.stdin.isatty()
    value = click.prompt("Value", hide_input=True) if tty else sys.stdin.read().rstrip("\r\n")
    services = _services()
    with services.db.session() as session:
        try:
            secrets.put(session, services.config, _company_id(session, company), name, value)
        except BatonError as exc:
            _fail(f"{exc.code}: {exc.message}")
    click.echo(f"set {name}", err=True)


@secrets_group.command("list")
@company_option
def secrets_list(company: str | None) -> None:
    """The company's secrets: name, created, updated (never the value)."""
    from app import secrets
    from app.timeutil import iso

    with _services().db.session() as session:
        rows = secrets.list_(session, _company_id(session, company))
    for row in rows:
        click.echo(f"{row.name}\t{iso(row.created_at)}\t{iso(row.updated_at)}")


@secrets_group.command("delete")
@click.argument("name")
@company_option
def secrets_delete(name: str, company: str | None) -> None:
    """Delete secret NAME."""
    from app import secrets

    with _services().db.session() as session:
        try:
            secrets.delete(session, _company_id(session, company), name)
        except BatonError as exc:
            _fail(f"{exc.code}: {exc.message}")
    click.echo(f"deleted {name}", err=True)


# --------------------------------------------------------------------------- runs


def _run_json(session: Any, company_id: str, run_id: str) -> dict[str, Any]:
    from api.runs import run_detail
    from api.schemas.runs import RunDetailSchema
    from app import engine

    run = engine.get_run(session, company_id, run_id)
    return RunDetailSchema().dump(run_detail(run, engine.step_runs(session, run.id)))


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@cli.group("runs")
def runs_group() -> None:
    """Inspect and control runs."""


@runs_group.command("list")
@company_option
@click.option("--workflow", "workflow_id", default=None)
@click.option("--status", default=None)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
def runs_list(company: str | None, workflow_id: str | None, status: str | None, limit: int) -> None:
    """List runs, newest first."""
    from api.schemas.runs import RunSummarySchema
    from models import RUN_STATUSES, Run

    if status is not None and status not in RUN_STATUSES:
        _fail(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    with _services().db.session() as session:
        query = select(Run).where(Run.company_id == _company_id(session, company))
        if workflow_id:
            query = query.where(Run.workflow_id == workflow_id)
        if status:
            query = query.where(Run.status == status)
        rows = session.execute(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)).scalars()
        _print(RunSummarySchema(many=True).dump(list(rows)))


@runs_group.command("get")
@click.argument("run_id")
@company_option
def runs_get(run_id: str, company: str | None) -> None:
    """Show a run with its step results."""
    with _services().db.session() as session:
        _print(_run_json(session, _company_id(session, company), run_id))


@runs_group.command("logs")
@click.argument("run_id")
@company_option
def runs_logs(run_id: str, company: str | None) -> None:
    """Show one log entry per attempt."""
    from api.schemas.runs import StepResultSchema, step_view
    from app import engine

    with _services().db.session() as session:
        run = engine.get_run(session, _company_id(session, company), run_id)
        _print(
            StepResultSchema(many=True).dump([step_view(a) for a in engine.step_attempts(session, run.id)])
        )


@runs_group.command("cancel")
@click.argument("run_id")
@company_option
def runs_cancel(run_id: str, company: str | None) -> None:
    """Cancel a pending or running run."""
    from app import engine

    services = _services()
    with services.db.session() as session:
        company_id = _company_id(session, company)
    run = engine.cancel_run(services, company_id, run_id)
    _print({"id": run.id, "status": run.status, "message": "Run cancellation requested"})


@runs_group.command("trigger")
@click.argument("workflow_id")
@company_option
@click.option("--input", "input_json", default=None, help="the run input as a JSON object")
@click.option("--input-file", type=click.File("r"), default=None, help="a file holding the input JSON")
def runs_trigger(workflow_id: str, company: str | None, input_json: str | None, input_file: Any) -> None:
    """Start a run by hand (trigger type manual); prints the run."""
    from app import engine

    if input_json is not None and input_file is not None:
        _fail("pass --input or --input-file, not both")
    source = input_file.read() if input_file is not None else (input_json or "{}")
    try:
        run_input = json.loads(source)
    except json.JSONDecodeError as exc:
        _fail(f"input is not valid JSON: {exc}")
    if not isinstance(run_input, dict):
        _fail("input must be a JSON object")
    services = _services()
    with services.db.session() as session:
        company_id = _company_id(session, company)
    run, _created = engine.trigger_run(services, company_id, workflow_id, run_input, "manual")
    with services.db.session() as session:
        _print(_run_json(session, company_id, run.id))


@runs_group.command("watch")
@click.argument("run_id")
@company_option
@click.option("--interval", default=0.5, show_default=True, type=float)
def runs_watch(run_id: str, company: str | None, interval: float) -> None:
    """Follow a run step by step until it ends; exits non-zero unless it completed."""
    services = _services()
    seen: dict[str, tuple[str, int]] = {}
    while True:
        with services.db.session() as session:
            data = _run_json(session, _company_id(session, company), run_id)
        for step in data["stepResults"]:
            state = (step["status"], step["attempt"])
            if seen.get(step["stepId"]) != state:
                seen[step["stepId"]] = state
                took = f" {step['durationMs']} ms" if step.get("durationMs") is not None else ""
                click.echo(f"{step['stepId']}: {step['status']} (attempt {step['attempt']}){took}")
        if is_terminal(data["status"]):
            click.echo(
                f"run {data['status']}" + (f": {data['error']['message']}" if data.get("error") else "")
            )
            sys.exit(0 if data["status"] == RunStatus.COMPLETED else 1)
        time.sleep(interval)
