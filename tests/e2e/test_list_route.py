"""``GET /api/v1/runs`` answered before Flask (api/list_route.py): the same bytes and headers as the
Flask view for every filter and cursor, every refusal still Flask's own, and the rate limit, the
latency metric and key revocation unchanged."""

from __future__ import annotations

import dataclasses
import logging
import random
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from werkzeug.test import Client

from api.list_route import ListRoute
from app import db, keys
from app.factory import create_app
from app.keys import RUNS_READ, RUNS_WRITE
from models import ApiKey
from tests.conftest import DEAD_REDIS_URL, assert_rate_limited, new_key, wait_for
from tests.e2e.test_pagination import BASE, Tenant, insert_rows, make_tenant, run_row
from tests.e2e.test_trigger_route import new_key_with

STATUSES = ("pending", "running", "completed", "failed", "cancelled", "timeout", "suspended")
TRIGGERS = ("api", "webhook", "schedule", "manual")


def _layer(app: Any) -> ListRoute:
    """The list layer among the app's WSGI layers (each keeps the next one as ``flask_app``)."""
    layer = app.wsgi_app
    while not isinstance(layer, ListRoute):
        layer = layer.flask_app
    return layer


def _flask_only(app: Any) -> Client:
    """A client of the same app without the list layer in front: what Flask alone answers."""
    return Client(_layer(app).flask_app)


def _fast_only(app: Any) -> Client:
    """A client of the list layer alone: a request it hands on fails the test."""

    def handed_on(environ: dict[str, Any], _start_response: Any) -> Any:
        raise AssertionError(f"handed to Flask: {environ.get('QUERY_STRING')!r}")

    return Client(ListRoute(app, handed_on))


@pytest.fixture(scope="module")
def tenant(services: Any, app: Any) -> Tenant:
    """120 runs over two workflows, every status and trigger type, errors with non-ASCII text, some
    sharing a millisecond."""
    rng = random.Random(7)
    tenant = make_tenant(services, app)
    rows = []
    at = BASE
    for index in range(120):
        row = run_row(tenant, at, rng.choice(tenant.workflows), rng.choice(STATUSES))
        row["trigger_type"] = rng.choice(TRIGGERS)
        if row["status"] == "failed" and index % 2:
            row["error"] = {"code": "HTTP_ERROR", "message": 'échec \u2028 <b>"quoted"</b>', "extra": 1}
        elif row["status"] == "failed" and index % 3:
            row["error"] = {"code": 5, "message": None}  # shown as strings, null kept
        elif index % 31 == 0:
            row["error"] = ["not", "an", "object"] if index % 2 else "text"  # shown as null
        rows.append(row)
        if index % 9:
            at += timedelta(milliseconds=rng.randint(1, 90_000))
    insert_rows(services, tenant, rows)
    return tenant


def _queries(client: Any, tenant: Tenant) -> list[dict[str, Any]]:
    """Query strings over every filter, alone and combined, and cursors from real pages."""
    wf = tenant.workflows[0]
    middle = BASE + timedelta(hours=25)
    queries: list[dict[str, Any]] = [
        {},
        {"limit": 1},
        {"limit": 7},
        {"limit": 100},
        {"workflowId": wf},
        {"workflowId": "wf_not-there"},
        {"status": "failed"},
        {"status": "running", "limit": 3},
        {"triggerType": "webhook"},
        {"createdAfter": middle.isoformat()},
        {"createdBefore": "2024-01-16T11:30:00"},  # no offset: UTC
        {"createdAfter": "2024-01-15T12:00:00+02:00", "createdBefore": "2024-01-17T00:00:00.123Z"},
        {"workflowId": wf, "status": "completed", "triggerType": "api", "createdAfter": BASE.isoformat()},
    ]
    for query in list(queries):
        first = client.get("/api/v1/runs", query_string={**query, "limit": 5}, headers=_headers(tenant))
        cursor = first.get_json()["meta"]["cursor"]
        if cursor:
            queries.append({**query, "limit": 5, "cursor": cursor})
            url_safe = cursor.replace("+", "-").replace("/", "_").rstrip("=")
            queries.append({**query, "cursor": url_safe})
    assert sum("cursor" in q for q in queries) >= 8
    return queries


def _headers(tenant: Tenant) -> dict[str, str]:
    return {"x-api-key": tenant.key}


def test_the_answer_is_the_flask_views_byte_for_byte(app, client, tenant):
    flask_only, fast_only = _flask_only(app), _fast_only(app)
    for query in _queries(client, tenant):
        path = "/api/v1/runs?" + urlencode(query)
        fast = fast_only.get(path, headers=_headers(tenant))
        served = client.get(path, headers=_headers(tenant))
        slow = flask_only.get(path, headers=_headers(tenant))
        assert (fast.status_code, slow.status_code) == (200, 200), query
        assert fast.status == slow.status == "200 OK"
        assert fast.headers.to_wsgi_list() == slow.headers.to_wsgi_list(), query
        assert fast.data == slow.data == served.data, query
        assert fast.data.endswith(b"}\n")
    failed = fast_only.get("/api/v1/runs?status=failed&limit=100", headers=_headers(tenant)).get_json()
    errors = [r["error"] for r in failed["data"]]
    shown = {"code": "HTTP_ERROR", "message": 'échec \u2028 <b>"quoted"</b>'}
    assert shown in errors, "code and message only"


def test_a_page_postgresql_would_escape_otherwise_is_rendered_here(app, services):
    """Ids are ASCII in practice; one that is not (or holds DEL, which only Python escapes) makes
    the page's entries rendered from plain columns, still byte for byte Flask's."""
    tenant = make_tenant(services, app)
    odd = [run_row(tenant, BASE + timedelta(seconds=i), tenant.workflows[0], "completed") for i in range(3)]
    odd[0]["id"], odd[1]["id"] = "run_caf\u00e9", "run_del\x7fete"
    insert_rows(services, tenant, odd)
    for query in ("", "limit=1", "limit=2"):
        fast = _fast_only(app).get(f"/api/v1/runs?{query}", headers=_headers(tenant))
        slow = _flask_only(app).get(f"/api/v1/runs?{query}", headers=_headers(tenant))
        assert fast.status_code == slow.status_code == 200
        assert fast.data == slow.data, query
    assert "run_del\x7fete" in [r["id"] for r in fast.get_json()["data"]], "the last page had one"


def test_refusals_and_unusual_queries_are_flasks_own_answers(app, client, services, tenant):
    flask_only = _flask_only(app)
    writer = {"x-api-key": new_key_with(services, [RUNS_WRITE])}
    bad_key = {"x-api-key": "bk_000000000000_nope"}
    cases: list[tuple[str, dict[str, str]]] = [
        ("", {}),  # no key
        ("", bad_key),
        ("", writer),  # lacks runs:read
        ("limit=0", _headers(tenant)),
        ("limit=101", _headers(tenant)),
        ("limit=abc", _headers(tenant)),
        ("limit=", _headers(tenant)),
        ("limit=007", _headers(tenant)),  # the schema reads 7: Flask answers it
        ("limit=+7", _headers(tenant)),
        ("status=bogus", _headers(tenant)),
        ("status=", _headers(tenant)),
        ("triggerType=cron", _headers(tenant)),
        ("workflowId=not-an-id", _headers(tenant)),
        ("createdAfter=yesterday", _headers(tenant)),
        ("createdBefore=2024-13-01T00:00:00Z", _headers(tenant)),
        ("cursor=", _headers(tenant)),
        ("cursor=bm90IGEgY3Vyc29y", _headers(tenant)),
        ("cursor=" + "A" * 501, _headers(tenant)),
        ("status=failed&status=completed", _headers(tenant)),  # repeated: Flask reads the first
        ("unknown=1", _headers(tenant)),
        ("status=f%C3%A9", _headers(tenant)),
        ("workflowId=wf_%FF", _headers(tenant)),
    ]
    for query, sent in cases:
        path = f"/api/v1/runs?{query}"
        fast = client.get(path, headers=sent)
        slow = flask_only.get(path, headers=sent)
        assert (fast.status_code, fast.data) == (slow.status_code, slow.data), (query, sent)
        assert fast.headers.to_wsgi_list() == slow.headers.to_wsgi_list(), (query, sent)
    refused = client.get("/api/v1/runs", headers=writer)
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "FORBIDDEN"
    assert client.get("/api/v1/runs?limit=0", headers=_headers(tenant)).status_code == 400
    assert client.post("/api/v1/runs", headers=_headers(tenant)).status_code == 405, "other methods"
    assert client.get("/api/v1/runs/", headers=_headers(tenant)).status_code in (308, 404)


def test_the_rate_limit_is_the_keys_budget_on_every_route(config, services):
    changed = config.with_overrides(rate_limit="3/day")
    app = create_app(changed, dataclasses.replace(services, config=changed))
    client = app.test_client()
    key = {"x-api-key": new_key(services)}
    assert client.get("/api/v1/runs", headers=key).status_code == 200
    assert client.get("/api/v1/workflows", headers=key).status_code == 200
    assert client.get("/api/v1/runs?status=failed", headers=key).status_code == 200
    refused = client.get("/api/v1/runs", headers=key)
    assert_rate_limited(refused)
    assert client.get("/api/v1/workflows", headers=key).status_code == 429, "one budget for all routes"
    other = {"x-api-key": new_key(services)}
    assert client.get("/api/v1/runs", headers=other).status_code == 200, "per key"


def test_a_refused_key_costs_no_query_until_its_window_frees_a_request(config, services):
    changed = config.with_overrides(rate_limit="1/day")
    client = create_app(changed, dataclasses.replace(services, config=changed)).test_client()
    key = {"x-api-key": new_key(services)}
    assert client.get("/api/v1/runs", headers=key).status_code == 200
    assert client.get("/api/v1/runs", headers=key).status_code == 429
    sent = db.statements_executed()
    again = client.get("/api/v1/runs", headers=key)
    assert again.status_code == 429 and 1 <= int(again.headers["Retry-After"]) <= 24 * 3600
    assert db.statements_executed() == sent, "no page read for a key known to be over its budget"


def test_the_list_fails_open_when_the_limits_redis_is_down(config, services, caplog):
    changed = config.with_overrides(rate_limit="1/day", redis_url=DEAD_REDIS_URL)
    client = create_app(changed, dataclasses.replace(services, config=changed)).test_client()
    key = {"x-api-key": new_key(services)}
    with caplog.at_level(logging.WARNING, logger="baton.ratelimit"):
        statuses = [client.get("/api/v1/runs", headers=key).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert any("not enforced" in r.getMessage() for r in caplog.records)


def test_the_latency_metric_names_the_route_as_flask_does(client, tenant):
    name = "baton_http_request_duration_seconds_count"

    def counts() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        return {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and sample.labels["route"] == "/api/v1/runs"
        }

    before = counts()
    assert client.get("/api/v1/runs", headers=_headers(tenant)).status_code == 200
    assert client.get("/api/v1/runs?limit=0", headers=_headers(tenant)).status_code == 400
    after = counts()
    assert after.get("200", 0) - before.get("200", 0) == 1
    assert after.get("400", 0) - before.get("400", 0) == 1, "Flask's label is the same"


def test_a_revoked_key_is_refused_once_its_verification_expires(client, services):
    key = new_key_with(services, [RUNS_READ])
    sent = {"x-api-key": key}
    assert client.get("/api/v1/runs", headers=sent).status_code == 200
    with services.db.session() as session:
        assert keys.revoke(session, key.split("_")[1])
    refused = wait_for(
        lambda: (answer := client.get("/api/v1/runs", headers=sent)).status_code == 401 and answer,
        timeout=5,
        what="the revoked key refused",
    )
    assert refused.get_json()["error"]["code"] == "UNAUTHORIZED"


def test_a_key_checked_by_the_list_gets_its_last_use_recorded(client, services):
    key = new_key_with(services, [RUNS_READ])
    prefix = key.split("_")[1]

    def last_used() -> Any:
        with services.db.session() as session:
            return next(k for k in keys.list_keys(session, _company(session, prefix)) if k.prefix == prefix)

    assert last_used().last_used_at is None
    assert client.get("/api/v1/runs", headers={"x-api-key": key}).status_code == 200
    assert last_used().last_used_at is not None
    keys._verified.clear()  # the next request checks the key's row again: no second write
    before = last_used().last_used_at
    assert client.get("/api/v1/runs", headers={"x-api-key": key}).status_code == 200
    assert last_used().last_used_at == before


def _company(session: Any, prefix: str) -> str:
    return session.execute(select(ApiKey.company_id).where(ApiKey.prefix == prefix)).scalar_one()
