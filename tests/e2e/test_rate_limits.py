"""Fairness: per-key request limits (429 + Retry-After, fail open), webhook limits per workflow,
per-company step slots, and the schedule caps."""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime
from typing import Any

from app import slots
from app.factory import create_app
from app.services import Services
from tests.conftest import assert_rate_limited, new_key, wait_for

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def _app(config: Any, services: Services, **overrides: Any) -> Any:
    """An API whose config (and its services' config, which the routes read) has ``overrides``."""
    changed = config.with_overrides(**overrides)
    app = create_app(changed, dataclasses.replace(services, config=changed))
    app.testing = True
    return app.test_client()


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_over_the_limit_is_429_with_retry_after_per_key(config, services):
    client = _app(config, services, rate_limit="3/day")
    mine, theirs = {"x-api-key": new_key(services)}, {"x-api-key": new_key(services)}
    for _ in range(3):
        assert client.get("/api/v1/workflows", headers=mine).status_code == 200
    refused = client.get("/api/v1/workflows", headers=mine)
    assert_rate_limited(refused)
    assert client.get("/api/v1/workflows", headers=theirs).status_code == 200, "limits are per key"
    for path in ("/healthz", "/readyz", "/api/v1/openapi.json"):
        for _ in range(5):
            assert client.get(path).status_code == 200, f"{path} is never limited"


def test_requests_without_a_key_are_limited_by_address(config, services):
    client = _app(config, services, rate_limit="2/day")
    here = {"REMOTE_ADDR": "10.9.8.7"}
    seen = [client.get("/api/v1/runs", environ_base=here).status_code for _ in range(3)]
    assert seen == [401, 401, 429]
    other = client.get("/api/v1/runs", environ_base={"REMOTE_ADDR": "10.9.8.6"})
    assert other.status_code == 401


def test_the_limiter_fails_open_when_redis_is_down(config, services, caplog):
    client = _app(config, services, rate_limit="1/day", redis_url=DEAD_REDIS)
    key = {"x-api-key": new_key(services)}
    with caplog.at_level(logging.WARNING, logger="baton.ratelimit"):
        statuses = [client.get("/api/v1/workflows", headers=key).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert any("not enforced" in r.getMessage() for r in caplog.records)


def _hook_workflow(client, headers) -> str:
    body = {
        "name": "hooked",
        "steps": [{"id": "echo", "action": "transform", "input": {"got": "{{ input }}"}}],
        "triggers": {"webhook": {"scheme": "hmac-sha256", "secret": "a-long-enough-secret"}},
    }
    response = client.post("/api/v1/workflows", json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["data"]["id"]


def test_webhook_deliveries_are_limited_per_workflow(config, services, headers):
    client = _app(config, services, webhook_rate_limit="2/day")
    first, second = _hook_workflow(client, headers), _hook_workflow(client, headers)
    seen = [client.post(f"/api/v1/webhooks/{first}", json={"n": i}).status_code for i in range(3)]
    assert seen == [401, 401, 429]
    refused = client.post(f"/api/v1/webhooks/{first}", json={})
    assert refused.get_json()["error"]["code"] == "RATE_LIMITED" and "Retry-After" in refused.headers
    assert client.post(f"/api/v1/webhooks/{second}", json={}).status_code == 401, "per workflow"


def test_unsigned_deliveries_are_counted_not_each_logged(client, headers):
    wid = _hook_workflow(client, headers)
    for i in range(40):
        assert client.post(f"/api/v1/webhooks/{wid}", json={"n": i}).status_code == 401
    log = client.get(f"/api/v1/workflows/{wid}/deliveries?limit=100", headers=headers).get_json()["data"]
    assert 1 <= len(log) <= 12, f"{len(log)} rows for 40 unsigned deliveries"
    summary = [d for d in log if "counted" in (d["reason"] or "")]
    assert len(summary) == 1 and summary[0]["verified"] is False
    assert summary[0]["reason"].startswith("at least 16 more"), summary[0]["reason"]


AUTO_CAP = 6  # the default ("auto"): 3/4 of the test worker's 8 threads


def _concurrency(arrivals: list[float], hold_s: float) -> int:
    """Most requests in flight at once at the target (each held hold_s)."""
    return max(sum(1 for b in arrivals if a <= b < a + hold_s * 0.95) for a in arrivals)


def test_a_busy_company_leaves_room_for_another(
    worker, services, client, headers, make_workflow, trigger, target, wait_run
):
    """40 slow runs of one company: another company's 1-step run still completes within 1 s, with
    the default configuration (the per-company cap is "auto")."""
    assert services.config.company_max_concurrent_steps == slots.AUTO
    target.delay_s = 2.0
    slow = make_workflow(
        [{"id": "slow", "action": "http.request", "input": {"method": "GET", "url": target.url}}]
    )
    runs = [trigger(slow)["id"] for _ in range(40)]
    other = {"x-api-key": new_key(services)}
    body = {"name": "quick", "steps": [{"id": "t", "action": "transform", "input": {"ok": True}}]}
    quick = client.post("/api/v1/workflows", json=body, headers=other).get_json()["data"]["id"]
    try:
        deadline = time.monotonic() + 10
        while len(target.requests) < AUTO_CAP and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(target.requests) >= AUTO_CAP, "the busy company's steps started"
        sent = time.monotonic()
        response = client.post(f"/api/v1/workflows/{quick}/runs", json={"input": {}}, headers=other)
        assert response.status_code == 202
        run_id = response.get_json()["data"]["id"]
        done = _wait(client, other, run_id)
        took = time.monotonic() - sent
        print(f"another company's 1-step run: {took * 1000:.0f} ms behind 40 slow runs (cap {AUTO_CAP})")
        assert done["status"] == "completed", done
        assert took < 1.0 and (_at(done["completedAt"]) - _at(done["createdAt"])).total_seconds() < 1.0
        # The busy company keeps working (a second wave starts as slots free), never past its cap.
        wait_for(lambda: len(target.requests) > 2 * AUTO_CAP, timeout=10, what="a second wave")
        assert _concurrency([r["at"] for r in target.requests], target.delay_s) <= AUTO_CAP
    finally:
        for run_id in runs:
            client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
        target.delay_s = 0
        for run_id in runs:
            wait_run(run_id, timeout=30)


def _wait(client: Any, headers: dict[str, str], run_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()["data"]
        if data["status"] in ("completed", "failed", "cancelled", "timeout") or time.monotonic() > deadline:
            return data
        time.sleep(0.01)


def _scheduled(client: Any, headers: dict[str, str], cron: str, workflow_id: str | None = None) -> Any:
    body = {
        "name": "scheduled",
        "steps": [{"id": "t", "action": "transform", "input": {}}],
        "triggers": {"schedule": {"cron": cron}},
    }
    if workflow_id is None:
        return client.post("/api/v1/workflows", json=body, headers=headers)
    return client.put(f"/api/v1/workflows/{workflow_id}", json=body, headers=headers)


def _refused_on_cron(response: Any) -> str:
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and list(error["details"]) == ["triggers.schedule.cron"]
    return error["details"]["triggers.schedule.cron"][0]


def test_a_cron_firing_more_often_than_the_minimum_is_refused(config, services):
    client = _app(config, services, schedule_min_interval_s=60)
    key = {"x-api-key": new_key(services)}
    assert "minimum interval is 60 s" in _refused_on_cron(_scheduled(client, key, "* * * * * *"))
    assert "fires every 30 s" in _refused_on_cron(_scheduled(client, key, "*/30 * * * * *"))
    # Bursts count too: every second, but only during 09:00–09:00:59.
    _refused_on_cron(_scheduled(client, key, "* 0 9 * * *"))
    ok = _scheduled(client, key, "* * * * *")
    assert ok.status_code == 201, ok.get_json()
    wid = ok.get_json()["data"]["id"]
    _refused_on_cron(_scheduled(client, key, "*/5 * * * * *", wid))
    assert _scheduled(client, key, "0 9 * * 1-5", wid).status_code == 200


def test_a_company_keeps_at_most_its_cap_of_schedules(config, services):
    client = _app(config, services, max_schedules_per_company=2)
    key, other = {"x-api-key": new_key(services)}, {"x-api-key": new_key(services)}
    first, _ = (_scheduled(client, key, "0 * * * *").get_json()["data"]["id"] for _ in range(2))
    assert "at most 2 schedules" in _refused_on_cron(_scheduled(client, key, "0 * * * *"))
    assert _scheduled(client, key, "30 * * * *", first).status_code == 200, "its own schedule aside"
    assert _scheduled(client, other, "0 * * * *").status_code == 201, "per company"
    assert client.delete(f"/api/v1/workflows/{first}", headers=key).status_code == 200
    assert _scheduled(client, key, "0 * * * *").status_code == 201, "a deleted workflow's schedule is gone"
