#!/usr/bin/env python3
"""Fault injection: no accepted run may stay unfinished (DESIGN §5.7 and §11).

Run from the repository root with the project's virtualenv:

    .venv/bin/python scripts/chaos.py --quick      # CI: ~80 runs, 20 s of faults, under 3 minutes
    .venv/bin/python scripts/chaos.py              # 500 runs x 5 steps, 60 s of faults
    .venv/bin/python scripts/chaos.py --kill-for 0 --no-redis-restart --no-pg-restart   # no faults
    .venv/bin/python scripts/chaos.py --quick --shape dag   # parallel steps and concurrency keys

Everything it uses is its own: a PostgreSQL cluster made with ``pg_createcluster`` (trust auth on
127.0.0.1 only, a spare port), a Redis server on a spare port without persistence, ``baton api``,
``baton worker --processes 2 --threads 8`` and ``baton scheduler`` started against them, and an
HTTP target served from a thread on 127.0.0.1 (``/count/<run>/<step>`` counts executions,
``/flaky/<run>/<step>`` answers 503 to about 30 % of the requests, at most twice in a row for a
step, so its retry policy always gets through). The workflow's steps cycle through
transform, http.request (count), http.request (flaky, retried) and delay. With ``--shape dag`` they
form diamonds (s1 → s2, s3 → s4 → s5, s6 → s7 …, each join needing both branches) and the workflow
has a concurrency key (``input.n`` modulo 10, limit 2): then no concurrency slot may be left held
or waiting, and no key may ever have had more than 2 runs executing at once.

While the runs are being triggered (over the first three quarters of the fault window; each trigger
carries an Idempotency-Key and is retried on connection errors and 5xx), it SIGKILLs a random child
of the worker pool every --kill-every seconds for --kill-for seconds, restarts Redis empty at a
third of the window and PostgreSQL (fast stop, 3 s down, start) at two thirds. A worker pool or
another Baton process that exits is reported and started again, as a supervisor would. Then it
waits (bounded) for every run to be final, reads the figures from PostgreSQL and prints a summary
on stdout, ending with one JSON line of the figures.

Exit status: 0 when every must-be-zero figure is zero; 1 when one is not (runs not final,
duplicate success records, completed runs without output, the worker pool or another Baton
process exiting, a fault whose recovery exceeds 45 s: the first step completed after it and, for a
worker kill, the pool whole again and the steps running at the kill finished); 2 when the setup
failed; 130 on SIGINT or SIGTERM. Clean-up (processes by PID, the cluster, Redis) runs in every
case. Progress goes to stderr; the Baton processes' output to ``var/chaos-*.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests

REPO = Path(__file__).resolve().parent.parent
VAR = REPO / "var"
FULL = {"runs": 500, "steps": 5, "kill_every": 3.0, "kill_for": 60.0, "wait": 240.0}
QUICK = {"runs": 80, "steps": 5, "kill_every": 3.0, "kill_for": 20.0, "wait": 90.0}
FINAL = ("completed", "failed", "cancelled", "timeout")
RECOVERY_BUDGET_S = 45.0
WORKER_PROCESSES, WORKER_THREADS = 2, 8
PG_DOWN_S = 3.0
TRIGGER_SPREAD = 0.75  # of the fault window
PROGRESS_EVERY_S = 5.0
MAX_RESTARTS = 30
T0 = time.monotonic()


class SetupError(Exception):
    """Chaos could not build its environment; no figure means anything."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived."""


def log(message: str) -> None:
    print(f"[chaos {time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help=f"runs to trigger ({FULL['runs']}; quick {QUICK['runs']})")
    parser.add_argument("--steps", type=int, help=f"steps per run ({FULL['steps']})")
    parser.add_argument("--kill-every", type=float, help="seconds between worker kills (3)")
    parser.add_argument("--kill-for", type=float, help="length of the fault window in seconds (60; quick 20)")
    parser.add_argument("--no-redis-restart", action="store_true", help="do not restart Redis")
    parser.add_argument("--no-pg-restart", action="store_true", help="do not restart PostgreSQL")
    parser.add_argument("--quick", action="store_true", help="short version for CI (under 3 minutes)")
    parser.add_argument(
        "--shape",
        choices=("chain", "dag"),
        default="chain",
        help="chain: each step needs the one before; dag: diamonds of parallel steps, and a concurrency key",
    )
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.runs < 1 or args.steps < 1 or args.kill_every <= 0 or args.kill_for < 0:
        parser.error("--runs and --steps must be >= 1, --kill-every > 0, --kill-for >= 0")
    return args


# --------------------------------------------------------------------------- processes by PID


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks: with the PID, it names one process, never a reused PID."""
    stat = _stat(pid)
    return None if stat is None else int(stat[19])


def live_children(pid: int) -> list[int]:
    """Children that are not zombies (a killed child stays listed until its parent reaps it)."""
    return [child for child in children_of(pid) if (_stat(child) or ["Z"])[0] != "Z"]


def children_of(pid: int) -> list[int]:
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            found.update(int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return sorted(found)


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid`` as {pid: start time}."""
    found: dict[int, int] = {}
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        started = start_time(child)
        if started is not None and child not in found:
            found[child] = started
            todo.extend(children_of(child))
    return found


def kill_exact(pid: int, started: int, signum: int = signal.SIGKILL) -> bool:
    """Signal ``pid`` only when it is still the process that started at ``started``."""
    stat = _stat(pid)
    if stat is None or int(stat[19]) != started or stat[0] == "Z":
        return False
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_command(args: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise SetupError(f"{' '.join(args[:3])} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


# --------------------------------------------------------------------------- PostgreSQL and Redis


class Postgres:
    """A cluster of its own: ``pg_createcluster`` runs the server as the ``postgres`` user."""

    def __init__(self) -> None:
        root = Path("/etc/postgresql")
        found = [v.name for v in root.iterdir() if v.name.replace(".", "").isdigit()] if root.is_dir() else []
        versions = sorted(found, key=float)
        if not versions or not shutil.which("pg_createcluster"):
            raise SetupError("pg_createcluster and /etc/postgresql/<version> are needed")
        self.version = versions[-1]
        self.name = f"chaos{os.getpid()}"
        self.port = free_port()
        self.created = False
        self.url = f"postgresql://chaos@127.0.0.1:{self.port}/chaos"

    @property
    def conf_dir(self) -> Path:
        return Path("/etc/postgresql") / self.version / self.name

    def create(self) -> None:
        if self.conf_dir.exists():
            raise SetupError(f"a cluster named {self.name} already exists; not touching it")
        log(f"creating PostgreSQL {self.version} cluster {self.name} on 127.0.0.1:{self.port}")
        self.created = True  # from here on, clean-up drops it (pg_createcluster may fail half-way)
        run_command(
            ["pg_createcluster", self.version, self.name, "-p", str(self.port), "--start-conf", "manual"]
            + ["--", "--auth-local=peer", "--auth-host=trust"]
        )
        with open(self.conf_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# scripts/chaos.py\nlisten_addresses = '127.0.0.1'\n")
        self.ctl("start")
        admin = self.connect("postgres", "postgres", attempts=30)
        with admin:
            admin.execute("CREATE ROLE chaos LOGIN")
            admin.execute("CREATE DATABASE chaos OWNER chaos")

    def ctl(self, *action: str) -> None:
        run_command(["pg_ctlcluster", self.version, self.name, *action], timeout=90)

    def connect(self, user: str = "chaos", dbname: str = "chaos", attempts: int = 1) -> psycopg.Connection:
        for attempt in range(attempts):
            try:
                return psycopg.connect(
                    f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}", autocommit=True, connect_timeout=3
                )
            except psycopg.OperationalError:
                if attempt + 1 == attempts:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]] | None:
        """Rows, or None while the server is down."""
        try:
            with self.connect() as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            return None

    def bounce(self) -> None:
        self.ctl("stop", "-m", "fast")
        time.sleep(PG_DOWN_S)
        self.ctl("start")

    def drop(self) -> None:
        if self.created and self.conf_dir.exists():
            log(f"dropping cluster {self.name}")
            run_command(["pg_dropcluster", self.version, self.name, "--stop"], timeout=90)
        self.created = False


class RedisServer:
    """``redis-server`` on a spare port, no persistence: a restart starts it empty."""

    def __init__(self, log_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SetupError("redis-server is needed on PATH")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"redis-server exited with code {self.proc.returncode} (see {self.log_path})"
                )
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.1)
        raise SetupError("redis-server did not answer within 15 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # Popen signals its own PID only, and only while it is not reaped
            self.proc.wait(timeout=10)
        self.proc = None

    def restart_empty(self) -> None:
        self.kill()
        self.start()


# --------------------------------------------------------------------------- the HTTP target


class Target:
    """Counts executions (2xx answers) per (run, step); the flaky endpoint also answers 503.

    A (run, step) gets 0 (7 in 10), 1 (2 in 10) or 2 (1 in 10) refusals before a 200, chosen from a
    CRC of its ids: about 30 % of the requests are refused, and 5 attempts always get through.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executions: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.refused = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="target", daemon=True)

    def answer(self, kind: str, run_id: str, step_id: str) -> int:
        with self.lock:
            self.requests[(run_id, step_id)] += 1
            if kind == "flaky":
                refusals = (0, 0, 0, 0, 0, 0, 0, 1, 1, 2)[zlib.crc32(f"{run_id}/{step_id}".encode()) % 10]
                if self.requests[(run_id, step_id)] <= refusals:
                    self.refused += 1
                    return 503
            self.executions[(run_id, step_id)] += 1
            return 200

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def _handler(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) == 3 and parts[0] in ("count", "flaky"):
                status = target.answer(*parts)
            else:
                status = 404
            body = json.dumps({"ok": status == 200}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    return Handler


CONCURRENCY = {"key": "{{ input.n % 10 }}", "limit": 2}  # --shape dag


def dag_needs(index: int) -> list[str]:
    """Diamonds: s1 is the root; s(3g+2) and s(3g+3) need s(3g+1); s(3g+4) needs both."""
    if index == 0:
        return []
    if index % 3 == 0:
        return [f"s{index - 1}", f"s{index}"]
    return [f"s{index - index % 3 + 1}"]


def workflow_definition(steps: int, target_url: str, shape: str = "chain") -> dict[str, Any]:
    """M steps cycling through transform, http.request, flaky http.request with retry, delay."""
    definition = []
    for index in range(steps):
        step_id = f"s{index + 1}"
        kind = index % 4
        if kind == 0:
            step = {"action": "transform", "input": {"runId": "{{ run.id }}", "n": "{{ input.n }}"}}
        elif kind == 3:
            step = {"action": "delay", "input": {"durationMs": "{{ input.delayMs }}"}}
        else:
            path = "count" if kind == 1 else "flaky"
            request = {"method": "POST", "url": f"{target_url}/{path}/{{{{ run.id }}}}/{step_id}"}
            request["json"] = {"runId": "{{ run.id }}", "stepId": step_id}
            step = {"action": "http.request", "input": request}
            if kind == 2:
                step["retry"] = {
                    "maxAttempts": 5,
                    "backoff": "exponential",
                    "initialDelayMs": 200,
                    "maxDelayMs": 2000,
                }
        if shape == "dag":
            step["needs"] = dag_needs(index)
        definition.append({"id": step_id, **step})
    output = {"runId": "{{ run.id }}", "n": "{{ input.n }}", "steps": steps}
    workflow = {"name": "chaos", "steps": definition, "output": output}
    if shape == "dag":
        workflow["concurrency"] = CONCURRENCY
    return workflow


# --------------------------------------------------------------------------- triggers


class Triggers(threading.Thread):
    """Triggers the runs at an even pace; a failed trigger is retried with the same Idempotency-Key."""

    def __init__(self, url: str, key: str, inputs: list[dict[str, Any]], spread_s: float) -> None:
        super().__init__(name="triggers", daemon=True)
        self.url, self.key, self.inputs, self.spread_s = url, key, inputs, spread_s
        self.stopping = threading.Event()
        self.accepted: dict[int, str] = {}
        self.replayed = 0
        self.retries = 0
        self.gave_up = 0
        self.refused: list[str] = []
        self.finished = False

    def run(self) -> None:
        session = requests.Session()
        started = time.monotonic()
        for index, body in enumerate(self.inputs):
            due = started + self.spread_s * index / len(self.inputs)
            if self.stopping.wait(max(0.0, due - time.monotonic())):
                return
            self.trigger(session, index, body)
        self.finished = True

    def trigger(self, session: requests.Session, index: int, body: dict[str, Any]) -> None:
        headers = {"x-api-key": self.key, "Idempotency-Key": f"chaos-{index}"}
        deadline = time.monotonic() + 60
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                response = session.post(self.url, json=body, headers=headers, timeout=(2, 15))
            except requests.RequestException:
                response = None
            if response is not None and response.status_code in (200, 202):
                self.accepted[index] = response.json()["data"]["id"]
                self.replayed += response.status_code == 200
                return
            if response is not None and response.status_code < 500 and response.status_code != 429:
                self.refused.append(f"HTTP {response.status_code}: {response.text[:200]}")
                log(f"trigger {index} refused: {self.refused[-1]}")
                if len(self.refused) >= 5:
                    log("5 triggers refused: triggering stops")
                    self.stopping.set()
                return
            self.retries += 1
            self.stopping.wait(0.5)
        self.gave_up += 1


# --------------------------------------------------------------------------- Baton's processes


class Baton:
    """``baton api``, ``baton worker`` and ``baton scheduler``; every PID seen under them is remembered."""

    def __init__(self, env: dict[str, str], api_port: int) -> None:
        self.exe = str(Path(sys.executable).with_name("baton"))
        if not Path(self.exe).exists():
            raise SetupError(f"no baton next to {sys.executable}: pip install -e '.[dev]' first")
        self.env = env
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.commands = {
            "api": ["api", "--port", str(api_port)],
            "worker": ["worker", "--processes", str(WORKER_PROCESSES), "--threads", str(WORKER_THREADS)],
            "scheduler": ["scheduler"],
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.known: dict[int, int] = {}  # pid -> start time, for the final sweep

    def cli(self, *args: str) -> str:
        return run_command([self.exe, *args], timeout=120, env=self.env)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log_path = VAR / f"chaos-{name}.log"
        with open(log_path, "ab") as out:
            out.write(f"\n===== {time.strftime('%H:%M:%S')} baton {' '.join(self.commands[name])}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                [self.exe, *self.commands[name]],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches chaos only; chaos stops them in order
            )
        self.procs[name] = proc
        self.remember(proc.pid)
        return proc

    def remember(self, pid: int) -> None:
        started = start_time(pid)
        if started is not None:
            self.known[pid] = started
            self.known.update(descendants(pid))

    def tail(self, name: str, lines: int = 15) -> str:
        path = VAR / f"chaos-{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return "\n".join(f"    {line}" for line in text)

    def stop_all(self, timeout: float = 20) -> None:
        """SIGTERM each leader (they stop their own children), then SIGKILL whatever is left, by PID."""
        log(f"stopping {', '.join(self.procs) or 'nothing'} (SIGTERM, then SIGKILL after {timeout:.0f} s)")
        for proc in self.procs.values():
            self.remember(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop within {timeout:.0f} s of SIGTERM; killing it")
                proc.kill()
                proc.wait(timeout=10)
        leftovers = [pid for pid, started in list(self.known.items()) if kill_exact(pid, started)]
        if leftovers:
            log(f"killed leftover processes {leftovers}")
        self.procs.clear()


class PoolWatch(threading.Thread):
    """Every 0.1 s: the worker pool's children, and when the pool is whole again after a kill."""

    def __init__(self, baton: Baton, children: list[int]) -> None:
        super().__init__(name="pool-watch", daemon=True)
        self.baton = baton
        self.full = len(children)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.children = children
        self.pending: list[dict[str, Any]] = []  # kills whose pool is not whole yet

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            proc = self.baton.procs.get("worker")
            if proc is None or proc.returncode is not None:
                continue
            children = live_children(proc.pid)
            for child in children:
                if child not in self.baton.known:
                    self.baton.remember(child)
            with self.lock:
                self.children = children
                for fault in list(self.pending):
                    if fault["pid"] not in children and len(children) >= self.full:
                        fault["poolRecoveredS"] = round(time.time() - fault["at"], 2)
                        self.pending.remove(fault)

    def pool_exited(self) -> None:
        with self.lock:
            for fault in self.pending:
                fault["poolExited"] = True
            self.pending.clear()
            self.children = []


# --------------------------------------------------------------------------- the chaos run


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random()
        self.tmp = Path(tempfile.mkdtemp(prefix="baton-chaos-"))
        self.deadline = time.monotonic() + 180 + args.kill_for + args.wait
        self.pg: Postgres | None = None
        self.redis: RedisServer | None = None
        self.target: Target | None = None
        self.baton: Baton | None = None
        self.watch: PoolWatch | None = None
        self.triggers: Triggers | None = None
        self.key = ""
        self.workflow_id = ""
        self.faults: list[dict[str, Any]] = []
        self.exits: list[dict[str, Any]] = []
        self.started_at = 0.0

    # ----------------------------------------------------------------- setup

    def setup(self) -> None:
        VAR.mkdir(exist_ok=True)
        for old in VAR.glob("chaos-*.log"):
            old.unlink()
        self.pg = Postgres()
        self.pg.create()
        self.redis = RedisServer(VAR / "chaos-redis.log")
        log(f"starting redis-server on 127.0.0.1:{self.redis.port}")
        self.redis.start()
        self.target = Target()
        self.target.start()
        self.baton = Baton(self.baton_env(), free_port())
        log("migrating (baton db upgrade)")
        self.baton.cli("db", "upgrade")
        self.key = self.baton.cli("keys", "create", "--company", "chaos").strip().splitlines()[-1]
        log(f"starting baton api ({self.baton.api_url}), worker and scheduler")
        for name in ("api", "worker", "scheduler"):
            self.baton.start(name)
        self.wait_ready()
        self.workflow_id = self.create_workflow()
        log(f"workflow {self.workflow_id}: {self.args.steps} steps; target {self.target.url}")

    def baton_env(self) -> dict[str, str]:
        assert self.pg is not None and self.redis is not None
        dropped = ("BROKER_URL", "BATON_ACTION_MODULES", "BATON_QUEUE_NAMESPACE", "PYTHONPATH")
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env.update(
            DATABASE_URL=self.pg.url,
            REDIS_URL=self.redis.url,
            BATON_VAR_DIR=str(self.tmp),
            BATON_HTTP_ALLOW_NETWORKS="127.0.0.0/8",
        )
        return env

    def wait_ready(self) -> None:
        """GET /readyz answers 200 and the worker pool has its processes (stable for a second)."""
        assert self.baton is not None
        deadline = time.monotonic() + 90
        ready, stable_since, count = False, 0.0, -1
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while time.monotonic() < deadline:
            for name, proc in self.baton.procs.items():
                if proc.poll() is not None:
                    raise SetupError(f"{name} exited with code {proc.returncode}:\n{self.baton.tail(name)}")
            if not ready:
                try:
                    ready = requests.get(self.baton.api_url + "/readyz", timeout=2).status_code == 200
                except requests.RequestException:
                    pass
            children = live_children(self.baton.procs["worker"].pid)
            if len(children) != count:
                count, stable_since = len(children), time.monotonic()
            if ready and count >= WORKER_PROCESSES and time.monotonic() - stable_since >= 1:
                self.watch = PoolWatch(self.baton, children)
                self.watch.start()
                log(f"ready: /readyz 200, worker pool with {count} children")
                return
            if time.monotonic() >= next_progress:
                log(
                    f"waiting for readiness: /readyz {'200' if ready else 'not yet'}, {count} worker children"
                )
                next_progress = time.monotonic() + PROGRESS_EVERY_S
            time.sleep(0.2)
        raise SetupError(f"not ready within 90 s (readyz {'200' if ready else 'failing'}, {count} workers)")

    def create_workflow(self) -> str:
        assert self.baton is not None and self.target is not None
        response = requests.post(
            self.baton.api_url + "/api/v1/workflows",
            json=workflow_definition(self.args.steps, self.target.url, self.args.shape),
            headers={"x-api-key": self.key},
            timeout=15,
        )
        if response.status_code != 201:
            raise SetupError(f"POST /api/v1/workflows: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()["data"]["id"]

    # ----------------------------------------------------------------- the fault window

    def plan(self) -> list[tuple[float, str]]:
        window, every = self.args.kill_for, self.args.kill_every
        plan = [(k * every, "worker-kill") for k in range(1, int(window // every) + 1)]
        if not self.args.no_redis_restart:
            plan.append((window / 3, "redis-restart"))
        if not self.args.no_pg_restart:
            plan.append((2 * window / 3, "pg-restart"))
        return sorted(plan)

    def run_window(self) -> None:
        assert self.baton is not None
        args = self.args
        inputs = [{"input": {"n": i, "delayMs": self.rng.randint(1000, 3000)}} for i in range(args.runs)]
        url = f"{self.baton.api_url}/api/v1/workflows/{self.workflow_id}/runs"
        spread = TRIGGER_SPREAD * args.kill_for
        self.triggers = Triggers(url, self.key, inputs, spread)
        plan = self.plan()
        log(f"fault window {args.kill_for:.0f} s, {len(plan)} faults; {args.runs} runs over {spread:.0f} s")
        started = time.monotonic()
        self.started_at = time.time()
        self.triggers.start()
        next_progress = 0.0
        while True:
            elapsed = time.monotonic() - started
            while plan and plan[0][0] <= elapsed:
                offset, kind = plan.pop(0)
                if kind == "worker-kill" and elapsed - offset > 1:  # a Redis or PG restart took its slot
                    self.faults.append(
                        {
                            "kind": kind,
                            "offsetS": round(offset, 1),
                            "skipped": "its slot fell in the previous fault",
                        }
                    )
                else:
                    self.inject(kind, elapsed)
                elapsed = time.monotonic() - started
            self.supervise()
            if elapsed >= next_progress:
                self.progress(f"window {elapsed:3.0f}/{args.kill_for:.0f} s")
                next_progress = elapsed + PROGRESS_EVERY_S
            if not plan and elapsed >= args.kill_for and not self.triggers.is_alive():
                return
            if elapsed > args.kill_for + 90 and not self.triggers.stopping.is_set():
                log("triggers still going 90 s after the window; stopping them")
                self.triggers.stopping.set()
            self.check_deadline()
            time.sleep(0.2)

    def inject(self, kind: str, offset: float) -> None:
        assert self.redis is not None and self.pg is not None
        fault: dict[str, Any] = {"kind": kind, "offsetS": round(offset, 1), "at": time.time()}
        if kind == "worker-kill":
            self.kill_worker_child(fault)
        elif kind == "redis-restart":
            self.redis.restart_empty()
            fault["downS"] = round(time.time() - fault["at"], 2)
        else:
            self.pg.bounce()
            fault["downS"] = round(time.time() - fault["at"], 2)
        self.faults.append(fault)
        detail = (
            fault.get("skipped") or f"pid {fault['pid']}"
            if kind == "worker-kill"
            else f"down {fault['downS']} s"
        )
        log(f"fault {len(self.faults)}: {kind} at +{offset:.1f} s ({detail})")

    def kill_worker_child(self, fault: dict[str, Any]) -> None:
        assert self.watch is not None and self.baton is not None
        with self.watch.lock:
            children = list(self.watch.children)
        if self.baton.procs["worker"].poll() is not None or not children:
            fault["skipped"] = "no worker child to kill"
            return
        pid = self.rng.choice(children)
        started = start_time(pid)
        # Steps orphaned by an earlier kill are still 'running': count each step under one kill only.
        earlier = {tuple(step) for f in self.faults for step in f.get("inflight", [])}
        fault["inflight"] = [step for step in self.running_steps() if tuple(step) not in earlier]
        fault["at"] = time.time()
        if started is None or not kill_exact(pid, started):
            fault["skipped"] = f"worker child {pid} was already gone"
            return
        fault["pid"] = pid
        with self.watch.lock:
            self.watch.pending.append(fault)

    def running_steps(self) -> list[list[Any]]:
        """Steps running at the moment of a kill; those of the killed child must be recovered."""
        assert self.pg is not None
        rows = self.pg.query("SELECT run_id, step_id, attempt FROM step_runs WHERE status = 'running'")
        return [list(row) for row in rows or []]

    def supervise(self) -> None:
        """A Baton process that exited is a failure; start it again (as a supervisor would) and go on."""
        assert self.baton is not None and self.watch is not None
        for name, proc in list(self.baton.procs.items()):
            if proc.poll() is None:
                continue
            offset = round(time.time() - self.started_at, 1) if self.started_at else 0.0
            self.exits.append({"process": name, "code": proc.returncode, "offsetS": offset})
            what = "worker pool" if name == "worker" else name
            if name == "worker":
                self.watch.pool_exited()
            if len(self.exits) > MAX_RESTARTS:
                raise SetupError(f"{what} exited (code {proc.returncode}); {MAX_RESTARTS} restarts already")
            log(f"{what} exited with code {proc.returncode} at +{offset} s; starting it again")
            self.baton.start(name)

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise SetupError("the total deadline passed")

    def status_counts(self) -> dict[str, int] | None:
        assert self.pg is not None
        rows = self.pg.query("SELECT status, count(*) FROM runs GROUP BY status")
        return None if rows is None else {status: count for status, count in rows}

    def progress(self, phase: str) -> None:
        assert self.triggers is not None and self.watch is not None
        counts = self.status_counts()
        if counts is None:
            final = "? (PostgreSQL down)"
        else:
            final = f"{sum(counts.get(s, 0) for s in FINAL)}/{sum(counts.values())}"
        log(
            f"{phase}: accepted {len(self.triggers.accepted)}/{self.args.runs} "
            f"(retries {self.triggers.retries}), final {final}, faults {len(self.faults)}, "
            f"worker children {len(self.watch.children)}, exits {len(self.exits)}"
        )

    def wait_final(self) -> None:
        assert self.triggers is not None
        deadline = min(time.monotonic() + self.args.wait, self.deadline)
        log(f"waiting up to {self.args.wait:.0f} s for every run to be final")
        next_progress = time.monotonic()
        while time.monotonic() < deadline:
            self.supervise()
            counts = self.status_counts()
            if counts is not None:
                total = sum(counts.values())
                if total >= len(self.triggers.accepted) and all(s in FINAL for s in counts):
                    log(f"every run is final ({total})")
                    return
            if time.monotonic() >= next_progress:
                self.progress("waiting")
                next_progress = time.monotonic() + PROGRESS_EVERY_S
            time.sleep(1)
        log("stopped waiting: some runs are not final")

    # ----------------------------------------------------------------- figures

    def collect(self) -> dict[str, Any]:
        assert self.pg is not None and self.triggers is not None and self.target is not None
        with self.pg.connect(attempts=20) as conn:
            figures: dict[str, Any] = {
                "runs": self.args.runs,
                "steps": self.args.steps,
                "killEveryS": self.args.kill_every,
                "killForS": self.args.kill_for,
                "runsAccepted": len(self.triggers.accepted),
                "triggerRetries": self.triggers.retries,
                "triggersReplayed": self.triggers.replayed,
                "triggersGivenUp": self.triggers.gave_up,
                "triggersRefused": self.triggers.refused[:5],
            }
            figures.update(run_figures(conn))
            figures.update(step_figures(conn))
            figures["faults"] = [fault_figures(conn, fault) for fault in self.faults]
        with self.target.lock:
            executions = dict(self.target.executions)
            figures["flakyRefused"] = self.target.refused
        figures["duplicateExecutions"] = sum(1 for count in executions.values() if count > 1)
        figures["executionsPerStep"] = histogram((step, count) for (_run, step), count in executions.items())
        figures["processExits"] = self.exits
        figures["workerPoolExits"] = sum(1 for e in self.exits if e["process"] == "worker")
        return figures

    def report(self) -> int:
        figures = self.collect()
        problems = verdict(figures)
        figures["problems"] = problems
        figures["ok"] = not problems
        print_summary(figures)
        print(json.dumps(figures, sort_keys=True, default=str), flush=True)
        return 1 if problems else 0

    # ----------------------------------------------------------------- clean-up

    def cleanup(self) -> None:
        """Every step runs even when an earlier one fails; nothing is left behind."""
        steps = [
            ("triggers", lambda: self.triggers and (self.triggers.stopping.set(), self.triggers.join(20))),
            ("pool watch", lambda: self.watch and self.watch.stopping.set()),
            ("baton processes", lambda: self.baton and self.baton.stop_all()),
            ("redis-server", lambda: self.redis and self.redis.kill()),
            ("postgresql cluster", lambda: self.pg and self.pg.drop()),
            ("http target", lambda: self.target and self.target.stop()),
            ("temporary directory", lambda: shutil.rmtree(self.tmp, ignore_errors=True)),
        ]
        log("cleaning up")
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (clean-up goes on whatever failed)
                log(f"clean-up of the {name} failed: {exc}")


def histogram(pairs: Any) -> dict[str, dict[str, int]]:
    """{step: {count: how many runs}} from (step, count) pairs."""
    result: dict[str, Counter[int]] = {}
    for step, count in pairs:
        result.setdefault(step, Counter())[count] += 1
    return {
        step: {str(n): k for n, k in sorted(counts.items())}
        for step, counts in sorted(result.items(), key=lambda item: int(item[0][1:]))
    }


def run_figures(conn: psycopg.Connection) -> dict[str, Any]:
    by_status = dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    stuck = conn.execute(
        "SELECT id, status FROM runs WHERE status <> ALL(%s) ORDER BY created_at", (list(FINAL),)
    ).fetchall()
    steps: dict[str, list[str]] = {}
    stuck_steps: Counter[str] = Counter()
    for run_id, step_id, status, attempt in conn.execute(
        "SELECT run_id, step_id, status, attempt FROM step_runs"
        " WHERE run_id = ANY(%s) ORDER BY run_id, position",
        ([run_id for run_id, _ in stuck],),
    ):
        steps.setdefault(run_id, []).append(f"{step_id}:{status}#{attempt}")
        if status not in ("success", "skipped", "pending"):
            stuck_steps[f"{step_id} {status}"] += 1
    no_output = conn.execute(
        "SELECT count(*) FROM runs WHERE status = 'completed' AND (output IS NULL OR output = 'null'::jsonb)"
    ).fetchone()[0]
    run_errors = conn.execute(
        "SELECT coalesce(error->>'code', '-') || ': ' || coalesce(error->>'message', ''), count(*)"
        " FROM runs WHERE status IN ('failed', 'timeout') GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
    ).fetchall()
    slots_left = conn.execute("SELECT count(*) FROM runs WHERE slot IS NOT NULL").fetchone()[0]
    # Runs that started while `limit` others of their key were executing (none may).
    over_limit = conn.execute(
        "SELECT count(*) FROM runs AS a WHERE a.concurrency_key IS NOT NULL AND a.started_at IS NOT NULL"
        " AND (SELECT count(*) FROM runs AS b WHERE b.concurrency_key = a.concurrency_key AND b.id <> a.id"
        " AND b.started_at <= a.started_at AND b.completed_at > a.started_at) >= %s",
        (CONCURRENCY["limit"],),
    ).fetchone()[0]
    return {
        "concurrencySlotsLeft": slots_left,
        "concurrencyOverLimit": over_limit,
        "runsInDatabase": sum(by_status.values()),
        "runsByStatus": by_status,
        "runsNotFinal": len(stuck),
        "stuckRuns": [{"id": r, "status": s, "steps": " ".join(steps.get(r, []))} for r, s in stuck[:50]],
        "stuckSteps": dict(stuck_steps.most_common()),
        "completedWithoutOutput": no_output,
        "failedRunErrors": dict(run_errors),
    }


def step_figures(conn: psycopg.Connection) -> dict[str, Any]:
    duplicates = conn.execute(
        "SELECT count(*) FROM (SELECT run_id, step_id FROM step_attempts WHERE status = 'success'"
        " GROUP BY run_id, step_id HAVING count(*) > 1) AS d"
    ).fetchone()[0]
    attempts = conn.execute("SELECT step_id, count(*) FROM step_attempts GROUP BY run_id, step_id").fetchall()
    codes = conn.execute(
        "SELECT coalesce(error->>'code', '-'), count(*) FROM step_attempts WHERE status = 'error' GROUP BY 1"
    ).fetchall()
    return {
        "duplicateSuccessRecords": duplicates,
        "attemptsPerStep": histogram(attempts),
        "attemptErrorCodes": dict(codes),
    }


def fault_figures(conn: psycopg.Connection, fault: dict[str, Any]) -> dict[str, Any]:
    """Seconds from the fault to the first step attempt completed after it, and what was active then."""
    result = {k: v for k, v in fault.items() if k not in ("inflight", "at")}
    if "skipped" in fault:
        return result
    at = fault["at"]
    first = conn.execute(
        "SELECT extract(epoch FROM min(completed_at)) FROM step_attempts"
        " WHERE completed_at > to_timestamp(%s)",
        (at,),
    ).fetchone()[0]
    result["progressAfterS"] = None if first is None else round(float(first) - at, 2)
    result["activeRuns"] = conn.execute(
        "SELECT count(*) FROM runs WHERE created_at <= to_timestamp(%s)"
        " AND (completed_at IS NULL OR completed_at > to_timestamp(%s))",
        (at, at),
    ).fetchone()[0]
    if fault["kind"] == "worker-kill":
        result.update(inflight_figures(conn, at, fault.get("inflight", [])))
    return result


def inflight_figures(conn: psycopg.Connection, at: float, inflight: list[list[Any]]) -> dict[str, Any]:
    """The steps running when a worker child was killed: when each one finished, by whichever attempt."""
    worst, unresolved = 0.0, 0
    for run_id, step_id, attempt in inflight:
        done = conn.execute(
            "SELECT extract(epoch FROM least("
            " (SELECT min(completed_at) FROM step_attempts WHERE run_id = %(r)s AND step_id = %(s)s"
            "  AND attempt >= %(a)s AND completed_at >= to_timestamp(%(at)s)),"
            " (SELECT completed_at FROM step_runs WHERE run_id = %(r)s AND step_id = %(s)s"
            "  AND status IN ('success', 'error', 'skipped'))))",
            {"r": run_id, "s": step_id, "a": attempt, "at": at},
        ).fetchone()[0]
        if done is None:
            unresolved += 1
        else:
            worst = max(worst, float(done) - at)
    return {
        "inflightSteps": len(inflight),
        "inflightUnresolved": unresolved,
        "inflightResolvedS": round(worst, 2) if not unresolved else None,
    }


# --------------------------------------------------------------------------- verdict and summary


def verdict(figures: dict[str, Any]) -> list[str]:
    """Every figure that must be zero and is not, one line each."""
    problems = []
    if figures["runsAccepted"] == 0:
        problems.append("no run was accepted")
    if figures["triggersRefused"]:
        problems.append(f"triggers refused with 4xx: {figures['triggersRefused'][0]}")
    for key, what in (
        ("runsNotFinal", "runs not final"),
        ("duplicateSuccessRecords", "duplicate success records"),
        ("completedWithoutOutput", "completed runs without output"),
        ("workerPoolExits", "worker pool exits"),
        ("concurrencySlotsLeft", "concurrency slots left held or waiting"),
        ("concurrencyOverLimit", "runs started over their key's concurrency limit"),
    ):
        if figures[key]:
            problems.append(f"{figures[key]} {what}")
    others = Counter(e["process"] for e in figures["processExits"] if e["process"] != "worker")
    problems.extend(f"{name} exited {count} times" for name, count in sorted(others.items()))
    for fault in figures["faults"]:
        problems.extend(fault_problems(fault))
    return problems


def fault_problems(fault: dict[str, Any]) -> list[str]:
    if "skipped" in fault:
        return []
    name = f"{fault['kind']} at +{fault['offsetS']} s"
    budget = RECOVERY_BUDGET_S
    problems = []
    progress = fault.get("progressAfterS")
    if progress is None and fault.get("activeRuns"):
        problems.append(f"{name}: no step completed afterwards ({fault['activeRuns']} runs were active)")
    elif progress is not None and progress > budget and fault.get("activeRuns"):
        problems.append(f"{name}: first step completed {progress} s later (> {budget:.0f} s)")
    if fault["kind"] != "worker-kill":
        return problems
    pool = fault.get("poolRecoveredS")
    if pool is None and not fault.get("poolExited"):
        problems.append(f"{name}: the pool never had its children back")
    elif pool is not None and pool > budget:
        problems.append(f"{name}: the pool had its children back after {pool} s (> {budget:.0f} s)")
    if fault.get("inflightUnresolved"):
        problems.append(f"{name}: {fault['inflightUnresolved']} in-flight step(s) never finished")
    elif (fault.get("inflightResolvedS") or 0) > budget:
        problems.append(
            f"{name}: steps in flight finished after {fault['inflightResolvedS']} s (> {budget:.0f} s)"
        )
    return problems


def fault_line(fault: dict[str, Any]) -> str:
    head = f"  +{fault['offsetS']:5.1f} s  {fault['kind']:<13}"
    if "skipped" in fault:
        return f"{head} skipped: {fault['skipped']}"
    progress = fault.get("progressAfterS")
    if not fault.get("activeRuns"):
        parts = ["no run was active"]
    elif progress is None:
        parts = [f"{fault['activeRuns']} runs active, no step completed afterwards"]
    else:
        parts = [f"{fault['activeRuns']} runs active, next step completed after {progress} s"]
    if fault["kind"] == "worker-kill":
        pool = fault.get("poolRecoveredS")
        pool = "no, the pool exited" if fault.get("poolExited") else "never" if pool is None else f"{pool} s"
        parts.insert(0, f"pid {fault['pid']}, pool whole again: {pool}")
        inflight = fault.get("inflightResolvedS")
        parts.append(
            f"{fault['inflightSteps']} in-flight step(s), "
            + (
                f"all finished within {inflight} s"
                if inflight is not None
                else f"{fault['inflightUnresolved']} never finished"
            )
        )
    else:
        parts.insert(0, f"down {fault['downS']} s")
    return f"{head} " + "; ".join(parts)


def print_summary(f: dict[str, Any]) -> None:
    def line(label: str, value: Any) -> None:
        print(f"{label:<30} {value}")

    kinds = Counter(fault["kind"] for fault in f["faults"])
    faults = ", ".join(f"{kind} x{count}" for kind, count in kinds.items()) or "no faults"
    print(f"\n== chaos: {f['runs']} runs x {f['steps']} steps; {f['killForS']:g} s fault window: {faults}")
    line(
        "runs accepted",
        f"{f['runsAccepted']} of {f['runs']} (trigger retries {f['triggerRetries']}, "
        f"replayed {f['triggersReplayed']}, given up {f['triggersGivenUp']}, "
        f"refused {len(f['triggersRefused'])})",
    )
    line("runs in the database", f["runsInDatabase"])
    line("runs by status", ", ".join(f"{k} {v}" for k, v in sorted(f["runsByStatus"].items())) or "none")
    line("runs not final (stuck)", f["runsNotFinal"])
    for run in f["stuckRuns"][:15]:
        print(f"    {run['id']} {run['status']}: {run['steps']}")
    if f["stuckSteps"]:
        line("  stuck on", ", ".join(f"{k} x{v}" for k, v in f["stuckSteps"].items()))
    line("duplicate success records", f["duplicateSuccessRecords"])
    line("duplicate executions", f"{f['duplicateExecutions']} (informative: delivery is at-least-once)")
    line("completed without output", f["completedWithoutOutput"])
    line("failed/timeout run errors", f["failedRunErrors"] or "none")
    line("attempt error codes", f["attemptErrorCodes"] or "none")
    line("attempts per step", f["attemptsPerStep"])
    line("target executions per step", f["executionsPerStep"])
    line("flaky 503 answers", f["flakyRefused"])
    print("faults:" if f["faults"] else "faults: none")
    for fault in f["faults"]:
        print(fault_line(fault))
    for e in f["processExits"]:
        name = "worker pool" if e["process"] == "worker" else e["process"]
        print(f"  {name} exited (code {e['code']}) at +{e['offsetS']} s")
    print("RESULT: " + ("OK" if not f["problems"] else "FAIL"))
    for problem in f["problems"]:
        print(f"  - {problem}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chaos = Chaos(args)

    def interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    code = 2
    try:
        chaos.setup()
        chaos.run_window()
        chaos.wait_final()
        code = chaos.report()
    except SetupError as exc:
        log(f"error: {exc}")
    except Interrupted:
        log("interrupted")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        chaos.cleanup()
    log(f"done in {time.monotonic() - T0:.0f} s, exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
