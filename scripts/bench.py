#!/usr/bin/env python3
"""Benchmark Baton side by side with bare Dramatiq on the same Redis (DESIGN §11 budgets).

Run from the repository root with the project's virtualenv:

    .venv/bin/python scripts/bench.py            # defaults: 3-5 minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick    # about 1 minute, smaller workloads
    .venv/bin/python scripts/bench.py --phases list --list-runs 1000000   # DESIGN's table size

It uses a dedicated PostgreSQL database (``baton_bench``, created when missing, emptied at the
start) and a dedicated Redis database (db 2, flushed at the start), starts ``baton api`` and
``baton worker`` as child processes, and measures:

1. throughput: N runs x 5 no-op ``transform`` steps, triggered through the API with the workers
   stopped, then executed by ``baton worker -p 2 -t 8``; steps/s counts from the first step's
   start to the last run's completion (and, for information, from the worker's spawn). Baseline:
   bare Dramatiq chains of 5 messages (each hop only enqueues the next), same processes and
   threads, timed the same way. Rounds alternate Baton and bare; medians are reported.
2. PostgreSQL commits per executed step: ``pg_stat_database.xact_commit`` of the bench database
   around the trigger and the execution windows, read after the processes that did the work
   have exited (a backend publishes its counters when it exits; an idle one may wait 10 s), the
   bench's own polling statements subtracted. Also shown: transactions that were given an xid
   (those that wrote or locked rows), counted on the whole cluster, so only meaningful on an
   otherwise quiet server.
3. sequential latency: a run of 40 steps, trigger to ``completed_at``; baseline: a 40-message
   chain, enqueue to last hop.
4. API: triggers/s from 8 client threads, median of batches, with no workers running and again
   while ``baton worker`` executes the runs (each client thread keeps one keep-alive connection
   and sends real, separate trigger requests, each response read and checked: 202 and a run id;
   a lean client, since ``requests`` costs as much CPU per call as the trigger itself), runs/s
   through the batch trigger (batches of 1,000 from 2 threads), and trigger-to-completed of a
   1-step run at idle (p50, p99).
5. ``GET /api/v1/runs`` p50/p99 on ``--list-runs`` seeded runs for several filters and cursor
   depths (DESIGN's budget is for 1,000,000 runs; the default seeds 100,000 to stay short, and
   seeding 1,000,000 takes about 40 s more).

Progress goes to stderr, the summary table to stdout, and every figure to
``var/bench-results.json``. Exits 1 when a phase fails (runs not completing, HTTP errors), 130
on Ctrl-C or SIGTERM (every child process is stopped first), and, with ``--strict``, 2 when a
target is missed. Child process output is kept in ``var/bench-*.log``. The machine is shared:
run it when nothing else is busy, and compare ratios rather than absolute figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var"
BARE_NAMESPACE = "bench-bare"
BENCH_AMQP_NAMESPACE = "baton-bench"  # Baton's queues on RabbitMQ with --broker-url
BARE_QUEUE = "hops"
BARE_ACTORS = f'''"""Bare Dramatiq baseline for Baton's bench: each hop does nothing but enqueue the next."""

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"], namespace="{BARE_NAMESPACE}")
dramatiq.set_broker(broker)
marks = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@dramatiq.actor(queue_name="{BARE_QUEUE}", max_retries=0)
def hop(chain, index, length, key):
    if index == 0 and chain < 16:  # the first chains mark when work began
        marks.set(key + ":first", repr(time.time()), nx=True)
    if index + 1 < length:
        hop.send(chain, index + 1, length, key)
    else:
        marks.rpush(key + ":done", repr(time.time()))
'''

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
T0 = time.monotonic()


class BenchError(Exception):
    """A phase failed; the benchmark cannot give a figure for it."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived."""


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def epoch_ms(value: datetime) -> int:
    return (value - EPOCH) // timedelta(milliseconds=1)


def cursor_for(created_at: datetime, run_id: str) -> str:
    raw = json.dumps({"ts": epoch_ms(created_at), "id": run_id}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode()


# --------------------------------------------------------------------------- child processes


class Children:
    """Every process the bench starts, each in a session of its own so the whole tree stops together."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path
    ) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            raise BenchError(f"{name} is already running")
        with open(log_path, "ab") as out:
            out.write(f"\n===== {name}: {' '.join(args[1:])}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.logs[name] = log_path
        return proc

    def check(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode}\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {path.relative_to(REPO)}:\n" + "\n".join(text)

    def stop(self, name: str, timeout: float = 40) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            # The leader only: dramatiq and gunicorn pass SIGTERM on to their own children (a
            # second SIGTERM would make a dramatiq worker process exit hard).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop within {timeout:.0f} s; killing it")
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        # Stragglers of the same process group (a worker process whose parent died first).
        self._signal(proc, signal.SIGKILL)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
        try:
            os.killpg(proc.pid, signum)  # the group id is the child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


# --------------------------------------------------------------------------- PostgreSQL


class Probe:
    """An autocommit connection to the bench database that counts its own transactions.

    Each statement is one transaction, so the commit figures subtract ``statements``. Server-side
    prepared statements are off: their Parse/Sync would be transactions of their own.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, prepare_threshold=None)
        self.statements = 0

    def one(self, query: str, params: Any = None) -> Any:
        self.statements += 1
        return self.conn.execute(query, params).fetchone()

    def all(self, query: str, params: Any = None) -> list[Any]:
        self.statements += 1
        return self.conn.execute(query, params).fetchall()

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = psycopg.connect(self.url, autocommit=True, prepare_threshold=None)

    def close(self) -> None:
        self.conn.close()


class Stats:
    """``xact_commit`` of the bench database, read from the ``postgres`` database (no commit of its own).

    PostgreSQL 15 publishes a backend's counters at most once a second and, when it goes idle
    right after a flush, only 10 s later; pg_stat_force_next_flush() acts on the calling session
    only. A backend that exits publishes at once, so the bench reads the counter after the
    processes that did the work (API, workers, its own probe connection) have closed their
    connections, and waits until the figure stops moving.
    """

    def __init__(self, conn: psycopg.Connection[Any], dbname: str) -> None:
        self.conn = conn
        self.dbname = dbname

    def commits(self) -> int:
        row = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.dbname,)
        ).fetchone()
        return int(row[0])

    def client_backends(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
            (self.dbname,),
        ).fetchone()
        return int(row[0])

    def next_xid(self) -> int:
        """The next transaction id of the whole cluster: counts transactions that wrote something."""
        row = self.conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
        return int(row[0])

    def settled_commits(self) -> int:
        previous, steady = self.commits(), 0
        for _ in range(60):
            time.sleep(0.25)
            current = self.commits()
            steady = steady + 1 if current == previous else 0
            if steady == 2:
                return current
            previous = current
        log("warning: xact_commit kept moving (autovacuum or another client?)")
        return previous


def connect_admin(server: str) -> psycopg.Connection[Any]:
    last: Exception | None = None
    for dbname in ("postgres", "test"):
        try:
            return psycopg.connect(f"{server}/{dbname}", autocommit=True, prepare_threshold=None)
        except psycopg.OperationalError as exc:
            last = exc
    raise BenchError(f"cannot connect to PostgreSQL at {server}: {last}")


# --------------------------------------------------------------------------- HTTP


class TriggerConnection:
    """One keep-alive HTTP/1.1 connection for triggers: each call sends one real, separate request
    (``POST /api/v1/workflows/:id/runs``) and reads and checks its whole response: the status line,
    a ``Content-Length`` body, and the run id in the JSON envelope. None of an HTTP library's
    per-call work (``requests`` costs about as much client CPU as the trigger costs the server),
    so on a 2-core machine the client does not eat the CPU the API is measured on; the request
    bytes are built once per workflow."""

    IDLE_S = 1.0  # gunicorn closes a kept-alive connection after 2 s idle: reconnect before that

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.address = (host, int(port or 80))
        self.host = f"{host}:{port}" if port else host
        self.key = key
        self.requests: dict[str, bytes] = {}
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.used_at = 0.0

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection(self.address, timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.used_at = time.monotonic()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buffer = b""

    def trigger(self, workflow_id: str) -> str:
        """Trigger a run; its id (a BenchError unless the answer is 202 with a run id)."""
        request = self.requests.get(workflow_id)
        if request is None:
            body = b'{"input":{}}'
            request = self.requests[workflow_id] = (
                f"POST /api/v1/workflows/{workflow_id}/runs HTTP/1.1\r\nHost: {self.host}\r\n"
                f"x-api-key: {self.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        status, body = self.send(request)
        run_id = None
        if status == 202:
            try:
                run_id = json.loads(body)["data"]["id"]
            except (ValueError, KeyError, TypeError):
                pass
        if not (isinstance(run_id, str) and run_id.startswith("run_")):
            raise BenchError(f"POST /api/v1/workflows/{workflow_id}/runs: HTTP {status}: {body[:300]!r}")
        return run_id

    def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one request and read its response: (status, body)."""
        if self.sock is None or time.monotonic() - self.used_at > self.IDLE_S:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self._receive()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                raise BenchError("the API answered a trigger with a chunked body")
        if length is None:
            raise BenchError("the API answered a trigger without Content-Length")
        self.buffer = rest
        while len(self.buffer) < length:
            self._receive()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        self.used_at = time.monotonic()
        if close:
            self.close()
        return status, body

    def _receive(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            self.close()
            raise BenchError("the API closed a connection before answering a trigger")
        self.buffer += chunk


class Api:
    """The Baton HTTP API: one ``requests.Session`` per thread for setup and reads, and one lean
    keep-alive connection per thread for single triggers (``TriggerConnection``)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.key = ""
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["x-api-key"] = self.key
            self._local.session = session
        return session

    def trigger_connection(self) -> TriggerConnection:
        """A new connection for triggers, opened now."""
        conn = TriggerConnection(self.base_url, self.key)
        conn.connect()
        return conn

    def post(self, path: str, body: Any, expect: int) -> dict[str, Any]:
        response = self.session.post(self.base_url + path, json=body, timeout=30)
        if response.status_code != expect:
            raise BenchError(f"POST {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()["data"]

    def create_workflow(self, name: str, steps: int) -> str:
        definition = {
            "name": name,
            "steps": [{"id": f"s{i + 1}", "action": "transform", "input": {}} for i in range(steps)],
        }
        return self.post("/api/v1/workflows", definition, 201)["id"]

    def trigger(self, workflow_id: str) -> str:
        """One trigger from this thread's connection (a new one when the API or the key changed)."""
        conn = getattr(self._local, "trigger_conn", None)
        if conn is None or conn.base_url != self.base_url or conn.key != self.key:
            if conn is not None:
                conn.close()
            conn = self._local.trigger_conn = TriggerConnection(self.base_url, self.key)
        return conn.trigger(workflow_id)

    def trigger_batch(self, workflow_id: str, size: int) -> None:
        items = [{"input": {"i": i}} for i in range(size)]
        data = self.post(f"/api/v1/workflows/{workflow_id}/runs/batch", {"items": items}, 202)
        statuses = {item["status"] for item in data["items"]}
        if len(data["items"]) != size or statuses != {"created"}:
            raise BenchError(f"batch trigger: {len(data['items'])} items, statuses {sorted(statuses)}")


def trigger_many(api: Api, workflow_id: str, count: int, threads: int) -> float:
    """Trigger ``count`` runs from ``threads`` client threads; returns the elapsed seconds.

    Each thread has one keep-alive connection, opened before the clock starts, and sends its
    triggers one after another: each a real, separate HTTP request whose response is read and
    checked (202 and a run id) before the next is sent.
    """
    conns = [api.trigger_connection() for _ in range(threads)]
    tickets = iter(range(count))  # next() on it is atomic under the GIL
    errors: list[BaseException] = []

    def work(conn: TriggerConnection) -> None:
        try:
            while not errors and next(tickets, None) is not None:
                conn.trigger(workflow_id)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(conn,), daemon=True) for conn in conns]
    try:
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise errors[0]
    return elapsed


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children) -> None:
        self.args = args
        self.children = children
        self.server = args.pg.rstrip("/")
        self.db_url = f"{self.server}/{args.db_name}"
        self.baton = str(Path(sys.executable).with_name("baton"))
        if not Path(self.baton).exists():
            self.baton = shutil.which("baton") or "baton"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("BROKER_URL", "BATON_ACTION_MODULES", "PYTHONPATH")
        }
        self.env.update(
            DATABASE_URL=self.db_url.replace("postgresql://", "postgresql+psycopg://", 1),
            REDIS_URL=args.redis_url,
            BATON_LOG_LEVEL="WARNING",
            BATON_VAR_DIR=str(VAR),
        )
        if args.broker_url:
            # Baton's steps on this broker (RabbitMQ: queues named after the namespace); the bare
            # baseline stays on Redis.
            self.env.update(BROKER_URL=args.broker_url, BATON_QUEUE_NAMESPACE=BENCH_AMQP_NAMESPACE)
        self.redis = redis.Redis.from_url(args.redis_url)
        self.api = Api("")
        self.results: dict[str, Any] = {}
        self.admin: psycopg.Connection[Any] | None = None
        self.probe: Probe | None = None
        self.stats: Stats | None = None
        self.tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.bare_broker: Any = None

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        VAR.mkdir(exist_ok=True)
        self.admin = connect_admin(self.server)
        self.stats = Stats(self.admin, self.args.db_name)
        if self.admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (self.args.db_name,)
        ).fetchone():
            log(f"using database {self.args.db_name}")
        else:
            log(f"creating database {self.args.db_name}")
            self.admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.args.db_name)))
        self.results["postgres"] = self.admin.execute("SHOW server_version").fetchone()[0]
        self.redis.ping()
        self.redis.flushdb()
        self.drop_baton_messages()
        log("migrating (baton db upgrade)")
        self._baton("db", "upgrade")
        self.probe = Probe(self.db_url)
        tables = [
            r[0]
            for r in self.probe.all(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename <> 'alembic_version'"
            )
        ]
        self.probe.conn.execute(
            sql.SQL("TRUNCATE {} CASCADE").format(sql.SQL(", ").join(map(sql.Identifier, tables)))
        )
        key = self._baton("keys", "create", "--company", "bench").strip()
        if not key.startswith("bk_") or "\n" in key:
            raise BenchError(f"baton keys create printed something unexpected: {key[:80]!r}")
        self.company_id = self.probe.one("SELECT id FROM companies WHERE name = 'bench'")[0]
        self.api.key = key
        self.tmpdir = tempfile.TemporaryDirectory(prefix="baton-bench-")
        Path(self.tmpdir.name, "bench_bare_actors.py").write_text(BARE_ACTORS)
        self.start_api()

    def drop_baton_messages(self) -> None:
        """Empty Baton's step queue: its Redis keys, or its RabbitMQ queues when --broker-url."""
        for key in self.redis.scan_iter(match="baton:*"):
            self.redis.delete(key)
        if self.args.broker_url:
            from app.config import Config
            from app.queue import StepQueue, make_broker

            config = Config(broker_url=self.args.broker_url, queue_namespace=BENCH_AMQP_NAMESPACE)
            queue = StepQueue(make_broker(config))
            queue.delete_queues()
            queue.broker.close()

    def _baton(self, *argv: str) -> str:
        done = subprocess.run(
            [self.baton, *argv], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise BenchError(
                f"baton {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}"
            )
        return done.stdout

    def start_api(self) -> None:
        port = free_port()
        self.api.base_url = f"http://127.0.0.1:{port}"
        log(f"starting baton api --workers {self.args.api_workers} on port {port}")
        self.children.start(
            "api",
            [
                self.baton,
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(self.args.api_workers),
            ],
            self.env,
            VAR / "bench-api.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.children.check("api")
            try:
                if requests.get(self.api.base_url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise BenchError("the API did not become ready within 60 s\n" + self.children.tail("api"))

    def flushed_commits(self) -> tuple[int, int]:
        """(xact_commit of the bench database once every backend that worked has exited and so
        published its statistics, the cluster's next transaction id).

        The API is restarted for that, and the caller stops the workers first.
        """
        assert self.probe is not None and self.stats is not None
        self.children.stop("api")
        self.probe.close()
        deadline = time.monotonic() + 15
        while self.stats.client_backends() and time.monotonic() < deadline:
            time.sleep(0.05)
        commits, xid = self.stats.settled_commits(), self.stats.next_xid()
        if self.stats.client_backends():
            log("warning: other clients are connected to the bench database; commit counts may be off")
        self.probe.reconnect()
        self.start_api()
        return commits, xid

    def start_baton_workers(self) -> None:
        self.children.start(
            "baton-worker",
            [
                self.baton,
                "worker",
                "--processes",
                str(self.args.processes),
                "--threads",
                str(self.args.threads),
            ],
            self.env,
            VAR / "bench-worker.log",
        )

    def start_bare_workers(self) -> None:
        assert self.tmpdir is not None
        env = dict(self.env, BENCH_REDIS_URL=self.args.redis_url, dramatiq_worker_timeout="100")
        self.children.start(
            "bare-worker",
            [
                sys.executable,
                "-m",
                "dramatiq",
                "bench_bare_actors",
                "--path",
                self.tmpdir.name,
                "--processes",
                str(self.args.processes),
                "--threads",
                str(self.args.threads),
                "--skip-logging",
            ],
            env,
            VAR / "bench-bare.log",
        )

    def bare_send(self, chain: int, length: int, key: str) -> None:
        if self.bare_broker is None:
            from dramatiq.brokers.redis import RedisBroker

            self.bare_broker = RedisBroker(url=self.args.redis_url, namespace=BARE_NAMESPACE)
            self.bare_broker.declare_queue(BARE_QUEUE)
        from dramatiq import Message

        self.bare_broker.enqueue(
            Message(
                queue_name=BARE_QUEUE, actor_name="hop", args=(chain, 0, length, key), kwargs={}, options={}
            )
        )

    # ----------------------------------------------------------------- waiting

    def wait_for(
        self, label: str, target: int, count: Callable[[], int], worker: str, interval: float = 0.1
    ) -> float:
        """Poll ``count`` until it reaches ``target``; returns the monotonic time it did."""
        last_value, last_change, last_report = -1, time.monotonic(), time.monotonic()
        while True:
            value = count()
            now = time.monotonic()
            if value >= target:
                return now
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.args.timeout:
                raise BenchError(
                    f"{label}: no progress for {self.args.timeout:.0f} s ({value}/{target})\n"
                    + self.children.tail(worker)
                )
            if now - last_report >= 2:
                log(f"{label}: {value}/{target}")
                last_report = now
            self.children.check(worker)
            time.sleep(interval)

    # ----------------------------------------------------------------- 4a. triggers/s

    def triggers_per_second(self) -> None:
        """Single triggers/s (``trigger_many``): batches of a 1-step run, median over the batches;
        first with no worker running (the API alone), then again while ``baton worker`` executes
        the runs as they arrive. Each of the two uses a new key of the bench company: the per-key
        rate limit is still checked on every request, but neither spends the budget of the other
        or of the later phases."""
        a = self.args
        assert self.probe is not None
        workflow_id = self.api.create_workflow("bench-triggers", 1)
        batches = max(1, a.trigger_batches)
        size = max(1, a.triggers // batches)
        main_key = self.api.key
        try:
            self.api.key = self._baton("keys", "create", "--company", "bench").strip()
            log(
                f"triggers/s: {batches} x {size} triggers of a 1-step run from {a.trigger_threads} "
                "threads (no workers)"
            )
            self.results["triggers"] = self._trigger_batches(workflow_id, batches, size, "")
            if a.batch_triggers:
                self.results["batch_triggers"] = self.batch_trigger_rate(workflow_id)
            self._close_trigger_runs(workflow_id)
            self.api.key = self._baton("keys", "create", "--company", "bench").strip()
            log(f"triggers/s while baton worker runs ({a.processes} processes x {a.threads} threads)")
            self.start_baton_workers()
            try:
                first = self.api.trigger(workflow_id)  # the workers are up once it completed
                self.wait_for(
                    "triggers/s: the workers' first run",
                    1,
                    lambda: self.probe.one(
                        "SELECT count(*) FROM runs WHERE id = %s AND status = 'completed'", (first,)
                    )[0],
                    "baton-worker",
                )
                self.results["triggers_with_workers"] = self._trigger_batches(
                    workflow_id, batches, size, " with workers"
                )
                executed = self.probe.one(
                    "SELECT count(*) FROM runs WHERE workflow_id = %s AND status = 'completed'",
                    (workflow_id,),
                )[0]
                self.results["triggers_with_workers"]["runs_completed_meanwhile"] = executed
            finally:
                self.children.stop("baton-worker")
        finally:
            self.api.key = main_key
        self._close_trigger_runs(workflow_id)

    def _trigger_batches(self, workflow_id: str, batches: int, size: int, label: str) -> dict[str, Any]:
        a = self.args
        trigger_many(self.api, workflow_id, min(50, size), a.trigger_threads)  # warm-up
        rates = []
        for i in range(batches):
            elapsed = trigger_many(self.api, workflow_id, size, a.trigger_threads)
            rates.append(size / elapsed)
            log(f"triggers/s{label} batch {i + 1}/{batches}: {rates[-1]:.0f}/s")
        log(f"triggers/s{label}: median {statistics.median(rates):.0f}/s")
        return {
            "batches": batches,
            "batch_size": size,
            "threads": a.trigger_threads,
            "rates_per_s": rates,
            "median_per_s": statistics.median(rates),
        }

    def _close_trigger_runs(self, workflow_id: str) -> None:
        """Nothing may execute these later: drop Baton's queued messages and close the runs."""
        self.drop_baton_messages()
        assert self.probe is not None
        self.probe.one(
            "WITH r AS (UPDATE runs SET status = 'cancelled', completed_at = now() "
            "WHERE workflow_id = %s AND status = 'pending' RETURNING id) "
            "UPDATE step_runs SET status = 'skipped' WHERE run_id IN (SELECT id FROM r) RETURNING 1",
            (workflow_id,),
        )

    def batch_trigger_rate(self, workflow_id: str) -> dict[str, Any]:
        """Runs/s through POST /workflows/:id/runs/batch: batches of --batch-size from 2 client
        threads (one per API worker by default), no workers running."""
        a = self.args
        count, size = a.batch_triggers, a.batch_size
        log(f"batch triggers: {count} batches of {size} runs from 2 threads (no workers)")
        self.api.trigger_batch(workflow_id, size)  # warm-up
        pending = list(range(count))
        lock = threading.Lock()
        seconds: list[float] = []

        def work() -> None:
            while True:
                with lock:
                    if not pending:
                        return
                    pending.pop()
                started = time.perf_counter()
                self.api.trigger_batch(workflow_id, size)
                with lock:
                    seconds.append(time.perf_counter() - started)

        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            for future in [pool.submit(work) for _ in range(2)]:
                future.result()
            elapsed = time.perf_counter() - started
        rate = count * size / elapsed
        log(f"batch triggers: {rate:.0f} runs/s, median {statistics.median(seconds) * 1000:.0f} ms a batch")
        return {
            "batches": count,
            "batch_size": size,
            "runs_per_s": rate,
            "median_batch_ms": statistics.median(seconds) * 1000,
        }

    # ----------------------------------------------------------------- 1+2. throughput

    def baton_round(self, index: int) -> dict[str, Any]:
        a = self.args
        assert self.probe is not None and self.stats is not None
        workflow_id = self.api.create_workflow(f"bench-throughput-{index}", a.steps)
        log(
            f"baton round {index}: triggering {a.runs} runs x {a.steps} steps through the API "
            "(workers stopped)"
        )
        c0, x0 = self.flushed_commits()
        trigger_s = trigger_many(self.api, workflow_id, a.runs, a.trigger_threads)
        c1, x1 = self.flushed_commits()
        polls_before = self.probe.statements
        log(f"baton round {index}: {a.runs / trigger_s:.0f} triggers/s; starting baton worker")
        spawned = time.monotonic()
        self.start_baton_workers()
        done = self.wait_for(
            f"baton round {index} runs completed",
            a.runs,
            lambda: self.probe.one(
                "SELECT count(*) FROM runs WHERE status = 'completed' AND workflow_id = %s", (workflow_id,)
            )[0],
            "baton-worker",
        )
        self.children.stop("baton-worker")
        polls = self.probe.statements - polls_before
        c2, x2 = self.flushed_commits()
        bad = self.probe.all(
            "SELECT status, count(*) FROM runs WHERE workflow_id = %s AND status <> 'completed' "
            "GROUP BY status",
            (workflow_id,),
        )
        if bad:
            raise BenchError(f"baton round {index}: runs not completed: {bad}")
        first, last = self.probe.one(
            "SELECT (SELECT min(s.started_at) FROM step_runs s JOIN runs r ON r.id = s.run_id "
            "WHERE r.workflow_id = %(w)s), (SELECT max(completed_at) FROM runs WHERE workflow_id = %(w)s)",
            {"w": workflow_id},
        )
        steps = self.probe.one(
            "SELECT count(*) FROM step_attempts a JOIN runs r ON r.id = a.run_id WHERE r.workflow_id = %s",
            (workflow_id,),
        )[0]
        if steps != a.runs * a.steps:
            raise BenchError(f"baton round {index}: {steps} step attempts, expected {a.runs * a.steps}")
        busy_s = (last - first).total_seconds()
        trigger_commits = c1 - c0
        worker_commits = c2 - c1 - polls
        result = {
            "steps": steps,
            "steps_per_s": steps / busy_s,
            "steps_per_s_wall": steps / (done - spawned),
            "busy_s": busy_s,
            "wall_s": done - spawned,
            "triggers_per_s": a.runs / trigger_s,
            "trigger_commits": trigger_commits,
            "worker_commits": worker_commits,
            "probe_statements_subtracted": polls,
            # Transactions that were given an xid (they wrote or locked rows); cluster-wide, so
            # another client of the same server would add to it.
            "trigger_write_xacts": x1 - x0,
            "worker_write_xacts": x2 - x1,
        }
        log(
            f"baton round {index}: {result['steps_per_s']:.0f} steps/s (first step to last; "
            f"{result['steps_per_s_wall']:.0f} from worker spawn), commits: triggers {trigger_commits}, "
            f"workers {worker_commits} for {steps} steps"
        )
        return result

    def bare_round(self, index: int) -> dict[str, Any]:
        a = self.args
        key = f"{BARE_NAMESPACE}:round{index}"
        log(f"bare round {index}: enqueueing {a.runs} chains of {a.steps} messages (workers stopped)")
        self.redis.delete(key + ":first", key + ":done")
        for chain in range(a.runs):
            self.bare_send(chain, a.steps, key)
        spawned = time.monotonic()
        self.start_bare_workers()
        done = self.wait_for(
            f"bare round {index} chains done", a.runs, lambda: self.redis.llen(key + ":done"), "bare-worker"
        )
        self.children.stop("bare-worker")
        first = float(self.redis.get(key + ":first"))
        last = max(float(v) for v in self.redis.lrange(key + ":done", 0, -1))
        steps = a.runs * a.steps
        result = {
            "steps": steps,
            "steps_per_s": steps / (last - first),
            "steps_per_s_wall": steps / (done - spawned),
            "busy_s": last - first,
            "wall_s": done - spawned,
        }
        log(
            f"bare round {index}: {result['steps_per_s']:.0f} steps/s (first hop to last; "
            f"{result['steps_per_s_wall']:.0f} from worker spawn)"
        )
        return result

    def throughput(self) -> None:
        baton, bare = [], []
        for index in range(1, self.args.rounds + 1):
            # Alternate who goes first so a drift in machine load does not favour one side.
            if index % 2:
                baton.append(self.baton_round(index))
                bare.append(self.bare_round(index))
            else:
                bare.append(self.bare_round(index))
                baton.append(self.baton_round(index))
        steps = sum(r["steps"] for r in baton)
        trigger_commits = sum(r["trigger_commits"] for r in baton)
        worker_commits = sum(r["worker_commits"] for r in baton)
        runs = self.args.runs * len(baton)
        self.results["throughput"] = {
            "baton_rounds": baton,
            "bare_rounds": bare,
            "baton_steps_per_s": statistics.median(r["steps_per_s"] for r in baton),
            "bare_steps_per_s": statistics.median(r["steps_per_s"] for r in bare),
            "baton_steps_per_s_wall": statistics.median(r["steps_per_s_wall"] for r in baton),
            "bare_steps_per_s_wall": statistics.median(r["steps_per_s_wall"] for r in bare),
        }
        self.results["commits"] = {
            "runs": runs,
            "executed_steps": steps,
            "trigger_commits": trigger_commits,
            "worker_commits": worker_commits,
            "per_step_with_triggers": (trigger_commits + worker_commits) / steps,
            "per_step_without_triggers": worker_commits / steps,
            "per_trigger": trigger_commits / runs,
            "write_xacts_per_step_without_triggers": sum(r["worker_write_xacts"] for r in baton) / steps,
            "write_xacts_per_trigger": sum(r["trigger_write_xacts"] for r in baton) / runs,
        }

    # ----------------------------------------------------------------- 3+4b. latency

    def run_once(self, workflow_id: str) -> tuple[float, float, float]:
        """Trigger a run, wait; seconds: trigger-to-completed, observed by polling, started-to-completed."""
        assert self.probe is not None
        t0 = time.time()
        run_id = self.api.trigger(workflow_id)
        deadline = time.monotonic() + self.args.timeout
        while True:
            status, started, completed = self.probe.one(
                "SELECT status, started_at, completed_at FROM runs WHERE id = %s", (run_id,)
            )
            if status in ("completed", "failed", "cancelled", "timeout"):
                observed = time.time() - t0
                break
            if time.monotonic() > deadline:
                raise BenchError(f"run {run_id} still {status} after {self.args.timeout:.0f} s")
            self.children.check("baton-worker")
            time.sleep(0.005)  # the figure comes from completed_at; polling only has to notice it
        if status != "completed":
            raise BenchError(f"run {run_id} ended {status}")
        return completed.timestamp() - t0, observed, (completed - started).total_seconds()

    def baton_latency(self) -> None:
        a = self.args
        seq_wf = self.api.create_workflow("bench-sequential", a.seq_steps)
        one_wf = self.api.create_workflow("bench-one-step", 1)
        log("starting baton worker for the latency phases")
        self.start_baton_workers()
        for _ in range(3):  # warm-up: processes, pools, definition caches
            self.run_once(seq_wf)
            self.run_once(one_wf)
        seq = []
        for i in range(a.seq_repeats):
            seq.append(self.run_once(seq_wf))
            log(f"baton {a.seq_steps}-step run {i + 1}/{a.seq_repeats}: {seq[-1][0] * 1000:.1f} ms")
            time.sleep(0.1)
        total = statistics.median(s[0] for s in seq)
        self.results["sequential"] = {
            "steps": a.seq_steps,
            "samples_ms": [s[0] * 1000 for s in seq],
            "observed_ms": [s[1] * 1000 for s in seq],
            "engine_ms": [s[2] * 1000 for s in seq],
            "median_ms": total * 1000,
            "ms_per_step": total * 1000 / a.seq_steps,
        }
        log(f"1-step trigger-to-completed at idle: {a.idle_samples} samples")
        idle = []
        for _ in range(a.idle_samples):
            idle.append(self.run_once(one_wf))
            time.sleep(0.05)
        ms = [s[0] * 1000 for s in idle]
        self.results["one_step"] = {
            "samples_ms": ms,
            "observed_ms": [s[1] * 1000 for s in idle],
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
        }
        log(f"1-step trigger-to-completed: p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms")
        self.children.stop("baton-worker")

    def bare_latency(self) -> None:
        a = self.args
        log("starting bare dramatiq workers for the chain latency")
        self.start_bare_workers()
        samples = []
        for i in range(-3, a.seq_repeats):  # three warm-ups
            key = f"{BARE_NAMESPACE}:seq{i}"
            self.redis.delete(key + ":done", key + ":first")
            t0 = time.time()
            self.bare_send(10_000 + i, a.seq_steps, key)
            popped = self.redis.blpop([key + ":done"], timeout=self.args.timeout)
            if popped is None:
                raise BenchError(
                    f"bare {a.seq_steps}-message chain did not finish\n" + self.children.tail("bare-worker")
                )
            if i >= 0:
                samples.append(float(popped[1]) - t0)
                log(f"bare {a.seq_steps}-message chain {i + 1}/{a.seq_repeats}: {samples[-1] * 1000:.1f} ms")
            time.sleep(0.1)
        self.children.stop("bare-worker")
        total = statistics.median(samples)
        self.results["bare_sequential"] = {
            "hops": a.seq_steps,
            "samples_ms": [s * 1000 for s in samples],
            "median_ms": total * 1000,
            "ms_per_hop": total * 1000 / a.seq_steps,
        }

    # ----------------------------------------------------------------- 5. GET /runs

    def seed(self, count: int) -> dict[str, str]:
        assert self.probe is not None
        workflows = {name: self.api.create_workflow(f"bench-list-{name}", 1) for name in ("a", "b", "c")}
        # Runs belong to a workflow row (its key); the public id may be reused once deleted.
        keys = {
            name: self.probe.one(
                "SELECT key FROM workflows WHERE company_id = %s AND id = %s", (self.company_id, workflow_id)
            )[0]
            for name, workflow_id in workflows.items()
        }
        chunk = 200_000
        log(f"seeding {count:,} runs (60% / 30% / 10% over 3 workflows; 90% completed, 5% failed, ...)")
        for offset in range(0, count, chunk):
            n = min(chunk, count - offset)
            self.probe.one(
                """
                WITH x AS (
                    SELECT random() AS w, random() AS s, g,
                           date_trunc('milliseconds', now() - interval '1 hour'
                                      - make_interval(secs => g + random())) AS ts
                    FROM generate_series(%(start)s::int, %(stop)s::int) AS g
                ), y AS (
                    SELECT *, CASE WHEN s < 0.05 THEN 'failed' WHEN s < 0.09 THEN 'cancelled'
                                   WHEN s < 0.10 THEN 'timeout' ELSE 'completed' END AS status
                    FROM x
                ), ins AS (
                    INSERT INTO runs (id, company_id, workflow_key, workflow_id, workflow_version, status,
                                      trigger_type, input, output, error, created_at, started_at,
                                      completed_at, duration_ms)
                    SELECT 'run_' || gen_random_uuid(), %(company)s,
                           CASE WHEN w < 0.6 THEN %(ka)s WHEN w < 0.9 THEN %(kb)s ELSE %(kc)s END,
                           CASE WHEN w < 0.6 THEN %(a)s WHEN w < 0.9 THEN %(b)s ELSE %(c)s END,
                           1, status, CASE WHEN g %% 10 = 0 THEN 'webhook' ELSE 'api' END,
                           '{}'::jsonb,
                           CASE WHEN status = 'completed' THEN '{"ok": true}'::jsonb END,
                           CASE WHEN status = 'failed'
                                THEN '{"code": "STEP_ERROR", "message": "seeded failure"}'::jsonb END,
                           ts, ts + interval '5 milliseconds', ts + interval '50 milliseconds', 45
                    FROM y
                    RETURNING 1
                )
                SELECT count(*) FROM ins
                """,
                {
                    "start": offset + 1,
                    "stop": offset + n,
                    "company": self.company_id,
                    "a": workflows["a"],
                    "b": workflows["b"],
                    "c": workflows["c"],
                    **{f"k{name}": key for name, key in keys.items()},
                },
            )
            log(f"seeded {offset + n:,}/{count:,}")
        log("VACUUM ANALYZE runs")
        self.probe.conn.execute("VACUUM ANALYZE runs")
        return workflows

    def deep_cursor(self, where: str, params: dict[str, Any], from_end: int = 100) -> str:
        assert self.probe is not None
        total = self.probe.one(f"SELECT count(*) FROM runs WHERE company_id = %(co)s {where}", params)[0]
        row = self.probe.one(
            f"SELECT created_at, id FROM runs WHERE company_id = %(co)s {where} "
            "ORDER BY created_at DESC, id DESC OFFSET %(off)s LIMIT 1",
            dict(params, off=max(0, total - from_end)),
        )
        return cursor_for(row[0], row[1])

    def window_cases(self, co: dict[str, Any], total: int, workflow_id: str) -> dict[str, Any]:
        """createdAfter/createdBefore: an hour in the middle of the table, alone and with every filter."""
        assert self.probe is not None
        middle = self.probe.one(
            "SELECT created_at FROM runs WHERE company_id = %(co)s "
            "ORDER BY created_at DESC OFFSET %(off)s LIMIT 1",
            dict(co, off=total // 2),
        )[0]
        window = {
            "createdAfter": (middle - timedelta(hours=1)).isoformat(),
            "createdBefore": middle.isoformat(),
        }
        return {
            "1-hour window mid-table": window,
            "window+workflowId+status+triggerType": {
                **window,
                "workflowId": workflow_id,
                "status": "completed",
                "triggerType": "api",
            },
        }

    def list_latency(self) -> None:
        a = self.args
        workflows = self.seed(a.list_runs)
        co = {"co": self.company_id}
        total = self.probe.one("SELECT count(*) FROM runs WHERE company_id = %(co)s", co)[0]  # type: ignore[union-attr]
        cases = {
            "first page": {},
            "deep cursor": {"cursor": self.deep_cursor("", co)},
            "status=failed": {"status": "failed"},
            "status=failed, deep cursor": {
                "status": "failed",
                "cursor": self.deep_cursor("AND status = 'failed'", co, 20),
            },
            "workflowId (10% of runs)": {"workflowId": workflows["c"]},
            "workflowId, deep cursor": {
                "workflowId": workflows["c"],
                "cursor": self.deep_cursor("AND workflow_id = %(w)s", dict(co, w=workflows["c"]), 20),
            },
            "workflowId+status=failed": {"workflowId": workflows["c"], "status": "failed"},
            "limit=100": {"limit": 100},
            "triggerType=webhook (10%)": {"triggerType": "webhook"},
            "triggerType=webhook, deep cursor": {
                "triggerType": "webhook",
                "cursor": self.deep_cursor("AND trigger_type = 'webhook'", co, 20),
            },
            **self.window_cases(co, total, workflows["c"]),
        }
        log(f"GET /api/v1/runs on {total:,} runs: {len(cases)} cases x {a.list_requests} requests")
        session = self.api.session
        url = self.api.base_url + "/api/v1/runs"
        out: dict[str, Any] = {"table_runs": total, "requests": a.list_requests, "cases": {}}
        for name, params in cases.items():
            samples = []
            for i in range(20 + a.list_requests):
                started = time.perf_counter()
                response = session.get(url, params=params, timeout=30)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise BenchError(
                        f"GET /api/v1/runs {params}: HTTP {response.status_code}: {response.text[:300]}"
                    )
                if i == 0 and not response.json()["data"]:
                    raise BenchError(f"GET /api/v1/runs {params} returned no runs")
                if i >= 20:  # the first 20 warm caches and connections
                    samples.append(elapsed * 1000)
            case = {
                "p50_ms": percentile(samples, 50),
                "p99_ms": percentile(samples, 99),
                "max_ms": max(samples),
            }
            out["cases"][name] = case
            log(f"GET /runs {name}: p50 {case['p50_ms']:.1f} ms, p99 {case['p99_ms']:.1f} ms")
        self.results["list"] = out

    # ----------------------------------------------------------------- run

    def run(self) -> None:
        phases = self.args.phases
        self.setup()
        if "triggers" in phases:
            self.triggers_per_second()
        if "throughput" in phases:
            self.throughput()
        if "latency" in phases:
            self.baton_latency()
            self.bare_latency()
        if "list" in phases and self.args.list_runs > 0:
            self.list_latency()

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.admin is not None:
            self.admin.close()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


# --------------------------------------------------------------------------- report


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(
        metric: str,
        baton: float | None,
        baseline: float | None,
        target: str,
        ok: bool | None,
        fmt: str = "{:.1f}",
        ratio: float | None = None,
    ) -> None:
        if ratio is None and baton is not None and baseline:
            ratio = baton / baseline
        rows.append(
            {
                "metric": metric,
                "baton": baton,
                "baseline": baseline,
                "ratio": ratio,
                "target": target,
                "pass": ok,
                "fmt": fmt,
            }
        )

    t = results.get("throughput")
    if t:
        ratio = t["baton_steps_per_s"] / t["bare_steps_per_s"]
        row(
            "throughput, steps/s",
            t["baton_steps_per_s"],
            t["bare_steps_per_s"],
            "ratio >= 0.5",
            ratio >= 0.5,
            "{:.0f}",
        )
        row(
            "  same, timed from worker spawn",
            t["baton_steps_per_s_wall"],
            t["bare_steps_per_s_wall"],
            "(info)",
            None,
            "{:.0f}",
        )
    c = results.get("commits")
    if c:
        w, wo = c["per_step_with_triggers"], c["per_step_without_triggers"]
        row("PG commits / step, incl. triggers", w, None, "<= 1.5", w <= 1.5, "{:.3f}")
        row("PG commits / step, workers only", wo, None, "<= 1.5", wo <= 1.5, "{:.3f}")
        row("PG commits / trigger", c["per_trigger"], None, "(info)", None, "{:.3f}")
        row(
            "  writing xacts / step, workers (xids)",
            c["write_xacts_per_step_without_triggers"],
            None,
            "(info)",
            None,
            "{:.3f}",
        )
        row("  writing xacts / trigger (xids)", c["write_xacts_per_trigger"], None, "(info)", None, "{:.3f}")
    s, b = results.get("sequential"), results.get("bare_sequential")
    if s:
        base = b["ms_per_hop"] if b else None
        row(
            f"sequential ms/step ({s['steps']} steps)",
            s["ms_per_step"],
            base,
            "<= 3 ms",
            s["ms_per_step"] <= 3,
            "{:.2f}",
        )
        budget = 3 * s["steps"]
        row(
            f"{s['steps']}-step run, trigger->completed ms",
            s["median_ms"],
            b["median_ms"] if b else None,
            f"<= {budget} ms",
            s["median_ms"] <= budget,
        )
    tr = results.get("triggers")
    if tr:
        row("API triggers/s", tr["median_per_s"], None, ">= 500", tr["median_per_s"] >= 500, "{:.0f}")
    bt = results.get("batch_triggers")
    if bt:
        rate = bt["runs_per_s"]
        row(
            f"API batch trigger runs/s ({bt['batch_size']} a batch)",
            rate,
            None,
            ">= 5000",
            rate >= 5000,
            "{:.0f}",
        )
    o = results.get("one_step")
    if o:
        row("1-step trigger->completed p50 ms", o["p50_ms"], None, "(info)", None)
        row("1-step trigger->completed p99 ms", o["p99_ms"], None, "<= 30 ms", o["p99_ms"] <= 30)
    lst = results.get("list")
    if lst:
        for name, case in lst["cases"].items():
            row(f"GET /runs p99 ms: {name}", case["p99_ms"], None, "<= 20 ms", case["p99_ms"] <= 20)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    table = [("metric", "Baton", "baseline", "ratio", "target", "result")]
    for r in rows:
        verdict = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        table.append(
            (
                r["metric"],
                cell(r["baton"], r["fmt"]),
                cell(r["baseline"], r["fmt"]),
                cell(r["ratio"], "{:.2f}"),
                r["target"],
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(6)]
    lines = []
    for n, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, 4)]
        cells += [line[4].ljust(widths[4]), line[5]]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

PHASES = ("triggers", "throughput", "latency", "list")
QUICK = {
    "runs": 200,
    "rounds": 1,
    "seq_repeats": 3,
    "triggers": 400,
    "batch_triggers": 4,
    "idle_samples": 20,
    "list_runs": 10_000,
    "list_requests": 50,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark Baton against bare Dramatiq on the same Redis (DESIGN section 11).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small workloads (about 1 minute)")
    parser.add_argument("--runs", type=int, default=1000, help="runs (and bare chains) per throughput round")
    parser.add_argument("--steps", type=int, default=5, help="no-op steps per run in the throughput rounds")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median reported)")
    parser.add_argument("--seq-steps", type=int, default=40, help="steps of the sequential-latency run")
    parser.add_argument("--seq-repeats", type=int, default=5, help="sequential runs measured (median)")
    parser.add_argument("--triggers", type=int, default=2000, help="triggers for the triggers/s figure")
    parser.add_argument(
        "--trigger-batches", type=int, default=4, help="triggers/s is the median over batches"
    )
    parser.add_argument("--trigger-threads", type=int, default=8, help="client threads that trigger runs")
    parser.add_argument(
        "--batch-triggers", type=int, default=10, help="batch-trigger requests timed (0 skips them)"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="runs per batch-trigger request")
    parser.add_argument("--idle-samples", type=int, default=50, help="1-step runs timed one at a time")
    parser.add_argument(
        "--list-runs",
        type=int,
        default=100_000,
        help="runs seeded for GET /runs (DESIGN's budget is for 1000000; 0 skips the phase)",
    )
    parser.add_argument("--list-requests", type=int, default=200, help="timed GET /runs requests per case")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (Baton and bare)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn workers of baton api")
    parser.add_argument("--timeout", type=float, default=60, help="seconds without progress before failing")
    parser.add_argument("--pg", default="postgresql://root@127.0.0.1:5432", help="PostgreSQL server URL")
    parser.add_argument("--db-name", default="baton_bench", help="dedicated database (emptied at the start)")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/2", help="dedicated Redis db (flushed)"
    )
    parser.add_argument(
        "--broker-url",
        default=None,
        help="Baton's broker, e.g. amqp://guest:guest@127.0.0.1:5672/%%2F for RabbitMQ (default: "
        "--redis-url); the bare-Dramatiq baseline stays on Redis",
    )
    parser.add_argument("--output", type=Path, default=VAR / "bench-results.json", help="JSON results file")
    parser.add_argument(
        "--phases",
        type=lambda v: {p.strip() for p in v.split(",") if p.strip()},
        default=set(PHASES),
        help=f"comma-separated subset of: {','.join(PHASES)}",
    )
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    unknown = args.phases - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; use {','.join(PHASES)}")
    return args


@contextmanager
def signals_raise() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    children = Children()
    bench = Bench(args, children)
    started = time.time()
    exit_code = 0
    error = None
    try:
        with signals_raise():
            try:
                bench.run()
            finally:
                # A second Ctrl-C must not cut the clean-up short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if children.procs:
                    log(f"stopping {', '.join(children.procs)}")
                children.stop_all()
                bench.close()
    except Interrupted as exc:
        log(f"interrupted ({exc}); child processes stopped")
        return 130
    except BenchError as exc:
        error = str(exc)
        log(f"FAILED: {error}")
        exit_code = 1
    except (psycopg.Error, redis.RedisError, requests.RequestException) as exc:
        error = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {error}")
        exit_code = 1

    rows = summary_rows(bench.results)
    report = {
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "duration_s": time.time() - started,
        "ok": error is None,
        "error": error,
        "settings": {
            k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
            for k, v in vars(args).items()
            if k != "pg"
        },
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "postgres": bench.results.pop("postgres", None),
            "dramatiq": _version("dramatiq"),
        },
        "results": bench.results,
        "summary": [{k: v for k, v in r.items() if k != "fmt"} for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if rows:
        print(render(rows))
    shown = args.output.relative_to(REPO) if args.output.is_relative_to(REPO) else args.output
    log(f"results written to {shown} ({time.time() - started:.0f} s)")
    if exit_code == 0 and args.strict and any(r["pass"] is False for r in rows):
        exit_code = 2
    return exit_code


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
