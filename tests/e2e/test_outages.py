"""The API through a database or Redis outage: 503 in the envelope, never a 500; triggers still
accepted while Redis is down and sent once it is back."""

from __future__ import annotations

from typing import Any

import pytest

from app.db import Database
from app.engine import sweep
from app.factory import create_app
from app.queue import StepQueue, make_broker, make_redis
from app.services import Services
from tests.conftest import unreachable

DEAD_PG = "postgresql+psycopg://root@127.0.0.1:1/test?connect_timeout=2"


@pytest.fixture
def app_without_database(config: Any, services: Services) -> Any:
    dead = config.with_overrides(database_url=DEAD_PG)
    broken = Services(
        db=Database(dead), redis=services.redis, queue=services.queue, namespace=services.namespace
    )
    app = create_app(dead, broken)
    yield app
    broken.db.dispose()


@pytest.fixture
def app_without_redis(config: Any, services: Services) -> Any:
    dead = unreachable(config)  # Redis, and the broker when that is RabbitMQ
    broken = Services(
        db=services.db,
        redis=make_redis(dead),
        queue=StepQueue(make_broker(dead)),
        namespace=services.namespace,
    )
    return create_app(config, broken)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/api/v1/runs"),
        ("GET", "/api/v1/runs/run_0190f0a0-0000-7000-8000-000000000000"),
        ("POST", "/api/v1/workflows/wf_x/runs"),
        ("GET", "/api/v1/workflows"),
    ],
)
def test_database_down_is_503_in_the_envelope(app_without_database, headers, method, path):
    response = app_without_database.test_client().open(
        path, method=method, json={"input": {}}, headers=headers
    )
    assert response.status_code == 503
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "Traceback" not in body["error"]["message"]
    assert response.headers["Retry-After"] == "2"


def test_readyz_reports_the_database_down(app_without_database):
    response = app_without_database.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"].startswith("error")


def test_redis_down_trigger_is_accepted_and_sent_when_it_returns(
    worker, app_without_redis, services, headers, make_workflow, wait_run
):
    wid = make_workflow([{"id": "a", "action": "transform", "input": {"ok": True}}])
    response = app_without_redis.test_client().post(
        f"/api/v1/workflows/{wid}/runs", json={"input": {}}, headers=headers
    )
    assert response.status_code == 202, response.get_json()
    run_id = response.get_json()["data"]["id"]
    # Redis is back (the real one): the first sweep sends the message the trigger could not.
    counts = sweep(services)
    assert counts["requeued"] + counts["resent"] >= 1
    done = wait_run(run_id)
    assert done["status"] == "completed"
    assert done["output"] == {"ok": True}


def test_redis_down_cancel_still_cancels(app_without_redis, headers, make_workflow):
    wid = make_workflow([{"id": "a", "action": "delay", "input": {"durationMs": 60000}}])
    client = app_without_redis.test_client()
    run_id = client.post(f"/api/v1/workflows/{wid}/runs", json={"input": {}}, headers=headers).get_json()[
        "data"
    ]["id"]
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers={**headers, "Idempotency-Key": "k1"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["data"]["status"] == "cancelled"
