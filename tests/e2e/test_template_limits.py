"""Template limits and the JSON nesting limit over HTTP, in a real worker and in a gunicorn process."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from app.config import Config
from tests.conftest import new_key, wait_for

POWER = "{{ 7 ** 60000000 }}"
FOLDS_TO_100_MB = ["{{ 'a' * 100000000 }}", "{{ 'a' * 10 ** 8 }}"]
SECRET = "s3cr3t-for-depth"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def deep_text(depth: int) -> bytes:
    """JSON nested ``depth`` deep, written out directly (json.dumps itself recurses)."""
    return b"[" * depth + b"1" + b"]" * depth


def assert_validation_error(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.get_data()[:300]
    body = response.get_json()
    assert body["success"] is False and body["error"]["code"] == "VALIDATION_ERROR"
    return body["error"]


# --------------------------------------------------------------------------- definitions


def test_a_power_in_a_definition_is_a_400_naming_the_field_in_under_100_ms(client, headers):
    definition = {"name": "t", "steps": [{"id": "a", "action": "transform", "input": {"n": POWER}}]}
    client.post("/api/v1/workflows", json={"name": "warm", "steps": []}, headers=headers)
    started = time.perf_counter()
    response = client.post("/api/v1/workflows", json=definition, headers=headers)
    took = time.perf_counter() - started
    error = assert_validation_error(response)
    assert "steps.0.input.n" in error["details"] and "limit" in error["details"]["steps.0.input.n"][0]
    assert took < 0.1, f"{took * 1000:.0f} ms"


@pytest.mark.parametrize("source", FOLDS_TO_100_MB)
def test_a_100_mb_fold_in_a_definition_is_a_400(client, headers, source):
    definition = {"name": "t", "steps": [{"id": "a", "action": "transform"}], "output": {"x": source}}
    error = assert_validation_error(client.post("/api/v1/workflows", json=definition, headers=headers))
    assert "output.x" in error["details"]


# --------------------------------------------------------------------------- run time


@pytest.mark.parametrize(
    "source",
    [
        "{{ 7 ** input.e }}",
        "{{ 'a' * input.e }}",
        "{% for i in range(input.r) %}{% for j in range(input.r) %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(input.m) }}",
    ],
)
def test_a_hostile_template_at_run_time_is_a_template_error_within_the_timeout(
    worker, make_workflow, trigger, wait_run, source
):
    step = {"id": "boom", "action": "transform", "input": {"x": source}, "timeoutMs": 2000}
    wid = make_workflow([step])
    started = time.monotonic()
    run = wait_run(trigger(wid, {"e": 60000000, "r": 100000, "m": 60})["id"], timeout=20)
    took = time.monotonic() - started
    assert run["status"] == "failed"
    error = run["stepResults"][0]["error"]
    assert error["code"] == "TEMPLATE_ERROR", error
    assert run["stepResults"][0]["durationMs"] < 2000
    assert took < 10


def test_other_runs_are_unaffected_by_a_hostile_template(worker, make_workflow, trigger, wait_run):
    hostile = make_workflow(
        [{"id": "boom", "action": "transform", "input": {"x": "{{ 7 ** input.e }}"}, "timeoutMs": 2000}]
    )
    plain = make_workflow([{"id": "ok", "action": "transform", "input": {"y": "{{ input.y }}"}}])
    hostile_runs = [trigger(hostile, {"e": 60000000})["id"] for _ in range(4)]
    started = time.monotonic()
    done = wait_run(trigger(plain, {"y": 1})["id"], timeout=20)
    assert done["status"] == "completed" and done["output"] == {"y": 1}
    assert time.monotonic() - started < 2
    for run_id in hostile_runs:
        assert wait_run(run_id)["stepResults"][0]["error"]["code"] == "TEMPLATE_ERROR"


# --------------------------------------------------------------------------- JSON nesting


def test_the_depth_limit_is_configurable():
    assert Config.from_env({}).json_max_depth == 64
    assert Config.from_env({"BATON_JSON_MAX_DEPTH": "8"}).json_max_depth == 8


@pytest.mark.parametrize("depth", [65, 990, 200_000])
def test_a_deep_workflow_body_is_a_400(client, headers, depth):
    body = b'{"name": "t", "steps": [], "x": ' + deep_text(depth) + b"}"
    response = client.post(
        "/api/v1/workflows", data=body, headers={**headers, "content-type": "application/json"}
    )
    assert "nested deeper than 64" in assert_validation_error(response)["message"]


def test_a_body_at_the_limit_is_parsed(client, headers):
    # The body, "steps", the step and its "input" are four levels; 60 lists make 64.
    response = client.post(
        "/api/v1/workflows",
        json={"name": "t", "steps": [{"id": "a", "action": "transform", "input": {"x": nested(60)}}]},
        headers=headers,
    )
    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize("depth", [65, 990])
def test_a_deep_run_input_is_a_400(client, headers, make_workflow, depth):
    wid = make_workflow([{"id": "a", "action": "transform"}])
    body = b'{"input": ' + deep_text(depth) + b"}"
    response = client.post(
        f"/api/v1/workflows/{wid}/runs", data=body, headers={**headers, "content-type": "application/json"}
    )
    assert_validation_error(response)
    shallow = client.post(f"/api/v1/workflows/{wid}/runs", json={"input": {"x": nested(60)}}, headers=headers)
    assert shallow.status_code == 202


@pytest.mark.parametrize("depth", [65, 990, 200_000])
def test_a_deep_webhook_body_is_a_400(client, make_workflow, depth):
    wid = make_workflow(
        [{"id": "a", "action": "transform"}],
        triggers={"webhook": {"scheme": "hmac-sha256", "secret": SECRET, "header": "X-Sig"}},
    )
    body = deep_text(depth)
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    for sent in ({"X-Sig": signature}, {}):
        response = client.post(
            f"/api/v1/webhooks/{wid}", data=body, headers={**sent, "content-type": "application/json"}
        )
        assert_validation_error(response)


def test_a_deep_webhook_body_is_the_same_400_for_a_workflow_that_does_not_exist(client, make_workflow):
    wid = make_workflow([{"id": "a", "action": "transform"}])  # no webhook trigger
    answers = []
    for path in (f"/api/v1/webhooks/{wid}", "/api/v1/webhooks/wf_no-such-workflow", "/api/v1/webhooks/x"):
        response = client.post(path, data=deep_text(990), headers={"content-type": "application/json"})
        answers.append((response.status_code, response.get_json()["error"]))
    assert answers[0][0] == 400 and answers.count(answers[0]) == 3, answers


def test_deep_text_bodies_are_never_a_500(client, headers, make_workflow):
    wid = make_workflow([{"id": "a", "action": "transform"}])
    for path in ("/api/v1/workflows", f"/api/v1/workflows/{wid}/runs", f"/api/v1/webhooks/{wid}"):
        for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 990 + b"]" * 989):
            response = client.post(path, data=body, headers={**headers, "content-type": "application/json"})
            assert response.status_code < 500, (path, response.get_data()[:200])
            assert response.get_json()["success"] is False


# --------------------------------------------------------------------------- a real gunicorn process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.fixture
def gunicorn_api(config: Config, services: Any) -> Iterator[tuple[str, int]]:
    """``gunicorn app.wsgi:app`` with one worker on a free loopback port: (base URL, worker pid)."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": config.database_url or "",
        "REDIS_URL": config.redis_url or "",
        "BATON_QUEUE_NAMESPACE": config.queue_namespace,
        "BATON_RATE_LIMIT": "1000000/minute",
        "BATON_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "gunicorn", "app.wsgi:app", "--bind", f"127.0.0.1:{port}"]
    command += ["--workers", "1", "--threads", "4", "--timeout", "60", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return requests.get(f"{base}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(lambda: ready() or process.poll() is not None, timeout=30, what="gunicorn")
        assert process.poll() is None, "gunicorn exited"
        yield base, wait_for(lambda: _children(process.pid), timeout=10, what="a gunicorn worker")[0]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _define(base: str, key: str, source: str) -> tuple[requests.Response, float]:
    definition = {"name": "t", "steps": [{"id": "a", "action": "transform", "input": {"x": source}}]}
    started = time.perf_counter()
    response = requests.post(
        f"{base}/api/v1/workflows", json=definition, headers={"x-api-key": key}, timeout=60
    )
    return response, time.perf_counter() - started


def test_gunicorn_answers_hostile_definitions_quickly_and_keeps_its_memory(gunicorn_api, services, capsys):
    base, worker_pid = gunicorn_api
    key = new_key(services)
    # Warm up: every code path taken once, so the baseline is the steady state.
    for source in [POWER, *FOLDS_TO_100_MB, "{{ input.x }}"]:
        _define(base, key, source)
    before = _rss_kib(worker_pid)

    timings = []
    for _ in range(3):
        response, took = _define(base, key, POWER)
        assert response.status_code == 400 and response.json()["error"]["code"] == "VALIDATION_ERROR"
        timings.append(took)

    # Other requests while hostile definitions arrive: they are answered promptly.
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            _define(base, key, POWER)

    attackers = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in attackers:
        thread.start()
    try:
        other = []
        for _ in range(10):
            started = time.perf_counter()
            listed = requests.get(f"{base}/api/v1/workflows", headers={"x-api-key": key}, timeout=10)
            other.append(time.perf_counter() - started)
            assert listed.status_code == 200
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=30)

    for source in FOLDS_TO_100_MB * 4:  # 8 requests that would each fold to 100 MB
        response, _ = _define(base, key, source)
        assert response.status_code == 400, response.text[:300]
    after = _rss_kib(worker_pid)
    with capsys.disabled():
        print(
            f"\n[template limits] 7**60000000 definition: {[round(t * 1000, 1) for t in timings]} ms; "
            f"GET /workflows during attack: max {max(other) * 1000:.1f} ms; "
            f"worker RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB after 8 x 100 MB folds"
        )
    assert max(timings) < 0.1
    assert max(other) < 1.0
    assert after - before < 50 * 1024


def test_json_dumps_of_the_helper_is_not_needed():
    """``deep_text`` is what the tests send: check it is the JSON it claims to be (at a parseable depth)."""
    assert json.loads(deep_text(50)) == nested(50)
