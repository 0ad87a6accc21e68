"""The ``baton`` command (a Flask ``FlaskGroup``).

Local commands act on this deployment (processes, database, keys); everything an operator does to
runs, workflows and secrets goes over the HTTP API (``app/cli_remote.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from flask.cli import FlaskGroup

from app import cli_remote
from app.client import ClientError
from app.config import Config
from app.errors import BatonError

EXAMPLE = Path(__file__).resolve().parent / "examples" / "hello.json"
EXIT_SIGINT, EXIT_SIGTERM, EXIT_BROKEN_PIPE = 130, 143, 141


class Stopped(Exception):
    """SIGTERM reached a command (a long watch or listing): stop where it is."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Stopped()


class BatonGroup(FlaskGroup):
    """Baton's commands only (no app is built to list them), every error as one line on stderr."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Flask's --app, --debug and --env-file select and configure an app none of these commands loads.
        self.params = [p for p in self.params if p.name not in ("app", "debug", "env_file")]

    def list_commands(self, ctx: click.Context) -> list[str]:
        # FlaskGroup would build the app here, connecting to Redis and the database for `--help`.
        return sorted(self.commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self.commands.get(name)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("with_appcontext", False)  # no command needs the Flask app
        return super().command(*args, **kwargs)

    def group(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", click.Group)
        return super().group(*args, **kwargs)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's main, with every failure printed as one line and its exit status."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        with _sigterm_stops():
            try:
                code = super().main(*args, standalone_mode=False, **kwargs)
            except click.exceptions.NoArgsIsHelpError as exc:
                exc.show()  # `baton` or `baton runs` alone: the help, as click shows it
                sys.exit(exc.exit_code)
            except click.exceptions.UsageError as exc:
                hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
                _exit_with(f"Error: {exc.format_message()}{hint}", exc.exit_code)
            except click.ClickException as exc:
                _exit_with(f"Error: {exc.format_message()}", exc.exit_code)
            except click.Abort:
                _exit_with("Aborted.", EXIT_SIGINT)
            except Stopped:
                _exit_with("Stopped.", EXIT_SIGTERM)
            except BrokenPipeError:
                # The reader went away (`| head`): say nothing, and keep exit-time flushes quiet too.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(EXIT_BROKEN_PIPE)
            except Exception as exc:  # noqa: BLE001  (any error is one line, never a traceback)
                _exit_with(one_line(exc), 1)
        sys.exit(code if isinstance(code, int) else 0)


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM ends a command like Ctrl-C does (commands that own processes install their own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_with(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def one_line(exc: BaseException) -> str:
    """An error as one readable line: the API's code, an infrastructure cause, or its type."""
    import redis
    from sqlalchemy import exc as sa

    if isinstance(exc, BatonError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, ClientError):
        return f"Error: {exc}"
    if isinstance(exc, sa.DBAPIError):
        cause = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        return f"Error: database (DATABASE_URL): {cause}"
    if isinstance(exc, redis.RedisError):
        return f"Error: Redis (REDIS_URL): {_first_line(exc)}"
    if isinstance(exc, ImportError):
        return f"Error: a module is missing ({_first_line(exc)}); is Baton installed with its dependencies?"
    return f"Error: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@click.group(cls=BatonGroup, add_default_commands=False, add_version_option=False)
def cli() -> None:
    """Baton: execute and monitor multi-step workflow runs.

    Runs, workflows, deliveries and secrets are reached over the API: BATON_URL (default
    http://127.0.0.1:8000) and BATON_API_KEY, or the profile `baton login` writes.
    """


for _command in cli_remote.COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli.main(prog_name="baton")


def _fail(message: str) -> None:
    raise click.ClickException(message)


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


# Threads per API process: each open event stream holds one for up to api.events.STREAM_MAX_S.
API_THREADS = 16


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
        "--worker-class",
        "gthread",
        "--threads",
        str(API_THREADS),
        "--config",
        "python:app.gunicorn_conf",
        "--graceful-timeout",
        "20",
        "--access-logfile",
        "/dev/stderr",
        "--no-control-socket",
        "--log-level",
        config.log_level.lower(),
        "--logger-class",
        "app.gunicorn_logging.GunicornLogger",
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


@cli.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn worker processes")
def api_cmd(host: str, port: int, workers: int) -> None:
    """Run the HTTP API under gunicorn."""
    config = _config()
    _prepare_embedded(config)
    _exec(api_command(config, host, port, workers), _child_env(config))


@cli.command("worker")
@click.option("--processes", "-p", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", "-t", default=8, show_default=True, type=click.IntRange(min=1))
def worker_cmd(processes: int, threads: int) -> None:
    """Run Dramatiq worker processes that execute steps; a worker process that dies is restarted."""
    config = _config()
    _prepare_embedded(config)
    # exec: the supervisor keeps this PID, so its worker processes are this command's children.
    _exec(worker_command(processes, threads), worker_env(config))


def _prepare_embedded(config: Config) -> None:
    """Check what a long-running process needs, in one line each; only `baton dev` starts Redis."""
    if config.embedded_redis:
        from app.embedded import redis_answers

        if not redis_answers(config.redis_socket):
            _fail(f"no Redis answers on {config.redis_socket}: set REDIS_URL, or start `baton dev`")
    else:
        _wait_for_redis(config)
    if config.resolved_broker_url().startswith("amqp"):
        import importlib.util

        if importlib.util.find_spec("pika") is None:
            _fail("BROKER_URL is amqp://… but the RabbitMQ client (pika) is not installed")
    if config.embedded_database:
        _upgrade(config)


def _wait_for_redis(config: Config, timeout_s: float = 5.0) -> None:
    """REDIS_URL must answer within a few seconds (a server starting alongside gets its chance)."""
    import redis

    client = redis.Redis.from_url(config.resolved_redis_url(), socket_connect_timeout=1, socket_timeout=2)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                _fail(f"no Redis answers at REDIS_URL ({_first_line(exc)})")
            time.sleep(0.25)
        finally:
            client.close()


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


@cli.command("scheduler")
def scheduler_cmd() -> None:
    """Run the scheduler: recovery sweeps and run timeouts (one active instance, others stand by)."""
    config = _config()
    _prepare_embedded(config)
    _exec(scheduler_command(), _child_env(config))


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration."""
    config = _config()
    _upgrade(config)
    click.echo("database is at the latest schema", err=True)


@db_group.command("rotate-secrets")
def db_rotate_secrets() -> None:
    """Re-encrypt every stored secret with the first key of BATON_SECRETS_KEYS (then the old key
    can be removed from the list)."""
    from app import secrets

    config = _config()
    with _database_session() as session:
        count, unreadable = secrets.rotate(session, config)
    click.echo(f"re-encrypted {count} secret(s) with the first key", err=True)
    if unreadable:
        _fail(
            f"{len(unreadable)} secret(s) no configured key decrypts were left as they are: {unreadable[:5]}"
        )


# --------------------------------------------------------------------------- dev


@cli.command("dev")
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
    env = {
        "BATON_HTTP_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
        **_child_env(config),
        "BATON_LOG_FORMAT": "text",
    }
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
        _say(f"starting {processes} worker processes x {threads} threads")
        children.append(("worker", subprocess.Popen(worker_command(processes, threads), env=env)))
        _say("starting the scheduler: cron schedules fire, recovery sweeps and run timeouts run")
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


# --------------------------------------------------------------------------- keys


@contextmanager
def _database_session() -> Iterator[Any]:
    """A session on the deployment's database (no Redis, no app: key administration is local)."""
    from app.db import Database

    config = _config()
    if config.embedded_database:
        _upgrade(config)  # the embedded SQLite file may not exist yet
    db = Database(config, pool_size=1)
    try:
        with db.session() as session:
            yield session
    finally:
        db.dispose()


@cli.group("keys")
def keys_group() -> None:
    """API keys (on the local deployment's database)."""


@keys_group.command("create")
@click.option("--company", required=True, help="company name; created when new")
@click.option("--name", default="default", show_default=True, help="a label for the key")
@click.option(
    "--scopes", default="admin", show_default=True, help="comma-separated, e.g. runs:read,runs:write"
)
def keys_create(company: str, name: str, scopes: str) -> None:
    """Create an API key and print it, alone, on stdout (it is not shown again)."""
    from app import keys

    with _database_session() as session:
        row = keys.get_or_create_company(session, company)
        key = keys.create_key(session, row, name, [s.strip() for s in scopes.split(",") if s.strip()])
        session.commit()
    click.echo(key)


@keys_group.command("list")
@click.option("--company", required=True, help="company name")
def keys_list(company: str) -> None:
    """The company's active keys: prefix, name, scopes, created, last used (never the key)."""
    from sqlalchemy import select

    from app import keys
    from app.timeutil import iso
    from models import Company

    with _database_session() as session:
        row = session.execute(select(Company).where(Company.name == company)).scalar_one_or_none()
        if row is None:
            _fail(f"no company named {company!r}")
        rows = keys.list_keys(session, row.id)
    for key in rows:
        used = iso(key.last_used_at) if key.last_used_at else "never"
        scopes = ",".join(keys.scope_list(key))
        click.echo(f"{key.prefix}\t{key.name}\t{scopes}\t{iso(key.created_at)}\t{used}")


@keys_group.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key whose prefix (the part after bk_) is PREFIX."""
    from app import keys

    with _database_session() as session:
        if not keys.revoke(session, prefix):
            _fail(f"no key with prefix {prefix!r}")
    click.echo(f"revoked {prefix}", err=True)
