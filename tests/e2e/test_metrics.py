"""``GET /metrics`` with real worker and scheduler processes, its token guard, and JSON logs.

Runs go to a Redis namespace of this module's own, executed by ``baton worker`` and swept by
``baton scheduler`` started as subprocesses (stopped by PID): every step attempt and sweep counted
below happened in another process, so the API's ``/metrics`` can only know of them through the
snapshots those processes share.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text, update

import tests.e2e.metrics_actions  # noqa: F401  (the API validates workflows that use them)
from app import keys, logs
from app.config import Config
from app.db import Database
from app.factory import create_app
from app.migrate import upgrade
from app.queue import StepQueue, make_broker
from app.timeutil import utcnow
from models import StepRun
from tests.conftest import SCHEMA, new_key, session_env, wait_for

BATON = str(Path(sys.executable).with_name("baton"))
ACTIONS = "tests.e2e.metrics_actions"
SECRET = f"tok-{uuid.uuid4().hex}"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


MODULE_SCHEMA = f"{SCHEMA}_metrics"


@pytest.fixture(scope="module")
def module_config(config: Config) -> Config:
    """A schema and a namespace of this module's own: the scheduler started here sweeps only the
    runs made here (the session's schema holds other tests' queued steps, which it would re-send)."""
    return config.with_overrides(
        database_url=str(config.database_url).replace(SCHEMA, MODULE_SCHEMA),
        queue_namespace=f"{config.queue_namespace}-metrics",
    )


@pytest.fixture(scope="module")
def module_services(module_config: Config, services: Any) -> Iterator[Any]:
    db = Database(module_config, pool_size=5)
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {MODULE_SCHEMA}"))
    upgrade(db)
    broker = make_broker(module_config)
    svc = dataclasses.replace(
        services,
        db=db,
        queue=StepQueue(broker),
        namespace=module_config.queue_namespace,
        config=module_config,
    )
    # Not a fresh Redis: a scheduler re-sends every queued step when it finds no epoch.
    services.redis.set(svc.key("epoch"), "set-by-test")
    yield svc
    for key in services.redis.scan_iter(f"{module_config.queue_namespace}:*"):
        services.redis.delete(key)
    broker.close()
    db.dispose()
    with services.db.engine.begin() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": MODULE_SCHEMA},
        )
        conn.execute(text(f"DROP SCHEMA IF EXISTS {MODULE_SCHEMA} CASCADE"))


@pytest.fixture
def api_key(module_services: Any) -> str:
    return new_key(module_services)


@pytest.fixture(scope="module")
def app(module_config: Config, module_services: Any) -> Any:
    flask_app = create_app(module_config, module_services)
    flask_app.testing = True
    return flask_app


def scrape(client: Any) -> tuple[Samples, dict[str, str]]:
    """The exposition parsed by prometheus-client's own parser: samples and each family's type."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclasses.dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start(module_config: Config, tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start ``baton <args>`` against this module's namespace, JSON logs; SIGTERM'd at the end."""
    started: list[Process] = []

    def run(*args: str) -> Process:
        env = session_env(module_config)  # the session's broker (RabbitMQ in CI's second pass)
        env.update(
            DATABASE_URL=str(module_config.database_url),
            REDIS_URL=str(module_config.redis_url),
            BATON_QUEUE_NAMESPACE=module_config.queue_namespace,
            BATON_ACTION_MODULES=ACTIONS,
            BATON_LOG_FORMAT="json",
            BATON_LOG_LEVEL="INFO",
        )
        log = tmp_path / f"{args[0]}-{len(started)}.log"
        # Appending: gunicorn reopens /dev/stderr for its access log, and both must add, not overwrite.
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [BATON, *args], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        started.append(Process(proc, log))
        return started[-1]

    yield run
    for process in started:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGTERM)
            try:
                process.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait()


def _workflow(make_workflow: Callable[..., str]) -> str:
    return make_workflow(
        [
            {
                "id": "flaky",
                "action": "test.metrics-flaky",
                "retry": {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 10, "maxDelayMs": 10},
            },
            {"id": "breaks", "action": "test.metrics-fail", "if": "{{ input.fail }}"},
        ]
    )


def test_worker_and_scheduler_processes_series_reach_the_api(
    start, make_workflow, trigger, wait_run, client, headers, module_services
):
    workers = start("worker", "-p", "2", "-t", "2")
    scheduler = start("scheduler")
    # Ready before the runs: a step claimed after its run's deadline ends the run at the claim.
    wait_for(lambda: workers.text().count("ready after") == 2, 60, f"workers ready\n{workers.text()}")
    wait_for(lambda: "is the leader" in scheduler.text(), 60, f"scheduler leads\n{scheduler.text()}")
    wid = _workflow(make_workflow)
    # Its deadline passes while the step runs, so the scheduler's sweep (not a claim) times it out.
    slow = make_workflow(
        [{"id": "nap", "action": "test.metrics-sleep", "input": {"seconds": 8}}], timeoutMs=4000
    )
    before, _ = scrape(client)

    runs = [trigger(wid, {"fail": i % 3 == 0}) for i in range(6)]  # 2 fail, 4 complete
    timed_out = trigger(slow)
    statuses = [wait_run(r["id"], timeout=60)["status"] for r in runs]
    assert sorted(statuses) == ["completed"] * 4 + ["failed"] * 2, workers.text()[-3000:]
    assert wait_run(timed_out["id"], timeout=60)["status"] == "timeout"

    expected = {
        ("baton_runs_started_total", (("workflow_id", wid),)): 6,
        ("baton_runs_finished_total", (("status", "completed"), ("workflow_id", wid))): 4,
        ("baton_runs_finished_total", (("status", "failed"), ("workflow_id", wid))): 2,
        ("baton_runs_finished_total", (("status", "timeout"), ("workflow_id", slow))): 1,
        ("baton_step_attempts_total", (("action", "test.metrics-flaky"), ("outcome", "retry"))): 6,
        ("baton_step_attempts_total", (("action", "test.metrics-flaky"), ("outcome", "success"))): 6,
        ("baton_step_attempts_total", (("action", "test.metrics-fail"), ("outcome", "error"))): 2,
        ("baton_step_attempts_total", (("action", "test.metrics-fail"), ("outcome", "skipped"))): 4,
        ("baton_step_duration_seconds_count", (("action", "test.metrics-flaky"),)): 12,
    }

    def deltas() -> dict[Any, float]:
        now, _ = scrape(client)
        return {key: now.get(key, 0.0) - before.get(key, 0.0) for key in expected}

    # The worker processes publish every 2 s; the attempts were counted there, not in this process.
    wait_for(lambda: deltas() == expected, 20, f"the workers' counts\n{deltas()}")
    after, types = scrape(client)
    assert value(after, "baton_sweeper_recoveries_total", kind="run_timeout") >= 1  # the scheduler's
    assert types["baton_step_duration_seconds"] == "histogram"
    assert types["baton_runs_finished"] == "counter"
    assert {"baton_queue_depth", "baton_queue_oldest_age_seconds"} <= set(types)
    # Two worker processes and the scheduler, each with its own snapshot.
    assert module_services.redis.zcard(module_services.key("metrics", "live")) >= 3

    # A graceful stop folds the workers' counts into the retired totals: nothing goes backwards.
    workers.proc.send_signal(signal.SIGTERM)
    scheduler.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=40) == 0 and scheduler.proc.wait(timeout=40) == 0
    assert module_services.redis.zcard(module_services.key("metrics", "live")) <= 1  # this process
    assert deltas() == expected


def test_worker_logs_are_json_lines_with_the_step_context_and_no_secret(
    start, make_workflow, trigger, wait_run, client, headers, module_services
):
    response = client.put("/api/v1/secrets/METRICS_TOKEN", json={"value": SECRET}, headers=headers)
    assert response.status_code == 200, response.get_json()
    wid = make_workflow(
        [{"id": "crashes", "action": "test.metrics-crash", "input": {"token": "{{ secrets.METRICS_TOKEN }}"}}]
    )
    workers = start("worker", "-p", "1", "-t", "2")
    wait_for(lambda: "ready after" in workers.text(), 60, f"worker ready\n{workers.text()}")
    run = trigger(wid)
    done = wait_run(run["id"], timeout=60)
    assert done["status"] == "failed"

    def crash_line() -> dict[str, Any] | None:
        for line in workers.text().splitlines():
            if run["id"] in line:
                return json.loads(line)
        return None

    entry = wait_for(crash_line, 10, "the crash's log line")
    with module_services.db.session() as session:
        company_id = keys.authenticate(session, headers["x-api-key"]).company_id
    assert entry["run_id"] == run["id"] and entry["step_id"] == "crashes" and entry["attempt"] == 1
    assert entry["company_id"] == company_id
    assert entry["level"] == "ERROR" and entry["logger"] == "baton.worker"
    assert "[REDACTED]" in entry["exc_info"]
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(timeout=40) == 0
    lines = [line for line in workers.text().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line, supervisor's and children's, is JSON
    assert all({"ts", "level", "logger", "message"} <= set(p) for p in parsed)
    assert all(p["ts"].endswith("Z") and len(p["ts"]) == len("2024-01-15T10:30:00.000Z") for p in parsed)
    assert SECRET not in workers.text()


def test_metrics_token_guard(module_config, module_services):
    guarded = create_app(module_config.with_overrides(metrics_token="s3cret-token"), module_services)
    client = guarded.test_client()
    for given in (None, "Bearer wrong", "Basic s3cret-token", "s3cret-token"):
        response = client.get("/metrics", headers={"Authorization": given} if given else {})
        assert response.status_code == 401
        assert response.get_json() == {
            "success": False,
            "error": {"code": "UNAUTHORIZED", "message": "Missing or invalid metrics token"},
        }
    response = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert response.status_code == 200
    assert "baton_queue_depth" in response.get_data(as_text=True)


def test_latency_route_label_is_the_url_rule_not_the_path(client, headers):
    rule = "/api/v1/runs/<string:run_id>"
    run_id = f"run_{uuid.uuid4().hex}"
    before, _ = scrape(client)
    assert client.get(f"/api/v1/runs/{run_id}", headers=headers).status_code == 404
    assert client.get(f"/no/such/{run_id}").status_code == 404
    samples, types = scrape(client)
    assert types["baton_http_request_duration_seconds"] == "histogram"
    routes = {dict(labels).get("route") for (name, labels) in samples if name.startswith("baton_http_")}
    assert not [route for route in routes if route and run_id in route]
    name = "baton_http_request_duration_seconds_count"
    for route, status in ((rule, "404"), ("unmatched", "404")):
        labels = {"route": route, "method": "GET", "status": status}
        assert value(samples, name, **labels) - value(before, name, **labels) == 1, routes


def test_queue_gauges_come_from_the_database(make_workflow, trigger, client, headers, module_services):
    wid = make_workflow([{"id": "a", "action": "transform", "input": {}}])
    run = trigger(wid)  # no worker consumes this module's namespace now: its step stays queued
    with module_services.db.session() as session:
        session.execute(
            update(StepRun)
            .where(StepRun.run_id == run["id"])
            .values(queued_at=utcnow() - timedelta(seconds=300))
        )
        session.commit()
    samples, _ = scrape(client)
    assert value(samples, "baton_queue_depth") >= 1
    assert value(samples, "baton_queue_oldest_age_seconds") >= 300
    assert client.post(f"/api/v1/runs/{run['id']}/cancel", headers=headers).status_code == 200


def test_api_requests_log_with_their_company_and_run(app, headers, module_services):
    with module_services.db.session() as session:
        company_id = keys.authenticate(session, headers["x-api-key"]).company_id
    with app.test_request_context("/api/v1/runs/run_ctx", headers=headers):
        app.preprocess_request()
        assert logs.current() == {"run_id": "run_ctx", "company_id": company_id}
    assert logs.current() == {}  # the request ended: the thread that served it logs without it
    token = logs.bind(company_id="co_left_behind")
    with app.test_request_context("/healthz"):  # even a leftover never reaches another request
        app.preprocess_request()
        assert logs.current() == {}
    logs.reset(token)


def test_every_gunicorn_worker_is_counted_and_retired_on_stop(start, client, module_services):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    readyz = {"route": "/readyz", "method": "GET", "status": "200"}  # only the load below asks it
    name = "baton_http_request_duration_seconds_count"
    before, _ = scrape(client)
    api = start("api", "--port", str(port), "--workers", "2")
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(answers, 60, f"the API answers\n{api.text()}")
    with ThreadPoolExecutor(8) as pool:  # concurrent connections, so both gunicorn workers serve
        codes = list(pool.map(lambda _: requests.get(f"{base}/readyz", timeout=30).status_code, range(40)))
    assert codes == [200] * 40

    def counted() -> float:
        text = requests.get(f"{base}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == readyz:
                    return sample.value
        return 0.0

    # Whichever worker answers the scrape, it shows the other's requests too (2 s snapshots).
    wait_for(lambda: counted() == 40, 20, f"both workers' requests: {counted()}\n{api.text()[-2000:]}")
    pids = {
        m.split(b":")[1] for m in module_services.redis.zrange(module_services.key("metrics", "live"), 0, -1)
    }
    print(f"processes with a live snapshot while the API ran: {len(pids)}")
    api.proc.send_signal(signal.SIGTERM)
    assert api.proc.wait(timeout=40) == 0
    # Stopped, the workers' counts are in the retired totals: this process still reports them.
    after, _ = scrape(client)
    assert value(after, name, **readyz) - value(before, name, **readyz) == 40, pids
    not_json = [line for line in api.text().splitlines() if line.strip() and not line.startswith("{")]
    assert not not_json, not_json
    assert all(json.loads(line)["logger"] for line in api.text().splitlines() if line.strip())
