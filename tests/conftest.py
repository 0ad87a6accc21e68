"""Fixtures: the real PostgreSQL and Redis, a real Dramatiq worker on the real broker.

``DATABASE_URL`` and ``REDIS_URL`` (read through ``Config``) choose the servers; they default to
the local PostgreSQL database ``test`` and Redis on 127.0.0.1:6379. ``BROKER_URL=amqp://…`` runs
the steps through RabbitMQ instead of Redis (queues named after the session's namespace, deleted
at the end); Redis still holds cancel flags, locks and limits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import requests
from sqlalchemy import text
from werkzeug.serving import make_server

from app import keys
from app.config import Config
from app.db import Database
from app.engine.states import RUN_TERMINAL
from app.factory import create_app
from app.migrate import upgrade
from app.queue import StepQueue, make_broker, make_redis
from app.services import Services

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
DEAD_AMQP_URL = "amqp://guest:guest@127.0.0.1:1/%2F"
# The engine says which statuses are final; tests do not keep a copy of their own.
TERMINAL = tuple(sorted(RUN_TERMINAL))


SCHEMA = f"baton_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def config() -> Config:
    """A schema of its own per session, so concurrent test sessions never collide."""
    env = Config.from_env()
    base = env.database_url or DEFAULT_DATABASE_URL
    redis_url = env.redis_url or DEFAULT_REDIS_URL
    separator = "&" if "?" in base else "?"
    return env.with_overrides(
        database_url=f"{base}{separator}options=-csearch_path%3D{SCHEMA}&application_name={SCHEMA}",
        redis_url=redis_url,
        # RabbitMQ when BROKER_URL says amqp://; otherwise the broker is the Redis above.
        broker_url=env.broker_url if env.rabbitmq_broker else None,
        queue_namespace=f"baton-test-{uuid.uuid4().hex[:8]}",
        http_allow_networks=("127.0.0.0/8", "::1/128"),  # step targets are local listeners
        # The suite's own traffic and per-second schedules are not what the limits guard against.
        rate_limit="1000000/minute",
        webhook_rate_limit="1000000/minute",
        schedule_min_interval_s=1,
    )


@pytest.fixture(scope="session")
def services(config: Config) -> Iterator[Services]:
    db = Database(config, pool_size=20)
    assert not db.is_sqlite, "the suite runs against PostgreSQL"
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    upgrade(db)
    broker = make_broker(config)
    svc = Services(
        db=db,
        redis=make_redis(config),
        queue=StepQueue(broker),
        namespace=config.queue_namespace,
        config=config,
    )
    yield svc
    for key in svc.redis.scan_iter(f"{config.queue_namespace}:*"):
        svc.redis.delete(key)
    svc.queue.delete_queues()
    broker.close()
    db.dispose()
    with db.engine.begin() as conn:
        # Connections of processes the tests started (and killed) must not hold the schema.
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name "
                "AND pid <> pg_backend_pid()"
            ),
            {"name": SCHEMA},
        )
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    db.dispose()


@pytest.fixture(scope="session")
def worker(services: Services) -> Iterator[dramatiq.Worker]:
    """A real Dramatiq worker consuming the real broker (Redis or RabbitMQ), in this process."""
    broker = services.queue.broker
    dramatiq.set_broker(broker)
    import workers.actions  # noqa: F401
    from workers import actors
    from workers.middleware import ProcessServices

    broker.add_middleware(ProcessServices(services))
    actors.register(services.queue)
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    yield worker
    worker.stop(timeout=10_000)


@pytest.fixture
def scheduler(services: Services) -> Iterator[Any]:
    """The scheduler (recovery sweeps, run timeouts) in a thread, only for the tests that ask for it:
    a sweeper running behind every test would race tests that drive the sweeps with their own clock."""
    with running_scheduler(services, interval_s=0.05) as instance:
        yield instance


@contextmanager
def running_scheduler(services: Services, interval_s: float) -> Iterator[Any]:
    """A scheduler in a thread of this process, stopped and joined on exit."""
    from workers.scheduler import Scheduler

    instance = Scheduler(services, interval_s=interval_s)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    try:
        yield instance
    finally:
        instance.stop()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def app(config: Config, services: Services) -> Any:
    flask_app = create_app(config, services)
    flask_app.testing = True
    return flask_app


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def session_env(config: Config) -> dict[str, str]:
    """The environment for a Baton process a test starts: this session's broker (``BROKER_URL``
    only when it is RabbitMQ; otherwise the process's ``REDIS_URL`` is its broker)."""
    env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"}
    if config.broker_url:
        env["BROKER_URL"] = config.broker_url
    return env


BATON = str(Path(sys.executable).with_name("baton"))


@contextmanager
def baton_api(config: Config, log: Path, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``baton api`` (gunicorn) on the session's database, Redis and broker, on a free loopback
    port, its output in ``log``: (base URL, process). Stopped with SIGTERM (then killed) unless the
    test already stopped it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = session_env(config)
    env.update(
        DATABASE_URL=str(config.database_url),
        REDIS_URL=str(config.redis_url),
        BATON_QUEUE_NAMESPACE=config.queue_namespace,
        BATON_RATE_LIMIT="1000000/minute",
        BATON_LOG_LEVEL="WARNING",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [BATON, "api", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 30, f"baton api on {base}\n{log.read_text(errors='replace')}")
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def unreachable(config: Config) -> Config:
    """``config`` with its Redis and its broker (of the same kind) where nothing answers."""
    return config.with_overrides(
        redis_url=DEAD_REDIS_URL, broker_url=DEAD_AMQP_URL if config.rabbitmq_broker else None
    )


def new_key(services: Services, label: str = "test") -> str:
    """A key for a brand-new company."""
    with services.db.session() as session:
        company = keys.get_or_create_company(session, f"{label}-{uuid.uuid4().hex[:12]}")
        key = keys.create_key(session, company)
        session.commit()
    return key


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds (never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def api_key(services: Services) -> str:
    """A fresh company per test keeps tests independent without truncating tables."""
    return new_key(services)


@pytest.fixture
def headers(api_key: str) -> dict[str, str]:
    return {"x-api-key": api_key}


@pytest.fixture(scope="session")
def live_server(app: Any) -> Iterator[str]:
    """The API over real HTTP, for the spec's curl and requests examples."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


class Target:
    """A local HTTP server standing in for a step's target: scripted replies, recorded requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, Any, dict[str, str]]] = []
        self.delay_s = 0.0
        self.lock = threading.Lock()
        target = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with target.lock:
                    target.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": dict(self.headers),
                            "json": body,
                            "at": time.monotonic(),
                        }
                    )
                    status, reply, extra = (
                        target.replies.pop(0) if target.replies else (200, {"ok": True}, {})
                    )
                if target.delay_s:
                    time.sleep(target.delay_s)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        self.replies.append((status, body if body is not None else {"status": status}, headers or {}))


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.server.shutdown()


@pytest.fixture
def make_workflow(client: Any, headers: dict[str, str]) -> Callable[..., str]:
    def make(steps: list[dict[str, Any]], **extra: Any) -> str:
        response = client.post(
            "/api/v1/workflows", json={"name": "test", "steps": steps, **extra}, headers=headers
        )
        assert response.status_code == 201, response.get_json()
        return response.get_json()["data"]["id"]

    return make


@pytest.fixture
def trigger(client: Any, headers: dict[str, str]) -> Callable[..., dict[str, Any]]:
    def run(workflow_id: str, run_input: dict[str, Any] | None = None) -> dict[str, Any]:
        response = client.post(
            f"/api/v1/workflows/{workflow_id}/runs", json={"input": run_input or {}}, headers=headers
        )
        assert response.status_code == 202, response.get_json()
        return response.get_json()["data"]

    return run


@pytest.fixture
def wait_run(client: Any, headers: dict[str, str]) -> Callable[..., dict[str, Any]]:
    def wait(run_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            data = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
            if data["status"] in statuses:
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {data['status']} after {timeout}s: {data}")
            time.sleep(0.02)

    return wait


def assert_rate_limited(response: Any) -> None:
    """A 429 in the spec's envelope, with a Retry-After within the day."""
    assert response.status_code == 429
    assert response.get_json() == {
        "success": False,
        "error": {"code": "RATE_LIMITED", "message": "Too many requests"},
    }
    assert 1 <= int(response.headers["Retry-After"]) <= 24 * 3600


def after_revoking(
    services: Any, key: str, status: Callable[[], int], ok: int, warm: int
) -> tuple[list, list]:
    """``status()`` (a request with ``key``, on a new connection each time so every API process
    answers and caches the key) ``warm`` times, each ``ok``; then the key is revoked and asked for
    2 s. Returns the seconds after the revocation of each request still accepted, and the codes of
    the requests after the first second."""
    from app import keys

    assert [status() for _ in range(warm)] == [ok] * warm
    with services.db.session() as session:
        assert keys.revoke(session, key.split("_")[1])
    revoked_at = time.monotonic()
    seen: list[tuple[float, int]] = []
    while time.monotonic() < revoked_at + 2.0:
        seen.append((time.monotonic(), status()))
    accepted = [at - revoked_at for at, code in seen if code == ok]
    late = [code for at, code in seen if at > revoked_at + 1.0]
    return accepted, late
