#!/usr/bin/env python3
"""Benchmark Baton side by side with bare Dramatiq on the same Redis (DESIGN §11 budgets).

Run from the repository root with the project's virtualenv:

    .venv/bin/python scripts/bench.py            # defaults: about 6 minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick    # about 2 minutes, smaller workloads
    .venv/bin/python scripts/bench.py --phases list --list-runs 1000000   # DESIGN's table size
    .venv/bin/python scripts/bench.py --report var/bench-results.json --markdown   # README table

It uses a dedicated PostgreSQL database (``baton_bench``, created when missing, emptied at the
start) and a dedicated Redis database (db 2, flushed at the start), starts ``baton api`` and
``baton worker`` as child processes, and measures:

1. throughput, workload A: N runs x 5 no-op ``transform`` steps executed by ``baton worker -p 2
   -t 8``, in two variants. Over HTTP: triggered through the API with the workers stopped, then
   executed. In-process: the workers start and register first (each worker process has published
   its metrics), then this process triggers the runs through the engine's batch trigger (1,000 a
   transaction) while the workers run. steps/s counts from the first step's start to the last
   run's completion. Baseline: bare Dramatiq chains of 5 messages (each hop only enqueues the
   next), same processes and threads, timed the same way. Each round runs both Baton variants and
   the baseline, the baseline always between them and the Baton variant going first alternating;
   medians over the rounds are reported, each variant against the baseline.
2. per executed step, on the worker connections only (triggers counted apart):
   - PostgreSQL commits and rows written: ``pg_stat_database`` (``xact_commit``, and
     ``tup_inserted + tup_updated + tup_deleted``) of the bench database around the worker window,
     read after every process that worked has closed its connections (a backend publishes its
     counters when it exits; an idle one may wait 10 s). Subtracted: the bench's own probe
     (its statements and its connection's start, each a transaction) and, in the in-process
     variant, what its triggers did (their commits and connection starts, and their rows read
     from PostgreSQL's per-transaction counters on their own connections). Also shown:
     transactions given an xid (those that wrote or locked rows), counted on the whole cluster,
     so only meaningful on an otherwise quiet server.
   - SQL statements: the workers' ``baton_db_statements_total`` (every process counts its own;
     a worker process folds its total into the metrics snapshots in Redis when it stops), read
     before the workers start and after they stopped; the in-process variant subtracts what the
     workers had sent when they registered (start-up).
   - worker CPU: user + system time of the worker pool's process tree, sampled once the workers
     registered and again when the last run completed (in-process variant: start-up excluded;
     the HTTP variant's figure includes it and is shown for information).
3. sequential latency, workload B: a run of 40 steps, trigger to ``completed_at``; baseline: a
   40-message chain, enqueue to last hop.
4. API: single triggers/s from 8 client threads (median of batches), with the workers stopped and
   again with them running and executing what is triggered; runs/s through the batch trigger
   (batches of 1,000 from 2 threads); trigger-to-completed of a 1-step run at idle (p50, p99).
   Each trigger client thread keeps one keep-alive connection and sends real, separate
   ``POST /workflows/:id/runs`` requests, reading and checking each response (202 and a run id)
   before the next; a lean client, since ``requests`` costs the client as much CPU per call as
   the trigger costs the server, and both share the machine's cores.
5. ``GET /api/v1/runs`` p50/p99 on ``--list-runs`` seeded runs for several filters and cursor
   depths while workload A runs at about half its top rate (``--list-load``; by default half the
   in-process rate of phase 1): the workers execute runs that a feeder process triggers
   in-process at a steady rate. DESIGN's budget is for 1,000,000 runs; the default seeds 100,000
   to stay short (seeding 1,000,000 takes about a minute more).

Progress goes to stderr; the summary (a header with the date in UTC, the machine and its load
average at the start and the end, then the table, or a Markdown table with ``--markdown``) to
stdout; every figure to ``var/bench-results.json``, from which ``--report`` prints the summary
again. Exits 1 when a phase fails (runs not completing, HTTP errors), 130 on Ctrl-C or SIGTERM
(every child process is stopped first), and, with ``--strict``, 2 when a target is missed. Child
process output is kept in ``var/bench-*.log``. The machine is shared: run it when nothing else is
busy, and compare ratios rather than absolute figures.
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
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil
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


class Ready(dramatiq.Middleware):
    """Each worker process says when it consumes (the bench releases the held messages then)."""

    def after_worker_boot(self, broker, worker):
        marks.sadd("{BARE_NAMESPACE}:ready", os.getpid())


broker.add_middleware(Ready())


@dramatiq.actor(queue_name="{BARE_QUEUE}", max_retries=0)
def hop(chain, index, length, key):
    if index == 0 and chain < 16:  # the first chains mark when work began
        marks.set(key + ":first", repr(time.time()), nx=True)
    if index + 1 < length:
        hop.send(chain, index + 1, length, key)
    else:
        marks.rpush(key + ":done", repr(time.time()))
'''

# A no-op action registered as having effects (not ``pure``): each of its steps is claimed in a
# committed transaction before it runs, and its result is committed on its own, as an
# ``http.request`` step's would be. Workload A's ``transform`` steps are pure (a chain of them
# commits once); this variant shows what a step with effects costs.
EFFECT_MODULE = "bench_effect_actions"
EFFECT_ACTION = "bench.effect"
EFFECT_ACTIONS = f'''"""A no-op action with (declared) effects, for Baton's bench."""

from app.actions import action


@action("{EFFECT_ACTION}")
def effect(ctx, params):
    return params
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

    Each statement is one transaction, and so is each connection's start (a backend reads the
    catalogs in a transaction of its own as it starts), so the commit figures subtract
    ``statements``. Server-side prepared statements are off: their Parse/Sync would be
    transactions of their own.
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
        self.statements += 1

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class Counts:
    """The bench database's counters at one moment, every backend's share published."""

    commits: int  # pg_stat_database.xact_commit
    rows: int  # tup_inserted + tup_updated + tup_deleted
    xid: int  # the cluster's next transaction id


class Stats:
    """``xact_commit`` and rows written of the bench database, read from the ``postgres`` database
    (no commit of its own).

    PostgreSQL 15 publishes a backend's counters at most once a second and, when it goes idle
    right after a flush, only 10 s later; pg_stat_force_next_flush() acts on the calling session
    only. A backend that exits publishes at once, so the bench reads the counters after the
    processes that did the work (API, workers, its own connections) have closed their
    connections, and waits until the figures stop moving.
    """

    def __init__(self, conn: psycopg.Connection[Any], dbname: str) -> None:
        self.conn = conn
        self.dbname = dbname

    def counters(self) -> tuple[int, int]:
        """(xact_commit, rows written) of the bench database as published now."""
        row = self.conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
            "WHERE datname = %s",
            (self.dbname,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def commits(self) -> int:
        return self.counters()[0]

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

    def settled(self) -> Counts:
        previous, steady = self.counters(), 0
        for _ in range(60):
            time.sleep(0.25)
            current = self.counters()
            steady = steady + 1 if current == previous else 0
            if steady == 2:
                break
            previous = current
        else:
            log("warning: pg_stat_database kept moving (autovacuum or another client?)")
        return Counts(previous[0], previous[1], self.next_xid())


class TriggerTap:
    """What the bench's own in-process triggers did on the database: commits, and rows written.

    The workers' share of a window is the database's total less this. Commits: each transaction
    the engine commits, and each connection it opens (a backend's start-up is a transaction of
    its own in ``xact_commit``). Rows: PostgreSQL's
    per-transaction table counters (``pg_stat_get_xact_tuples_*``, summed over every relation as
    ``pg_stat_database`` sums them) read on the transaction's own connection when it begins and
    again just before it ends; nothing is flushed in between. The reads go through the driver's
    cursor, so they are neither counted as statements nor seen by the engine's events.
    """

    ROWS = (
        "SELECT coalesce(sum(pg_stat_get_xact_tuples_inserted(oid) + pg_stat_get_xact_tuples_updated(oid)"
        " + pg_stat_get_xact_tuples_deleted(oid)), 0) FROM pg_class"
    )

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.commits = 0
        self.rows = 0
        self._begun: dict[int, int] = {}
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._connect)
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "rollback", self._rollback)

    def _connect(self, _dbapi_connection: Any, _record: Any) -> None:
        with self._lock:
            self.commits += 1

    def _xact_rows(self, conn: Any) -> int:
        with conn.connection.dbapi_connection.cursor() as cursor:
            cursor.execute(self.ROWS)
            return int(cursor.fetchone()[0])

    def _begin(self, conn: Any) -> None:
        self._begun[id(conn)] = self._xact_rows(conn)

    def _end(self, conn: Any, committed: bool) -> None:
        begun = self._begun.pop(id(conn), None)
        written = self._xact_rows(conn) - begun if begun is not None else 0
        with self._lock:
            self.rows += written  # rows of a rolled-back transaction are counted by PostgreSQL too
            self.commits += committed

    def _commit(self, conn: Any) -> None:
        self._end(conn, True)

    def _rollback(self, conn: Any) -> None:
        self._end(conn, False)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.commits, self.rows


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of every descendant alive now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


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
            # The limiter still runs on every request; its default would refuse the bench's volume.
            BATON_RATE_LIMIT="100000000/minute",
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
        self.services: Any = None  # the bench's own Baton services, for in-process triggers
        self.tap: TriggerTap | None = None
        self.reused: dict[str, str] | None = None  # --list-reuse: the earlier seed's workflows

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
        self.reused = self.reused_seed()
        if self.reused is None:
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
        Path(self.tmpdir.name, f"{EFFECT_MODULE}.py").write_text(EFFECT_ACTIONS)
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

    def ensure_api(self) -> None:
        """Start the API unless it runs (the accounting windows stop it)."""
        if "api" not in self.children.procs:
            self.start_api()

    def flushed(self) -> Counts:
        """The bench database's counters once every backend that worked has exited and so published
        its statistics. The API is stopped for that (``ensure_api`` starts it again when a phase
        needs it), and the bench's own connections are closed; the caller stops the workers first."""
        assert self.probe is not None and self.stats is not None
        self.children.stop("api")
        self.probe.close()
        if self.services is not None:
            self.services.db.engine.dispose()
        deadline = time.monotonic() + 15
        while self.stats.client_backends() and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = self.stats.settled()
        if self.stats.client_backends():
            log("warning: other clients are connected to the bench database; commit counts may be off")
        self.probe.reconnect()
        return counts

    def inproc_services(self) -> Any:
        """Baton's services in this process (as the API builds them), for in-process triggers."""
        if self.services is None:
            from sqlalchemy import text

            import workers.actions  # noqa: F401  (the built-in actions, which definitions name)
            from app.config import Config
            from app.services import build_services

            self.services = build_services(Config.from_env(self.env), pool_size=2)
            with self.services.db.session() as session:  # the dialect's first-connect queries, now
                session.execute(text("SELECT 1"))
            self.tap = TriggerTap(self.services.db.engine)
        return self.services

    def create_workflow_inproc(self, name: str, steps: int, action: str = "transform") -> str:
        """A workflow of ``steps`` no-op steps, made in this process (the accounting windows stop
        the API: this spares a restart)."""
        from app import workflows

        if action == EFFECT_ACTION:
            self.load_effect_action()
        definition = {
            "name": name,
            "steps": [{"id": f"s{i + 1}", "action": action, "input": {}} for i in range(steps)],
        }
        with self.inproc_services().db.session() as session:
            workflow, _ = workflows.create(session, self.company_id, definition)
            session.commit()
            return workflow.id

    def trigger_inproc(self, workflow_id: str, count: int) -> tuple[float, int]:
        """Trigger ``count`` runs through the engine's batch trigger in this process, 1,000 a
        transaction: (seconds, SQL statements this process sent for them)."""
        from app import db, engine

        services = self.inproc_services()
        statements = db.statements_executed()
        started = time.perf_counter()
        done = 0
        while done < count:
            size = min(1000, count - done)
            items = [{"input": {"i": done + i}} for i in range(size)]
            results = engine.trigger_batch(services, self.company_id, workflow_id, items)
            created = sum(1 for r in results if r.status == "created")
            if created != size:
                raise BenchError(f"in-process batch trigger: {created} of {size} runs created")
            done += size
        return time.perf_counter() - started, db.statements_executed() - statements

    @property
    def namespace(self) -> str:
        """Baton's Redis namespace (queues, metrics snapshots) in the bench's environment."""
        from app.config import Config

        return Config.from_env(self.env).queue_namespace

    def retired_statements(self) -> float:
        """SQL statements counted by Baton processes that have stopped (their final snapshots)."""
        from app import metrics

        series = metrics.series_key(metrics.DB_STATEMENTS_SERIES, {})
        return metrics.retired_samples(self.redis, self.namespace).get(series, 0.0)

    def hold(self, list_key: str) -> str | None:
        """Hide a Redis broker queue's messages (its list of ids) while the worker processes start,
        so the round starts when all of them consume: otherwise the first process to boot works
        alone for a while, and the start-up skew of each side (Baton's processes import more) would
        be counted as its throughput. Returns the held key (None: nothing to hold, or RabbitMQ)."""
        if self.args.broker_url and list_key != f"{BARE_NAMESPACE}:{BARE_QUEUE}":
            return None
        held = list_key + ".held"
        try:
            self.redis.rename(list_key, held)
        except redis.ResponseError:  # no such key: nothing queued
            return None
        return held

    def release(self, held: str | None) -> None:
        if held is not None:
            self.redis.rename(held, held.removesuffix(".held"))

    def baton_queue_key(self) -> str:
        """The Redis list of Baton's step messages (``<namespace>:steps``)."""
        from app.queue import STEPS_QUEUE

        return f"{self.namespace}:{STEPS_QUEUE}"

    def wait_workers_ready(self) -> float:
        """Wait until every worker process of ``baton worker`` has published its metrics: a process
        writes its first snapshot 2 s after it loaded the worker module and started its consumers,
        so it is then idle and waiting for messages. Returns the SQL statements they sent so far
        (start-up)."""
        from app import metrics

        proc = self.children.procs["baton-worker"]
        series = metrics.series_key(metrics.DB_STATEMENTS_SERIES, {})
        wait_s = max(60.0, self.args.timeout)
        deadline = time.monotonic() + wait_s
        while True:
            self.children.check("baton-worker")
            try:
                pids = {str(child.pid) for child in psutil.Process(proc.pid).children()}
            except psutil.NoSuchProcess:
                pids = set()
            live = {
                member.rsplit(":", 2)[1]: values
                for member, values in metrics.live_samples(self.redis, self.namespace).items()
            }
            if len(pids) == self.args.processes and pids <= live.keys():
                return sum(live[pid].get(series, 0.0) for pid in pids)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"worker processes did not publish their metrics within {wait_s:.0f} s\n"
                    + self.children.tail("baton-worker")
                )
            time.sleep(0.1)

    def load_effect_action(self) -> None:
        assert self.tmpdir is not None
        if self.tmpdir.name not in sys.path:
            sys.path.insert(0, self.tmpdir.name)
        __import__(EFFECT_MODULE)

    def start_baton_workers(self, effects: bool = False) -> None:
        env = self.env
        if effects:
            assert self.tmpdir is not None
            env = dict(env, PYTHONPATH=self.tmpdir.name, BATON_ACTION_MODULES=EFFECT_MODULE)
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
            env,
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
        a = self.args
        workflow_id = self.api.create_workflow("bench-triggers", 1)
        batches = max(1, a.trigger_batches)
        size = max(1, a.triggers // batches)
        log(
            f"triggers/s: {batches} x {size} triggers of a 1-step run from {a.trigger_threads} threads "
            "(no workers)"
        )
        trigger_many(self.api, workflow_id, min(50, size), a.trigger_threads)  # warm-up
        rates = []
        for i in range(batches):
            elapsed = trigger_many(self.api, workflow_id, size, a.trigger_threads)
            rates.append(size / elapsed)
            log(f"triggers/s batch {i + 1}/{batches}: {rates[-1]:.0f}/s")
        self.results["triggers"] = {
            "batches": batches,
            "batch_size": size,
            "threads": a.trigger_threads,
            "rates_per_s": rates,
            "median_per_s": statistics.median(rates),
        }
        if a.batch_triggers:
            self.results["batch_triggers"] = self.batch_trigger_rate(workflow_id)
        # Nothing may execute these later: drop Baton's queued messages and close the runs.
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

    def triggers_with_workers(self) -> None:
        """Single API triggers/s again, with the workers running and executing the runs triggered."""
        a = self.args
        self.ensure_api()
        workflow_id = self.api.create_workflow("bench-triggers-busy", 1)
        batches = max(1, a.trigger_batches)
        size = max(1, a.triggers // batches)
        log(f"triggers/s with workers running: {batches} x {size} triggers of a 1-step run")
        self.start_baton_workers()
        self.wait_workers_ready()
        warm = min(50, size)
        trigger_many(self.api, workflow_id, warm, a.trigger_threads)
        rates = []
        for i in range(batches):
            elapsed = trigger_many(self.api, workflow_id, size, a.trigger_threads)
            rates.append(size / elapsed)
            log(f"triggers/s with workers running, batch {i + 1}/{batches}: {rates[-1]:.0f}/s")
        total = warm + batches * size
        self.wait_for(
            "runs triggered with workers running, completed",
            total,
            lambda: self.completed_runs(workflow_id),
            "baton-worker",
        )
        self.children.stop("baton-worker")
        self.results["triggers_busy"] = {
            "batches": batches,
            "batch_size": size,
            "threads": a.trigger_threads,
            "rates_per_s": rates,
            "median_per_s": statistics.median(rates),
        }

    # ----------------------------------------------------------------- 1+2. throughput

    def check_round(self, label: str, workflow_id: str) -> tuple[int, float]:
        """Every run of the round completed, every step executed once: (steps, busy seconds from
        the first step's start to the last run's completion)."""
        assert self.probe is not None
        a = self.args
        bad = self.probe.all(
            "SELECT status, count(*) FROM runs WHERE workflow_id = %s AND status <> 'completed' "
            "GROUP BY status",
            (workflow_id,),
        )
        if bad:
            raise BenchError(f"{label}: runs not completed: {bad}")
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
            raise BenchError(f"{label}: {steps} step attempts, expected {a.runs * a.steps}")
        return steps, (last - first).total_seconds()

    def completed_runs(self, workflow_id: str) -> int:
        assert self.probe is not None
        return self.probe.one(
            "SELECT count(*) FROM runs WHERE status = 'completed' AND workflow_id = %s", (workflow_id,)
        )[0]

    def baton_round(self, index: int) -> dict[str, Any]:
        """Workload A over HTTP: runs triggered through the API with the workers stopped, then
        executed. Its worker window holds the workers' start-up (info only for CPU)."""
        a = self.args
        assert self.probe is not None
        workflow_id = self.create_workflow_inproc(f"bench-throughput-{index}", a.steps)
        log(
            f"baton round {index} (HTTP): triggering {a.runs} runs x {a.steps} steps through the API "
            "(workers stopped)"
        )
        polls0 = self.probe.statements
        c0 = self.flushed()
        self.ensure_api()
        trigger_s = trigger_many(self.api, workflow_id, a.runs, a.trigger_threads)
        polls1 = self.probe.statements
        c1 = self.flushed()
        statements_before = self.retired_statements()
        log(f"baton round {index} (HTTP): {a.runs / trigger_s:.0f} triggers/s; starting baton worker")
        held = self.hold(self.baton_queue_key())
        spawned = time.monotonic()
        self.start_baton_workers()
        if held is not None:
            self.wait_workers_ready()
            self.release(held)
        done = self.wait_for(
            f"baton round {index} (HTTP) runs completed",
            a.runs,
            lambda: self.completed_runs(workflow_id),
            "baton-worker",
        )
        cpu_s = tree_cpu_seconds(self.children.procs["baton-worker"].pid)
        self.children.stop("baton-worker")
        statements = self.retired_statements() - statements_before
        polls = self.probe.statements - polls1  # its reconnect at c1 included
        c2 = self.flushed()
        steps, busy_s = self.check_round(f"baton round {index} (HTTP)", workflow_id)
        trigger_commits = c1.commits - c0.commits - (polls1 - polls0)
        worker_commits = c2.commits - c1.commits - polls
        result = {
            "steps": steps,
            "steps_per_s": steps / busy_s,
            "steps_per_s_wall": steps / (done - spawned),
            "busy_s": busy_s,
            "wall_s": done - spawned,
            "triggers_per_s": a.runs / trigger_s,
            "trigger_commits": trigger_commits,
            "trigger_rows": c1.rows - c0.rows,
            "worker_commits": worker_commits,
            "worker_rows": c2.rows - c1.rows,
            "worker_statements": statements,
            "worker_cpu_s_with_startup": cpu_s,
            "probe_statements_subtracted": polls,
            # Transactions that were given an xid (they wrote or locked rows); cluster-wide, so
            # another client of the same server would add to it.
            "trigger_write_xacts": c1.xid - c0.xid,
            "worker_write_xacts": c2.xid - c1.xid,
        }
        log(
            f"baton round {index} (HTTP): {result['steps_per_s']:.0f} steps/s (first step to last; "
            f"{result['steps_per_s_wall']:.0f} from worker spawn); per step: "
            f"{worker_commits / steps:.2f} commits, {statements / steps:.2f} statements, "
            f"{result['worker_rows'] / steps:.2f} rows, {cpu_s * 1000 / steps:.2f} ms CPU with start-up"
        )
        return result

    def inproc_round(self, index: int, action: str = "transform") -> dict[str, Any]:
        """Workload A triggered in-process: the workers start and register, their CPU and counters
        are sampled, then this process triggers the runs through the engine's batch trigger while
        the workers run. Start-up is outside the window; the triggers' own commits, rows and
        statements are counted apart (``TriggerTap``, this process's statement counter)."""
        a = self.args
        assert self.probe is not None
        effects = action == EFFECT_ACTION
        label = "in-process, steps with effects" if effects else "in-process"
        workflow_id = self.create_workflow_inproc(f"bench-inproc-{index}-{action}", a.steps, action)
        assert self.tap is not None
        log(f"baton round {index} ({label}): starting baton worker, waiting until it registers")
        polls_before = self.probe.statements
        c0 = self.flushed()
        statements_before = self.retired_statements()
        self.start_baton_workers(effects=effects)
        startup_statements = self.wait_workers_ready()
        pid = self.children.procs["baton-worker"].pid
        cpu0 = tree_cpu_seconds(pid)
        tap0 = self.tap.snapshot()
        log(f"baton round {index} ({label}): triggering {a.runs} runs x {a.steps} steps in-process")
        started = time.monotonic()
        trigger_s, trigger_statements = self.trigger_inproc(workflow_id, a.runs)
        tap1 = self.tap.snapshot()
        done = self.wait_for(
            f"baton round {index} ({label}) runs completed",
            a.runs,
            lambda: self.completed_runs(workflow_id),
            "baton-worker",
        )
        cpu_s = tree_cpu_seconds(pid) - cpu0
        self.children.stop("baton-worker")
        statements = self.retired_statements() - statements_before - startup_statements
        polls = self.probe.statements - polls_before
        c1 = self.flushed()
        steps, busy_s = self.check_round(f"baton round {index} ({label})", workflow_id)
        trigger_commits, trigger_rows = tap1[0] - tap0[0], tap1[1] - tap0[1]
        worker_commits = c1.commits - c0.commits - polls - trigger_commits
        worker_rows = c1.rows - c0.rows - trigger_rows
        result = {
            "steps": steps,
            "steps_per_s": steps / busy_s,
            "steps_per_s_wall": steps / (done - started),
            "busy_s": busy_s,
            "wall_s": done - started,
            "triggers_per_s": a.runs / trigger_s,
            "trigger_commits": trigger_commits,
            "trigger_rows": trigger_rows,
            "trigger_statements": trigger_statements,
            "worker_commits": worker_commits,
            "worker_rows": worker_rows,
            "worker_statements": statements,
            "worker_startup_statements": startup_statements,
            "worker_cpu_s": cpu_s,
            "probe_statements_subtracted": polls,
        }
        log(
            f"baton round {index} ({label}): {result['steps_per_s']:.0f} steps/s (first step to "
            f"last); per step: {worker_commits / steps:.2f} commits, {statements / steps:.2f} statements, "
            f"{worker_rows / steps:.2f} rows, {cpu_s * 1000 / steps:.2f} ms worker CPU"
        )
        return result

    def bare_round(self, index: int) -> dict[str, Any]:
        a = self.args
        key = f"{BARE_NAMESPACE}:round{index}"
        log(f"bare round {index}: enqueueing {a.runs} chains of {a.steps} messages (workers stopped)")
        self.redis.delete(key + ":first", key + ":done", f"{BARE_NAMESPACE}:ready")
        for chain in range(a.runs):
            self.bare_send(chain, a.steps, key)
        held = self.hold(f"{BARE_NAMESPACE}:{BARE_QUEUE}")
        spawned = time.monotonic()
        self.start_bare_workers()
        self.wait_for(
            f"bare round {index} worker processes ready",
            a.processes,
            lambda: self.redis.scard(f"{BARE_NAMESPACE}:ready"),
            "bare-worker",
        )
        self.release(held)
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
        http: list[dict[str, Any]] = []
        inproc: list[dict[str, Any]] = []
        bare: list[dict[str, Any]] = []
        for index in range(1, self.args.rounds + 1):
            # Baton and the baseline alternate, and which Baton variant goes first alternates, so a
            # drift in machine load favours no one.
            if index % 2:
                http.append(self.baton_round(index))
                bare.append(self.bare_round(index))
                inproc.append(self.inproc_round(index))
            else:
                inproc.append(self.inproc_round(index))
                bare.append(self.bare_round(index))
                http.append(self.baton_round(index))

        # Steps with effects: claimed and recorded in a commit each (info; one round, with the
        # same rounds' baseline).
        effects = self.inproc_round(self.args.rounds + 1, action=EFFECT_ACTION)

        def median(rounds: list[dict[str, Any]], key: str) -> float:
            return statistics.median(r[key] for r in rounds)

        def total(rounds: list[dict[str, Any]], key: str) -> float:
            return sum(r[key] for r in rounds)

        bare_rate = median(bare, "steps_per_s")
        self.results["throughput"] = {
            "baton_rounds": http,
            "inproc_rounds": inproc,
            "bare_rounds": bare,
            "baton_steps_per_s": median(http, "steps_per_s"),
            "inproc_steps_per_s": median(inproc, "steps_per_s"),
            "bare_steps_per_s": bare_rate,
            "ratio_http": median(http, "steps_per_s") / bare_rate,
            "ratio_inproc": median(inproc, "steps_per_s") / bare_rate,
            "effects_round": effects,
            "effects_steps_per_s": effects["steps_per_s"],
            "ratio_effects": effects["steps_per_s"] / bare_rate,
            "baton_steps_per_s_wall": median(http, "steps_per_s_wall"),
            "bare_steps_per_s_wall": median(bare, "steps_per_s_wall"),
        }
        steps, runs = total(http, "steps"), self.args.runs * len(http)
        trigger_commits, worker_commits = total(http, "trigger_commits"), total(http, "worker_commits")
        self.results["commits"] = {
            "runs": runs,
            "executed_steps": steps,
            "trigger_commits": trigger_commits,
            "worker_commits": worker_commits,
            "per_step_with_triggers": (trigger_commits + worker_commits) / steps,
            "per_step_without_triggers": worker_commits / steps,
            "per_trigger": trigger_commits / runs,
            "write_xacts_per_step_without_triggers": total(http, "worker_write_xacts") / steps,
            "write_xacts_per_trigger": total(http, "trigger_write_xacts") / runs,
        }
        in_steps, in_runs = total(inproc, "steps"), self.args.runs * len(inproc)
        # Per executed step on the worker connections (sums over the rounds); triggers apart.
        self.results["per_step"] = {
            "http": {
                "note": "worker window includes the workers' start-up",
                "commits": worker_commits / steps,
                "statements": total(http, "worker_statements") / steps,
                "rows": total(http, "worker_rows") / steps,
                "cpu_ms_with_startup": total(http, "worker_cpu_s_with_startup") * 1000 / steps,
            },
            "inproc": {
                "note": "sampled once the workers registered, before the runs were triggered",
                "commits": total(inproc, "worker_commits") / in_steps,
                "statements": total(inproc, "worker_statements") / in_steps,
                "rows": total(inproc, "worker_rows") / in_steps,
                "cpu_ms": total(inproc, "worker_cpu_s") * 1000 / in_steps,
                "startup_statements_per_round": median(inproc, "worker_startup_statements"),
            },
            "effects": {
                "note": "in-process, steps of an action with effects (one round)",
                "commits": effects["worker_commits"] / effects["steps"],
                "statements": effects["worker_statements"] / effects["steps"],
                "rows": effects["worker_rows"] / effects["steps"],
                "cpu_ms": effects["worker_cpu_s"] * 1000 / effects["steps"],
            },
            "triggers": {
                "http_commits_per_run": trigger_commits / runs,
                "http_rows_per_run": total(http, "trigger_rows") / runs,
                "inproc_commits_per_run": total(inproc, "trigger_commits") / in_runs,
                "inproc_statements_per_run": total(inproc, "trigger_statements") / in_runs,
                "inproc_rows_per_run": total(inproc, "trigger_rows") / in_runs,
            },
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

    def reused_seed(self) -> dict[str, str] | None:
        """With ``--list-reuse`` (list phase only): the seeded workflows of an earlier run of the
        list phase on this database, when the bench company still has at least ``--list-runs`` runs
        of them; None means the database is emptied and seeded as usual."""
        assert self.probe is not None
        if not self.args.list_reuse or self.args.phases != {"list"}:
            return None
        found = (
            self.probe.all(
                "SELECT w.name, w.id, (SELECT count(*) FROM runs r WHERE r.workflow_key = w.key) "
                "FROM workflows w JOIN companies c ON c.id = w.company_id "
                "WHERE c.name = 'bench' AND w.name LIKE 'bench-list-_' AND w.deleted_at IS NULL"
            )
            if self.probe.one("SELECT to_regclass('runs')")[0]
            else []
        )
        workflows = {name[-1]: workflow_id for name, workflow_id, _ in found}
        if sorted(workflows) != ["a", "b", "c"] or sum(n for _, _, n in found) < self.args.list_runs:
            log("--list-reuse: no earlier seed of that size here; emptying and seeding")
            return None
        return workflows

    def seed(self, count: int) -> dict[str, str]:
        assert self.probe is not None
        if self.reused is not None:
            log(f"--list-reuse: keeping the runs seeded by an earlier run (at least {count:,})")
            return self.reused
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

    def list_load_rate(self) -> float:
        """Steps/s of workload A to run during the list phase: ``--list-load``, else half of the
        in-process rate measured in this run (A's top rate: its feeding is not the limit)."""
        if self.args.list_load is not None:
            return self.args.list_load
        measured = self.results.get("throughput", {}).get("inproc_steps_per_s")
        if measured:
            return measured / 2
        log(f"no throughput measured in this run: the list phase's load is {DEFAULT_LIST_LOAD:.0f} steps/s")
        return DEFAULT_LIST_LOAD

    def start_list_load(self, steps_per_s: float) -> dict[str, Any]:
        """Workload A at ``steps_per_s``: workers, and a feeder process triggering runs in-process."""
        a = self.args
        workflow_id = self.api.create_workflow("bench-list-load", a.steps)
        runs_per_s = steps_per_s / a.steps
        log(f"load for GET /runs: {steps_per_s:.0f} steps/s ({runs_per_s:.0f} runs/s of {a.steps} steps)")
        spec = {"company_id": self.company_id, "workflow_id": workflow_id, "runs_per_s": runs_per_s}
        self.start_baton_workers()
        self.children.start(  # both start at once: their start-ups overlap
            "feeder",
            [sys.executable, str(Path(__file__).resolve()), "--feed", json.dumps(spec)],
            self.env,
            VAR / "bench-feeder.log",
        )
        self.wait_workers_ready()
        # Past the ramp: the first runs completed.
        self.wait_for(
            "load runs completed", max(1, int(runs_per_s)), lambda: self.completed_runs(workflow_id), "feeder"
        )
        return {
            "workflow_id": workflow_id,
            "target_steps_per_s": steps_per_s,
            "started": time.monotonic(),
            "completed": self.completed_runs(workflow_id),
        }

    def stop_list_load(self, load: dict[str, Any]) -> dict[str, Any]:
        """Stop the load; the step rate it achieved while the list was measured."""
        assert self.probe is not None
        elapsed = time.monotonic() - load["started"]
        completed = self.completed_runs(load["workflow_id"])
        self.children.stop("feeder")
        self.children.stop("baton-worker")
        triggered = self.probe.one(
            "SELECT count(*) FROM runs WHERE workflow_id = %s", (load["workflow_id"],)
        )[0]
        achieved = (completed - load["completed"]) * self.args.steps / elapsed
        target = load["target_steps_per_s"]
        log(
            f"load during GET /runs: {achieved:.0f} steps/s executed (target {target:.0f}); "
            f"{triggered - completed} runs unfinished when it stopped"
        )
        return {
            "target_steps_per_s": load["target_steps_per_s"],
            "achieved_steps_per_s": achieved,
            "seconds": elapsed,
            "runs_triggered": triggered,
            "runs_unfinished_at_stop": triggered - completed,
        }

    def list_latency(self) -> None:
        a = self.args
        self.ensure_api()
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
        rate = self.list_load_rate()
        load = self.start_list_load(rate) if rate > 0 else None
        under = f", under a load of {rate:.0f} steps/s" if load else " at idle"
        log(f"GET /api/v1/runs on {total:,} runs{under}: {len(cases)} cases x {a.list_requests} requests")
        out: dict[str, Any] = {"table_runs": total, "requests": a.list_requests, "cases": {}}
        try:
            self.list_cases(cases, out)
            out["floor"] = self.list_floor()
        finally:
            if load is not None:
                out["load"] = self.stop_list_load(load)
        self.results["list"] = out

    def list_floor(self) -> dict[str, float]:
        """The same server's answer to ``GET /healthz`` (no database, no Redis), timed as the list
        is and under the same load: the latency a request has before it does any work."""
        session, url = self.api.session, self.api.base_url + "/healthz"
        samples = []
        for i in range(20 + self.args.list_requests):
            started = time.perf_counter()
            response = session.get(url, timeout=30)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise BenchError(f"GET /healthz: HTTP {response.status_code}")
            if i >= 20:
                samples.append(elapsed * 1000)
        floor = {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "max_ms": max(samples)}
        log(
            f"GET /healthz (the floor, same load): p50 {floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms"
        )
        return floor

    def list_cases(self, cases: dict[str, dict[str, Any]], out: dict[str, Any]) -> None:
        a = self.args
        session = self.api.session
        url = self.api.base_url + "/api/v1/runs"
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

    # ----------------------------------------------------------------- run

    def run(self) -> None:
        phases = self.args.phases
        self.setup()
        if "triggers" in phases:
            self.ensure_api()
            self.triggers_per_second()
            self.triggers_with_workers()
        if "throughput" in phases:
            self.throughput()
        if "latency" in phases:
            self.ensure_api()
            self.baton_latency()
            self.bare_latency()
        if "list" in phases and self.args.list_runs > 0:
            self.list_latency()

    def close(self) -> None:
        if self.services is not None:
            self.services.db.dispose()
            self.services.queue.broker.close()
        if self.probe is not None:
            self.probe.close()
        if self.admin is not None:
            self.admin.close()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


# --------------------------------------------------------------------------- report


# The performance issue's "Done when" targets (DESIGN section 11).
TARGET_RATIO = 0.5  # A with HTTP triggers, steps/s against bare Dramatiq's
TARGET_COMMITS = 1.1  # per executed step, worker connections
TARGET_STATEMENTS = 2.5  # per executed step, worker connections
TARGET_CPU_MS = 1.2  # worker CPU per executed step
TARGET_SEQ_MS = 2.5  # per step of a sequential run
TARGET_TRIGGERS = 1000  # single API triggers/s
TARGET_BATCH = 5000  # runs/s through the batch trigger
TARGET_LIST_P99_MS = 20.0  # GET /api/v1/runs under load


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

    def at_most(metric: str, value: float, limit: float, fmt: str = "{:.2f}") -> None:
        row(metric, value, None, f"<= {limit:g}", value <= limit, fmt)

    def info(metric: str, value: float | None, fmt: str = "{:.2f}", baseline: float | None = None) -> None:
        row(metric, value, baseline, "(info)", None, fmt)

    t = results.get("throughput")
    if t:
        ratio = t["baton_steps_per_s"] / t["bare_steps_per_s"]
        row(
            "A over HTTP triggers, steps/s",
            t["baton_steps_per_s"],
            t["bare_steps_per_s"],
            f"ratio >= {TARGET_RATIO:g}",
            ratio >= TARGET_RATIO,
            "{:.0f}",
        )
        if t.get("inproc_steps_per_s"):
            info("A triggered in-process, steps/s", t["inproc_steps_per_s"], "{:.0f}", t["bare_steps_per_s"])
        if t.get("effects_steps_per_s"):
            info(
                "  A in-process, steps with effects (1 round)",
                t["effects_steps_per_s"],
                "{:.0f}",
                t["bare_steps_per_s"],
            )
        info(
            "  A over HTTP, timed from worker spawn",
            t["baton_steps_per_s_wall"],
            "{:.0f}",
            t["bare_steps_per_s_wall"],
        )
    per = results.get("per_step")
    if per:
        http, inproc = per["http"], per["inproc"]
        at_most("PG commits / step, workers (A over HTTP)", http["commits"], TARGET_COMMITS, "{:.3f}")
        at_most("PG commits / step, workers (A in-process)", inproc["commits"], TARGET_COMMITS, "{:.3f}")
        at_most(
            "SQL statements / step, workers (A over HTTP)", http["statements"], TARGET_STATEMENTS, "{:.3f}"
        )
        at_most(
            "SQL statements / step, workers (A in-process)", inproc["statements"], TARGET_STATEMENTS, "{:.3f}"
        )
        info("rows written / step, workers (A over HTTP)", http["rows"], "{:.3f}")
        info("rows written / step, workers (A in-process)", inproc["rows"], "{:.3f}")
        at_most("worker CPU ms / step (A in-process)", inproc["cpu_ms"], TARGET_CPU_MS)
        info("  worker CPU ms / step, A over HTTP incl. start-up", http["cpu_ms_with_startup"])
        fx = per.get("effects")
        if fx:
            info("  PG commits / step, steps with effects", fx["commits"], "{:.3f}")
            info("  SQL statements / step, steps with effects", fx["statements"], "{:.3f}")
            info("  worker CPU ms / step, steps with effects", fx["cpu_ms"])
        tr = per["triggers"]
        info("PG commits / run, HTTP trigger", tr["http_commits_per_run"], "{:.3f}")
        info("rows written / run, HTTP trigger", tr["http_rows_per_run"], "{:.3f}")
        info("PG commits / run, in-process batch trigger", tr["inproc_commits_per_run"], "{:.3f}")
        info("SQL statements / run, in-process batch trigger", tr["inproc_statements_per_run"], "{:.3f}")
        info("rows written / run, in-process batch trigger", tr["inproc_rows_per_run"], "{:.3f}")
    c = results.get("commits")
    if c:
        info("PG commits / step incl. HTTP triggers", c["per_step_with_triggers"], "{:.3f}")
        info("  writing xacts / step, workers (xids)", c["write_xacts_per_step_without_triggers"], "{:.3f}")
        info("  writing xacts / HTTP trigger (xids)", c["write_xacts_per_trigger"], "{:.3f}")
    s, b = results.get("sequential"), results.get("bare_sequential")
    if s:
        base = b["ms_per_hop"] if b else None
        row(
            f"B: sequential ms/step ({s['steps']} steps)",
            s["ms_per_step"],
            base,
            f"<= {TARGET_SEQ_MS:g} ms",
            s["ms_per_step"] <= TARGET_SEQ_MS,
            "{:.2f}",
        )
        budget = TARGET_SEQ_MS * s["steps"]
        row(
            f"  {s['steps']}-step run, trigger->completed ms",
            s["median_ms"],
            b["median_ms"] if b else None,
            f"<= {budget:g} ms",
            s["median_ms"] <= budget,
        )
    # DESIGN §12: the trigger rate is the API's alone (workers stopped); the same with the workers
    # running (executing what is triggered, on the same cores) is reported beside it.
    for key, label, judged in (
        ("triggers", "workers stopped", True),
        ("triggers_busy", "workers running", False),
    ):
        tr = results.get(key)
        if tr:
            rate = tr["median_per_s"]
            row(
                f"API triggers/s, {label}",
                rate,
                None,
                f">= {TARGET_TRIGGERS}" if judged else "(info)",
                rate >= TARGET_TRIGGERS if judged else None,
                "{:.0f}",
            )
    bt = results.get("batch_triggers")
    if bt:
        rate = bt["runs_per_s"]
        row(
            f"API batch trigger runs/s ({bt['batch_size']} a batch)",
            rate,
            None,
            f">= {TARGET_BATCH}",
            rate >= TARGET_BATCH,
            "{:.0f}",
        )
    o = results.get("one_step")
    if o:
        info("1-step trigger->completed p50 ms", o["p50_ms"], "{:.1f}")
        row("1-step trigger->completed p99 ms", o["p99_ms"], None, "<= 30 ms", o["p99_ms"] <= 30)
    lst = results.get("list")
    if lst:
        load = lst.get("load")
        if load:
            info(
                f"load during GET /runs, steps/s (target {load['target_steps_per_s']:.0f})",
                load["achieved_steps_per_s"],
                "{:.0f}",
            )
        worst = None
        for name, case in lst["cases"].items():
            at_most(f"GET /runs p99 ms: {name}", case["p99_ms"], TARGET_LIST_P99_MS, "{:.1f}")
            worst = case["p99_ms"] if worst is None else max(worst, case["p99_ms"])
        if worst is not None:
            runs = lst["table_runs"]
            at_most(f"GET /runs p99 ms, worst case ({runs:,} runs)", worst, TARGET_LIST_P99_MS, "{:.1f}")
        floor = lst.get("floor")
        if floor:
            info("  GET /healthz p50 ms, same load (no work: the floor)", floor["p50_ms"], "{:.1f}")
            info("  GET /healthz p99 ms, same load (no work: the floor)", floor["p99_ms"], "{:.1f}")
    return rows


def _cells(r: dict[str, Any]) -> tuple[str, ...]:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    verdict = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
    fmt = r.get("fmt", "{:.2f}")
    return (
        r["metric"],
        cell(r["baton"], fmt),
        cell(r["baseline"], fmt),
        cell(r["ratio"], "{:.2f}"),
        r["target"],
        verdict,
    )


HEADINGS = ("metric", "Baton", "baseline", "ratio", "target", "result")


def render(rows: list[dict[str, Any]]) -> str:
    table = [HEADINGS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(6)]
    lines = []
    for n, line in enumerate(table):
        cells = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, 4)]
        cells += [line[4].ljust(widths[4]), line[5]]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table (the README's performance table)."""
    lines = ["| " + " | ".join(HEADINGS) + " |", "|---|--:|--:|--:|---|---|"]
    for r in rows:
        metric, *rest = _cells(r)
        if metric.startswith(" "):
            metric = "&nbsp;&nbsp;" + metric.strip()
        cells = [metric, *rest]
        cells[4] = cells[4].replace(">=", "≥").replace("<=", "≤")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    """One line: when, on what, and how busy the machine was (load average at start and end)."""
    env = report.get("environment", {})
    load = report.get("load_average", {})

    def la(values: list[float] | None) -> str:
        return " ".join(f"{v:.2f}" for v in values) if values else "?"

    date = report.get("date_utc") or report.get("started_at", "?")
    return (
        f"Baton bench {date}, {env.get('cpus', '?')} CPUs, PostgreSQL {env.get('postgres', '?')}, "
        f"Python {env.get('python', '?')}, Dramatiq {env.get('dramatiq', '?')}; load average (1/5/15 min) "
        f"{la(load.get('start'))} at start, {la(load.get('end'))} at end; {report.get('duration_s', 0):.0f} s"
        + ("" if report.get("ok", True) else f"; FAILED: {report.get('error')}")
    )


# --------------------------------------------------------------------------- main

PHASES = ("triggers", "throughput", "latency", "list")
DEFAULT_LIST_LOAD = 250.0  # steps/s when this run measured no throughput (about half of A on 2 cores)
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
    parser.add_argument(
        "--list-load",
        type=float,
        default=None,
        help="steps/s of workload A running while GET /runs is timed (default: half the in-process A "
        f"rate measured in this run, else {DEFAULT_LIST_LOAD:.0f}; 0: at idle)",
    )
    parser.add_argument(
        "--list-reuse",
        action="store_true",
        help="with --phases list only: keep the database's runs when an earlier list phase seeded at "
        "least --list-runs of them (no emptying, no seeding); figures then include the runs earlier "
        "loads added",
    )
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
    parser.add_argument("--markdown", action="store_true", help="print the summary as a Markdown table")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the summary of an earlier run's results file (with --markdown: for the README) and exit",
    )
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


def feed(spec: dict[str, Any]) -> int:
    """The list phase's load (a child process): trigger runs of one workflow in-process through
    the engine's batch trigger at ``runs_per_s`` until SIGTERM, then finish the batch at hand."""
    from app import engine
    from app.config import Config
    from app.services import build_services

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    services = build_services(Config.from_env(), pool_size=2)
    rate, tick = float(spec["runs_per_s"]), 0.05
    started, sent = time.monotonic(), 0
    while not stop.is_set():
        due = min(1000, int((time.monotonic() - started) * rate) - sent)
        if due > 0:
            items = [{"input": {"i": sent + i}} for i in range(due)]
            engine.trigger_batch(services, spec["company_id"], spec["workflow_id"], items)
            sent += due
        stop.wait(tick)
    services.db.dispose()
    return 0


def print_summary(report: dict[str, Any], rows: list[dict[str, Any]], markdown: bool) -> None:
    if markdown:
        print(f"{header(report)}\n\n{render_markdown(rows)}")
    else:
        print(f"{header(report)}\n\n{render(rows)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--feed"]:
        return feed(json.loads(argv[1]))
    args = parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        # The rows are judged again from the figures, so a report follows the current targets.
        print_summary(saved, summary_rows(saved["results"]), args.markdown)
        return 0
    children = Children()
    bench = Bench(args, children)
    started = time.time()
    load_start = list(os.getloadavg())
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
        "date_utc": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": time.time() - started,
        "load_average": {"start": load_start, "end": list(os.getloadavg())},
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
        "summary": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if rows:
        print_summary(report, rows, args.markdown)
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
