"""``POST /api/v1/workflows/:id/runs`` answered before Flask (api/trigger_route.py): the same bytes
as the Flask view, every refusal still Flask's own, the rate limit, idempotency, metrics and key
revocation unchanged."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import Client

from api.trigger_route import TriggerRoute
from app import keys
from app.factory import create_app
from app.keys import RUNS_READ, RUNS_WRITE
from app.services import Services
from tests.conftest import after_revoking, assert_rate_limited, baton_api, new_key

STEPS = [{"id": "a", "action": "transform", "input": {}}]


def _flask_only(app: Any) -> Client:
    """A client of the same app without the trigger layer in front: what Flask alone answers."""
    layer = app.wsgi_app
    assert isinstance(layer, TriggerRoute)
    return Client(layer.flask_app)


def _as_other_run(body: bytes, run: dict[str, Any]) -> bytes:
    """``body`` with its run id and creation time replaced by ``run``'s."""
    data = json.loads(body)["data"]
    return body.replace(data["id"].encode(), run["id"].encode()).replace(
        data["createdAt"].encode(), run["createdAt"].encode()
    )


def test_the_answer_is_the_flask_views_byte_for_byte(app, client, headers, make_workflow):
    wid = make_workflow(STEPS)
    flask_only = _flask_only(app)
    for body in (
        {"input": {"a": [1, 2, {"b": "é\u2028"}], "n": None}},
        {"input": {}, "triggerType": "manual"},
        {},
    ):
        fast = client.post(f"/api/v1/workflows/{wid}/runs", json=body, headers=headers)
        slow = flask_only.post(f"/api/v1/workflows/{wid}/runs", json=body, headers=headers)
        assert (fast.status_code, slow.status_code) == (202, 202)
        assert fast.status == slow.status == "202 ACCEPTED"
        assert fast.headers["Content-Type"] == slow.headers["Content-Type"] == "application/json"
        assert fast.headers["Content-Length"] == str(len(fast.data))
        assert fast.data == _as_other_run(slow.data, fast.get_json()["data"])
        assert fast.get_json()["data"]["id"] != slow.get_json()["data"]["id"]
    empty = client.post(f"/api/v1/workflows/{wid}/runs", headers=headers)  # no body at all
    assert empty.status_code == 202 and empty.get_json()["data"]["input"] == {}


def test_refusals_are_flasks_own_answers(app, client, services, headers, make_workflow):
    wid = make_workflow(STEPS)
    flask_only = _flask_only(app)
    reader = {"x-api-key": new_key_with(services, [RUNS_READ])}
    path = f"/api/v1/workflows/{wid}/runs"
    cases: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"json": {"input": {}}}, {}),  # no key
        ({"json": {"input": {}}}, {"x-api-key": "bk_000000000000_nope"}),
        ({"json": {"input": {}}}, reader),  # lacks runs:write
        ({"json": {"input": None}}, headers),
        ({"json": {"input": []}}, headers),
        ({"json": {"input": {}, "extra": 1}}, headers),
        ({"json": {"triggerType": "webhook"}}, headers),
        ({"json": {"triggerType": 3}}, headers),
        ({"json": [1]}, headers),
        ({"data": "{not json", "content_type": "application/json"}, headers),
        ({"data": '{"input": {}}', "content_type": "text/plain"}, headers),
        ({"data": "[" * 100 + "]" * 100, "content_type": "application/json"}, headers),
        ({"json": {"input": {}}}, {**headers, "Idempotency-Key": "x" * 256}),
        ({"data": b"{" + b" " * (1024 * 1024 + 1) + b"}", "content_type": "application/json"}, headers),
    ]
    for kwargs, sent in cases:
        fast = client.post(path, headers=sent, **kwargs)
        slow = flask_only.post(path, headers=sent, **kwargs)
        assert fast.status_code >= 400, (kwargs, sent)
        assert (fast.status_code, fast.data) == (slow.status_code, slow.data), (kwargs, sent)
    missing = client.post("/api/v1/workflows/wf_missing/runs", json={}, headers=headers)
    assert missing.status_code == 404
    assert missing.get_json() == {
        "success": False,
        "error": {"code": "NOT_FOUND", "message": "Workflow not found"},
    }
    assert client.get(path, headers=headers).status_code == 405, "other methods are Flask's"


def new_key_with(services: Services, scopes: list[str]) -> str:
    with services.db.session() as session:
        company = keys.get_or_create_company(session, f"scoped-{time.monotonic_ns()}")
        key = keys.create_key(session, company, scopes=scopes)
        session.commit()
    return key


def test_a_value_postgresql_cannot_store_is_a_400(client, headers, make_workflow):
    wid = make_workflow(STEPS)
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=headers).status_code == 202
    refused = client.post(f"/api/v1/workflows/{wid}/runs", json={"input": {"t": "a\u0000b"}}, headers=headers)
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"] == "VALIDATION_ERROR"


def test_a_new_version_or_a_deleted_workflow_is_seen_at_once(client, headers, make_workflow):
    wid = make_workflow(STEPS)
    path = f"/api/v1/workflows/{wid}/runs"
    assert client.post(path, json={}, headers=headers).get_json()["data"]["workflowVersion"] == 1
    v2 = {"name": "v2", "steps": [{"id": "x", "action": "transform"}, {"id": "y", "action": "transform"}]}
    assert client.put(f"/api/v1/workflows/{wid}", json=v2, headers=headers).status_code == 200
    run = client.post(path, json={}, headers=headers).get_json()["data"]
    assert run["workflowVersion"] == 2
    logs = client.get(f"/api/v1/runs/{run['id']}", headers=headers).get_json()["data"]
    assert logs["workflowVersion"] == 2
    assert client.delete(f"/api/v1/workflows/{wid}", headers=headers).status_code == 200
    assert client.post(path, json={}, headers=headers).status_code == 404


def test_idempotent_repeats_and_conflicts(client, headers, make_workflow):
    wid = make_workflow(STEPS)
    path = f"/api/v1/workflows/{wid}/runs"
    assert client.post(path, json={}, headers=headers).status_code == 202
    sent = {**headers, "Idempotency-Key": "order-1"}
    first = client.post(path, json={"input": {"n": 1}}, headers=sent)
    again = client.post(path, json={"input": {"n": 1}}, headers=sent)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert again.get_json()["data"]["id"] == first.get_json()["data"]["id"]
    other = client.post(path, json={"input": {"n": 2}}, headers=sent)
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "CONFLICT"


def test_the_same_key_sent_concurrently_makes_one_run(live_server, client, headers, make_workflow):
    wid = make_workflow(STEPS)
    url = f"{live_server}/api/v1/workflows/{wid}/runs"
    assert requests.post(url, json={}, headers=headers, timeout=10).status_code == 202
    sent = {**headers, "Idempotency-Key": "same-for-all"}

    def post(_: int) -> requests.Response:
        return requests.post(url, json={"input": {"x": 1}}, headers=sent, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(post, range(20)))
    assert sorted(a.status_code for a in answers) == [200] * 19 + [202]
    assert len({a.json()["data"]["id"] for a in answers}) == 1


def test_the_rate_limit_is_the_keys_budget_on_every_route(config, services):
    changed = config.with_overrides(rate_limit="3/day")
    app = create_app(changed, dataclasses.replace(services, config=changed))
    client = app.test_client()
    key = {"x-api-key": new_key(services)}
    body = {"name": "limited", "steps": STEPS}
    wid = client.post("/api/v1/workflows", json=body, headers=key).get_json()["data"]["id"]
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=key).status_code == 202
    assert client.get("/api/v1/workflows", headers=key).status_code == 200
    refused = client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=key)
    assert_rate_limited(refused)
    assert client.get("/api/v1/workflows", headers=key).status_code == 429, "one budget for all routes"
    other = {"x-api-key": new_key(services)}
    assert client.get("/api/v1/workflows", headers=other).status_code == 200, "per key"


def test_the_latency_metric_names_the_route_as_flask_does(app, client, headers, make_workflow):
    wid = make_workflow(STEPS)
    name = "baton_http_request_duration_seconds_count"

    def counts() -> dict[tuple[str, str], float]:
        text = client.get("/metrics").get_data(as_text=True)
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == name
                    and "/runs" in sample.labels["route"]
                    and "batch" not in sample.labels["route"]
                ):
                    found[(sample.labels["route"], sample.labels["status"])] = sample.value
        return found

    before = counts()
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=headers).status_code == 202
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={"x": 1}, headers=headers).status_code == 400
    after = counts()
    rule = "/api/v1/workflows/<string:workflow_id>/runs"
    assert after.get((rule, "202"), 0) - before.get((rule, "202"), 0) == 1
    assert after.get((rule, "400"), 0) - before.get((rule, "400"), 0) == 1, "Flask's label is the same"


def test_revocation_stops_triggers_in_every_process_within_one_second(config, services, tmp_path: Path):
    with baton_api(config, tmp_path / "api.log", workers=2) as (base, _proc):
        key = new_key(services)
        sent = {"x-api-key": key}
        body = {"name": "revoked", "steps": STEPS}
        wid = requests.post(f"{base}/api/v1/workflows", json=body, headers=sent, timeout=10).json()["data"][
            "id"
        ]

        def status() -> int:
            url = f"{base}/api/v1/workflows/{wid}/runs"
            return requests.post(url, json={}, headers=sent, timeout=5).status_code

        accepted, late = after_revoking(services, key, status, ok=202, warm=20)
    assert max(accepted, default=0) < 1.0
    assert len(late) >= 5 and set(late) == {401}


def test_another_companys_workflow_stays_not_found(client, services, make_workflow, headers):
    wid = make_workflow(STEPS)
    writer = {"x-api-key": new_key_with(services, [RUNS_WRITE])}
    # Another company's workflow of that id does not exist for this key's company.
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=writer).status_code == 404
    assert client.post(f"/api/v1/workflows/{wid}/runs", json={}, headers=headers).status_code == 202
