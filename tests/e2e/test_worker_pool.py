"""``baton worker`` as a real process tree: a supervisor whose worker processes are restarted alone.

These tests start ``baton worker -p 2 -t 2`` as a subprocess against the session's PostgreSQL
schema and a Redis namespace of this module's own (the session's in-process worker, started by
other tests, must not take these runs), and stop only the processes they started, by PID.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Config
from app.factory import create_app
from app.queue import StepQueue, make_broker
from tests.conftest import running_scheduler, session_env, wait_for

BATON = str(Path(sys.executable).with_name("baton"))


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, as a chaos script finds them."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def pool_config(config: Config) -> Config:
    return config.with_overrides(queue_namespace=f"{config.queue_namespace}-pool")


@pytest.fixture(scope="module")
def pool_services(pool_config: Config, services: Any) -> Iterator[Any]:
    broker = make_broker(pool_config)
    svc = dataclasses.replace(services, queue=StepQueue(broker), namespace=pool_config.queue_namespace)
    yield svc
    for key in services.redis.scan_iter(f"{pool_config.queue_namespace}:*"):
        services.redis.delete(key)
    svc.queue.delete_queues()
    broker.close()


@pytest.fixture(scope="module")
def app(pool_config: Config, pool_services: Any) -> Any:
    """The API enqueues into this module's namespace, which only the pools started here consume."""
    flask_app = create_app(pool_config, pool_services)
    flask_app.testing = True
    return flask_app


class Pool:
    """A ``baton worker`` subprocess and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready_children(self, count: int, timeout: float = 20) -> list[int]:
        """Wait until ``count`` children run and each has reported its worker ready."""

        def ready() -> list[int] | None:
            pids = children(self.pid)
            text = self.text()
            if len(pids) == count and all(f"worker process {p} ready" in text for p in pids):
                return pids
            return None

        return wait_for(ready, timeout, f"{count} ready worker processes\n{self.text()}")


@pytest.fixture
def drop_queues() -> Iterator[list[StepQueue]]:
    """Queues a test made, deleted after its pools stopped (request it before ``start_pool``)."""
    queues: list[StepQueue] = []
    yield queues
    for queue in queues:
        queue.delete_queues()


@pytest.fixture
def start_pool(pool_config: Config, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    started: list[Pool] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Pool:
        child_env = session_env(pool_config)
        child_env.update(
            DATABASE_URL=str(pool_config.database_url),
            REDIS_URL=str(pool_config.redis_url),
            BATON_QUEUE_NAMESPACE=pool_config.queue_namespace,
            BATON_HTTP_ALLOW_NETWORKS="127.0.0.0/8",
            BATON_LOG_LEVEL="INFO",
        )
        child_env.update(env or {})
        log = tmp_path / f"pool-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [BATON, "worker", *(args or ("-p", "2", "-t", "2"))],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(Pool(proc, log))
        return started[-1]

    yield start
    for pool in started:
        _stop(pool)


def _stop(pool: Pool) -> None:
    """SIGTERM the supervisor; SIGKILL it and the children it had if it does not stop."""
    if pool.proc.poll() is not None:
        return
    kids = children(pool.pid)
    pool.proc.send_signal(signal.SIGTERM)
    try:
        pool.proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        for pid in [pool.pid, *kids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pool.proc.wait()


def test_killed_worker_process_is_restarted_while_the_other_keeps_working(
    start_pool, make_workflow, trigger, wait_run
):
    wid = make_workflow(
        [
            {"id": "a", "action": "transform", "input": {"n": "{{ input.n }}"}},
            {"id": "b", "action": "transform", "input": {"n": "{{ steps.a.output.n }}"}},
        ]
    )
    pool = start_pool("-p", "2", "-t", "2")
    victim, survivor = pool.ready_children(2)
    for run in [trigger(wid, {"n": i}) for i in range(4)]:
        assert wait_run(run["id"])["status"] == "completed"

    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    after_kill = [trigger(wid, {"n": i}) for i in range(6)]
    for run in after_kill:
        done = wait_run(run["id"], timeout=20)
        assert done["status"] == "completed" and done["output"] == {"n": run["input"]["n"]}
    assert survivor in children(pool.pid)

    def replacement() -> list[int]:
        return [p for p in children(pool.pid) if p not in (victim, survivor)]

    (new,) = wait_for(replacement, 10, f"a new worker process\n{pool.text()}")
    back_after = time.monotonic() - killed_at
    assert back_after < 10
    assert sorted(children(pool.pid)) == sorted([survivor, new])
    assert f"worker process {victim} was killed by SIGKILL" in pool.text()
    assert pool.proc.poll() is None

    # The replacement works: with the survivor killed too, runs still complete.
    wait_for(lambda: f"worker process {new} ready" in pool.text(), 20, "the replacement is ready")
    os.kill(survivor, signal.SIGKILL)
    for run in [trigger(wid, {"n": i}) for i in range(3)]:
        assert wait_run(run["id"], timeout=20)["status"] == "completed"
    pool.ready_children(2)


def test_sigterm_stops_the_pool_and_every_worker_process(start_pool):
    pool = start_pool("--processes", "2", "--threads", "2")
    kids = pool.ready_children(2)
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=20) == 0
    assert not [pid for pid in kids if alive(pid)]
    text = pool.text()
    assert all(f"worker process {pid} exited with code 0" in text for pid in kids), text
    assert "worker pool stopped" in text


def test_sigterm_lets_the_step_in_flight_finish(
    start_pool, target, make_workflow, trigger, wait_run, client, headers
):
    target.delay_s = 2.0
    wid = make_workflow(
        [
            {
                "id": "slow",
                "action": "http.request",
                "input": {"method": "POST", "url": f"{target.url}/slow"},
            },
            {"id": "after", "action": "transform", "input": {"done": True}},
        ]
    )
    pool = start_pool()
    pool.ready_children(2)
    run = trigger(wid)
    wait_for(lambda: target.requests, 10, "the slow request arrives")
    pool.proc.send_signal(signal.SIGTERM)
    assert pool.proc.wait(timeout=30) == 0

    data = client.get(f"/api/v1/runs/{run['id']}", headers=headers).get_json()["data"]
    slow = data["stepResults"][0]
    assert slow["status"] == "success" and slow["attempt"] == 1, data
    assert slow["output"]["status"] == 200
    if data["status"] != "completed":  # the next step's message went back to the broker
        start_pool().ready_children(2)
    assert wait_run(run["id"], timeout=20)["status"] == "completed"
    assert len(target.requests) == 1  # the finished step never ran again


def test_worker_processes_that_cannot_start_make_the_pool_exit_1(start_pool):
    pool = start_pool(env={"BATON_ACTION_MODULES": "baton_test_no_such_module"})
    assert pool.proc.wait(timeout=60) == 1
    text = pool.text()
    assert "No module named 'baton_test_no_such_module'" in text
    last = text.strip().splitlines()[-1]
    # Both children can fail in one pass of the supervisor: the count is at least the limit.
    gave_up = re.search(
        r"worker processes cannot start: (\d+) failed starts in a row \(the last exited with code 3\)", last
    )
    assert gave_up is not None and int(gave_up.group(1)) >= 5, last
    started = [
        int(line.split("worker process ")[1].split()[0])
        for line in text.splitlines()
        if " started (slot" in line
    ]
    assert started and not [pid for pid in started if alive(pid)]


@pytest.mark.parametrize("command", ["worker", "api", "scheduler"])
def test_without_redis_url_and_no_embedded_redis_the_command_exits_1(command, config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL", "BATON_VAR_DIR")}
    env["DATABASE_URL"] = str(config.database_url)
    result = subprocess.run(
        [BATON, command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no Redis answers on {tmp_path / 'var' / 'redis.sock'}: set REDIS_URL, or start `baton dev`"
    ]
    assert not (tmp_path / "var" / "redis.sock").exists()


@pytest.fixture
def sweeper(pool_services: Any) -> Iterator[Any]:
    """The scheduler's sweeps, sending into this module's namespace."""
    with running_scheduler(pool_services, interval_s=0.2) as instance:
        yield instance


def _logs(client: Any, headers: dict[str, str], run_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/v1/runs/{run_id}/logs", headers=headers).get_json()["data"]["logs"]


def test_leases_recover_a_dead_workers_step_and_spare_a_slow_one(
    drop_queues, start_pool, sweeper, pool_config, pool_services, make_workflow, wait_run, client, headers
):
    """A step that kills its worker fails WORKER_LOST after maxAttempts, within maxAttempts × 45 s
    (default timeoutMs: the heartbeat lease, not the timeout, decides); a 60 s step whose worker
    is alive (timeoutMs 120000) is never taken from it. The two run in separate pools and queues,
    so the dying step cannot take the slow one with it."""
    import tests.e2e.process_actions  # noqa: F401  (the API validates action names)

    modules = {"BATON_ACTION_MODULES": "tests.e2e.process_actions"}
    retry = {"maxAttempts": 2, "initialDelayMs": 0, "maxDelayMs": 0}
    dies = make_workflow([{"id": "die", "action": "test.kill-own-worker", "retry": retry}])
    slow = make_workflow(
        [{"id": "slow", "action": "test.sleep", "input": {"seconds": 60}, "timeoutMs": 120000}]
    )
    slow_config = pool_config.with_overrides(queue_namespace=f"{pool_config.queue_namespace}-slow")
    slow_services = dataclasses.replace(
        pool_services, queue=StepQueue(make_broker(slow_config)), namespace=slow_config.queue_namespace
    )
    slow_pool = start_pool(
        "-p", "1", "-t", "2", env={**modules, "BATON_QUEUE_NAMESPACE": slow_config.queue_namespace}
    )
    drop_queues.append(slow_services.queue)
    pool = start_pool("-p", "2", "-t", "2", env=modules)
    slow_pool.ready_children(1)
    pool.ready_children(2)

    slow_app = create_app(slow_config, slow_services)
    slow_run = slow_app.test_client().post(
        f"/api/v1/workflows/{slow}/runs", json={"input": {}}, headers=headers
    )
    assert slow_run.status_code == 202
    started = time.monotonic()
    dead_run = client.post(f"/api/v1/workflows/{dies}/runs", json={"input": {}}, headers=headers)
    dead = wait_run(dead_run.get_json()["data"]["id"], timeout=2 * 45)
    took = time.monotonic() - started
    print(f"\n[leases] a step that kills its worker, maxAttempts 2: failed WORKER_LOST after {took:.1f} s")
    assert took <= 2 * 45
    assert dead["status"] == "failed"
    assert dead["error"]["code"] == "STEP_ERROR"
    (step,) = dead["stepResults"]
    assert step["status"] == "error" and step["attempt"] == 2
    assert step["error"]["code"] == "WORKER_LOST"
    attempts = _logs(client, headers, dead["id"])
    assert [(a["attempt"], a["error"]["code"]) for a in attempts] == [(1, "WORKER_LOST"), (2, "WORKER_LOST")]
    assert pool.proc.poll() is None  # the pool survived both deaths

    done = wait_run(slow_run.get_json()["data"]["id"], timeout=90)
    assert done["status"] == "completed", done
    assert done["output"] == {"slept": 60}
    assert [(a["attempt"], a["status"]) for a in _logs(client, headers, done["id"])] == [(1, "success")]


def test_a_killed_worker_loses_no_concurrency_slot(
    start_pool, sweeper, pool_services, make_workflow, wait_run, client, headers
):
    """Three runs of one key with limit 1; the first one's worker process is SIGKILLed in its
    step: its lease expires, the step runs again, the run completes and frees its slot, and the
    two waiting runs follow, one at a time, in arrival order. No slot is left held or waiting."""
    import tests.e2e.process_actions  # noqa: F401  (the API validates action names)
    from models import Run

    retry = {"maxAttempts": 2, "initialDelayMs": 0, "maxDelayMs": 0}
    wid = make_workflow(
        [
            {
                "id": "work",
                "action": "test.kill-first-attempt",
                "input": {"kill": "{{ input.kill }}"},
                "retry": retry,
            }
        ],
        concurrency={"key": "{{ input.customerId }}", "limit": 1},
    )
    pool = start_pool("-p", "2", "-t", "2", env={"BATON_ACTION_MODULES": "tests.e2e.process_actions"})
    pool.ready_children(2)
    ids = []
    for kill in (True, False, False):
        body = {"input": {"customerId": "same", "kill": kill}}
        response = client.post(f"/api/v1/workflows/{wid}/runs", json=body, headers=headers)
        assert response.status_code == 202
        ids.append(response.get_json()["data"]["id"])
    runs = [wait_run(run_id, timeout=90) for run_id in ids]
    assert [r["status"] for r in runs] == ["completed"] * 3, runs
    assert [r["stepResults"][0]["attempt"] for r in runs] == [2, 1, 1], "the first run's worker died once"
    assert "was killed by SIGKILL" in pool.text()
    starts = [r["stepResults"][0]["startedAt"] for r in runs]
    ends = [r["stepResults"][0]["completedAt"] for r in runs]
    assert starts[1] >= ends[0] and starts[2] >= ends[1], "one at a time, in arrival order"
    with pool_services.db.session() as session:
        left = session.query(Run).filter(Run.id.in_(ids), Run.slot.is_not(None)).count()
    assert left == 0
