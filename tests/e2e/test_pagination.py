"""Cursor pagination of GET /api/v1/runs: keyset order, the spec's cursor, filters, bad input."""

from __future__ import annotations

import base64
import json
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from sqlalchemy import select

from app import keys
from app.timeutil import utcnow
from models import Workflow
from tests import factories
from tests.spec_shapes import LIST_ITEM_KEYS

SPEC_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
BASE = datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc)
MAX_PAGES = 5_000


# --------------------------------------------------------------------------- data


@dataclass
class Tenant:
    key: str
    company_id: str
    workflows: list[str]
    rows: dict[str, Workflow]
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key}

    def expected(self, **filters: Any) -> list[str]:
        """Run ids newest first: createdAt desc, then id desc."""
        rows = [
            r
            for r in self.runs
            if ("workflowId" not in filters or r["workflow_id"] == filters["workflowId"])
            and ("status" not in filters or r["status"] == filters["status"])
        ]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        return [r["id"] for r in rows]


def ms(value: datetime) -> int:
    return (value - EPOCH) // timedelta(milliseconds=1)


def ms_of(rendered: str) -> int:
    parsed = datetime.strptime(rendered, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return ms(parsed)


def spec_cursor(ts: int, run_id: str) -> str:
    """The spec's cursor: base64 of {"ts": <epoch ms>, "id": "<run id>"}."""
    raw = json.dumps({"ts": ts, "id": run_id}, separators=(",", ":"))
    return base64.b64encode(raw.encode()).decode()


def b64(raw: str | bytes) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def make_tenant(services: Any, app: Any, workflow_count: int = 2) -> Tenant:
    with services.db.session() as session:
        company = keys.get_or_create_company(session, f"page-{uuid.uuid4().hex[:12]}")
        key = keys.create_key(session, company)
        session.commit()
        company_id = company.id
    client = app.test_client()
    workflows = []
    for index in range(workflow_count):
        response = client.post(
            "/api/v1/workflows",
            json={"name": f"w{index}", "steps": [{"id": "s", "action": "transform", "input": {}}]},
            headers={"x-api-key": key},
        )
        assert response.status_code == 201, response.get_json()
        workflows.append(response.get_json()["data"]["id"])
    with services.db.session() as session:
        rows = {
            w.id: w
            for w in session.execute(select(Workflow).where(Workflow.company_id == company_id)).scalars()
        }
    return Tenant(key=key, company_id=company_id, workflows=workflows, rows=rows)


def run_row(tenant: Tenant, created_at: datetime, workflow_id: str, status: str) -> dict[str, Any]:
    # Random (not time-ordered) ids, so ties on createdAt are broken by id alone.
    workflow = tenant.rows[workflow_id]
    return factories.run_values(workflow, status, id=f"run_{uuid.uuid4()}", created_at=created_at)


def insert_rows(services: Any, tenant: Tenant, rows: list[dict[str, Any]]) -> None:
    with services.db.session() as session:
        factories.insert_runs(session, rows)
        session.commit()
    tenant.runs.extend(rows)


def seed(services: Any, tenant: Tenant, count: int, rng: random.Random, start: datetime = BASE) -> None:
    """``count`` runs over both workflows and all statuses, with groups sharing one millisecond."""
    rows: list[dict[str, Any]] = []
    at = start
    while len(rows) < count:
        # Every so often several runs land in the same millisecond; the newest one is such a group too.
        group = 6 if len(rows) % 97 == 0 or count - len(rows) <= 6 else 1
        for _ in range(min(group, count - len(rows))):
            status = (
                rng.choice(SPEC_STATUSES) if rng.random() < 0.95 else rng.choice(("suspended", "timeout"))
            )
            rows.append(run_row(tenant, at, rng.choice(tenant.workflows), status))
        at += timedelta(milliseconds=rng.randint(1, 5_000))
    insert_rows(services, tenant, rows)


@pytest.fixture(scope="module")
def big(services: Any, app: Any) -> Tenant:
    """One company with 1,050 runs, and a neighbour whose runs share its timestamps."""
    rng = random.Random(20240115)
    tenant = make_tenant(services, app)
    seed(services, tenant, 1_050, rng)
    neighbour = make_tenant(services, app, workflow_count=1)
    seed(services, neighbour, 150, random.Random(7))
    tenant.neighbour = neighbour  # type: ignore[attr-defined]
    return tenant


# --------------------------------------------------------------------------- walking


def check_page(body: dict[str, Any], limit: int) -> None:
    assert set(body) == {"success", "data", "meta"}
    assert body["success"] is True
    assert set(body["meta"]) == {"cursor", "hasMore"}
    data, meta = body["data"], body["meta"]
    assert isinstance(meta["hasMore"], bool)
    assert len(data) <= limit
    for item in data:
        assert set(item) == LIST_ITEM_KEYS
    if meta["hasMore"]:
        assert len(data) == limit
        last = data[-1]
        expected = spec_cursor(ms_of(last["createdAt"]), last["id"])
        assert meta["cursor"] == expected
        decoded = json.loads(base64.b64decode(meta["cursor"], validate=True))
        assert decoded == {"ts": ms_of(last["createdAt"]), "id": last["id"]}
        assert type(decoded["ts"]) is int
    else:
        assert meta["cursor"] is None


def walk(
    get: Callable[[dict[str, Any]], dict[str, Any]],
    limits: Callable[[int], int | None],
    between_pages: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    **filters: Any,
) -> tuple[list[dict[str, Any]], int]:
    """Follow meta.cursor to the end; returns every item seen and the number of pages."""
    items: list[dict[str, Any]] = []
    cursor = None
    for page_number in range(MAX_PAGES):
        limit = limits(page_number)
        params: dict[str, Any] = dict(filters)
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        body = get(params)
        check_page(body, limit or 50)
        items.extend(body["data"])
        if not body["meta"]["hasMore"] or (stop_after is not None and len(items) >= stop_after):
            return items, page_number + 1
        cursor = body["meta"]["cursor"]
        if between_pages is not None:
            between_pages(page_number)
    raise AssertionError("pagination did not end")


def getter(client: Any, headers: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def get(params: dict[str, Any]) -> dict[str, Any]:
        response = client.get("/api/v1/runs", query_string=params, headers=headers)
        assert response.status_code == 200, (params, response.get_data(as_text=True))
        return response.get_json()

    return get


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


# --------------------------------------------------------------------------- full walks


def test_walk_with_every_limit_from_1_to_100(client, big):
    items, pages = walk(getter(client, big.headers), lambda n: n % 100 + 1)
    assert pages > 40
    assert ids(items) == big.expected()
    assert len(set(ids(items))) == len(big.runs) == 1_050


@pytest.mark.parametrize("limit", [2, 13, 100, None], ids=["2", "13", "100", "default"])
def test_walk_with_a_fixed_limit_sees_each_run_once_newest_first(client, big, limit):
    items, pages = walk(getter(client, big.headers), lambda n: limit)
    expected = big.expected()
    assert ids(items) == expected
    per_page = limit or 50
    assert pages == -(-len(expected) // per_page)
    # The rendered createdAt is the stored one, and the order is (createdAt desc, id desc).
    by_id = {r["id"]: r for r in big.runs}
    keys_seen = [(ms_of(item["createdAt"]), item["id"]) for item in items]
    assert keys_seen == sorted(keys_seen, reverse=True)
    assert all(ms_of(item["createdAt"]) == ms(by_id[item["id"]]["created_at"]) for item in items)


def test_limit_one_through_runs_sharing_a_millisecond(client, big):
    expected = big.expected()
    items, _ = walk(getter(client, big.headers), lambda n: 1, stop_after=40)
    assert ids(items) == expected[: len(items)]
    created = [item["createdAt"] for item in items]
    # The newest six runs share one millisecond: each page boundary between them is a tie on ts.
    assert len(set(created[:6])) == 1
    assert ids(items[:6]) == sorted(ids(items[:6]), reverse=True)


def test_walk_over_http_with_requests(live_server, big):
    session = requests.Session()

    def get(params: dict[str, Any]) -> dict[str, Any]:
        response = session.get(f"{live_server}/api/v1/runs", params=params, headers=big.headers)
        assert response.status_code == 200, response.text
        return response.json()

    items, pages = walk(get, lambda n: 100)
    assert pages == 11
    assert ids(items) == big.expected()


def test_other_companies_runs_never_appear(client, big):
    neighbour = big.neighbour
    mine = set(ids(walk(getter(client, big.headers), lambda n: 100)[0]))
    theirs = set(ids(walk(getter(client, neighbour.headers), lambda n: 100)[0]))
    assert mine == {r["id"] for r in big.runs}
    assert theirs == {r["id"] for r in neighbour.runs}
    assert not mine & theirs
    # Filtering by another company's workflow shows nothing, not their runs.
    body = getter(client, big.headers)({"workflowId": neighbour.workflows[0]})
    assert body["data"] == [] and body["meta"] == {"cursor": None, "hasMore": False}


# --------------------------------------------------------------------------- ties


def test_ties_on_created_at_are_broken_by_id_desc(client, services, app):
    tenant = make_tenant(services, app, workflow_count=1)
    same = BASE + timedelta(milliseconds=123)
    rows = [run_row(tenant, same, tenant.workflows[0], "completed") for _ in range(12)]
    rows += [
        run_row(tenant, same + timedelta(milliseconds=1), tenant.workflows[0], "failed") for _ in range(3)
    ]
    rows += [
        run_row(tenant, same - timedelta(milliseconds=1), tenant.workflows[0], "pending") for _ in range(3)
    ]
    insert_rows(services, tenant, rows)
    expected = tenant.expected()
    assert len(expected) == 18
    for limit in (1, 2, 3, 4, 5, 7, 11, 17, 18, 100):
        items, _ = walk(getter(client, tenant.headers), lambda n, limit=limit: limit)
        assert ids(items) == expected, limit
    middle = [item for item in items if ms_of(item["createdAt"]) == ms(same)]
    assert ids(middle) == sorted(ids(middle), reverse=True) and len(middle) == 12


def test_has_more_is_false_on_an_exactly_full_last_page(client, services, app):
    tenant = make_tenant(services, app, workflow_count=1)
    insert_rows(
        services,
        tenant,
        [run_row(tenant, BASE + timedelta(seconds=i), tenant.workflows[0], "completed") for i in range(10)],
    )
    get = getter(client, tenant.headers)
    first = get({"limit": 5})
    assert first["meta"]["hasMore"] is True and len(first["data"]) == 5
    second = get({"limit": 5, "cursor": first["meta"]["cursor"]})
    assert len(second["data"]) == 5
    assert second["meta"] == {"cursor": None, "hasMore": False}
    single = get({"limit": 10})
    assert len(single["data"]) == 10 and single["meta"] == {"cursor": None, "hasMore": False}
    assert ids(first["data"] + second["data"]) == ids(single["data"]) == tenant.expected()


def test_empty_company_lists_nothing(client, headers):
    response = client.get("/api/v1/runs", headers=headers)
    assert response.status_code == 200
    assert response.get_json() == {"success": True, "data": [], "meta": {"cursor": None, "hasMore": False}}


def test_default_limit_is_50(client, big):
    body = getter(client, big.headers)({})
    assert len(body["data"]) == 50 and body["meta"]["hasMore"] is True
    assert ids(body["data"]) == big.expected()[:50]


def test_well_formed_cursors_that_match_no_row(client, big):
    get = getter(client, big.headers)
    expected = big.expected()
    oldest = min(big.runs, key=lambda r: (r["created_at"], r["id"]))
    # Older than everything: an empty last page.
    body = get({"cursor": spec_cursor(ms(oldest["created_at"]) - 1, "run_zzz")})
    assert body["data"] == [] and body["meta"] == {"cursor": None, "hasMore": False}
    body = get({"cursor": spec_cursor(0, "run_00000000-0000-0000-0000-000000000000")})
    assert body["data"] == []
    # Keyset: the cursor's id need not exist; everything strictly older comes next.
    newest = max(big.runs, key=lambda r: r["created_at"])
    body = get({"cursor": spec_cursor(ms(newest["created_at"]) + 1, f"run_{uuid.uuid4()}"), "limit": 100})
    assert ids(body["data"]) == expected[:100]


# --------------------------------------------------------------------------- filters


def test_filter_by_workflow(client, big):
    for workflow_id in big.workflows:
        items, _ = walk(getter(client, big.headers), lambda n: 37, workflowId=workflow_id)
        assert ids(items) == big.expected(workflowId=workflow_id)
        assert {item["workflowId"] for item in items} == {workflow_id}
        assert 0 < len(items) < len(big.runs)


@pytest.mark.parametrize("status", [*SPEC_STATUSES, "suspended", "timeout"])
def test_filter_by_status(client, big, status):
    items, _ = walk(getter(client, big.headers), lambda n: 41, status=status)
    assert ids(items) == big.expected(status=status)
    assert items and {item["status"] for item in items} == {status}


@pytest.mark.parametrize("status", ["failed", "pending", "completed"])
def test_filter_by_workflow_and_status(client, big, status):
    workflow_id = big.workflows[1]
    items, _ = walk(getter(client, big.headers), lambda n: 9, workflowId=workflow_id, status=status)
    assert ids(items) == big.expected(workflowId=workflow_id, status=status)
    assert items
    assert all(item["workflowId"] == workflow_id and item["status"] == status for item in items)


def test_filter_by_unknown_workflow_is_empty(client, big):
    body = getter(client, big.headers)({"workflowId": "wf_does-not-exist"})
    assert body == {"success": True, "data": [], "meta": {"cursor": None, "hasMore": False}}


@pytest.mark.parametrize("workflow_id", ["wf_\x00", "\x00", "wf_a\x00b"], ids=["suffix", "alone", "inside"])
def test_filter_by_workflow_id_with_nul_is_not_a_500(client, headers, workflow_id):
    """No workflow id holds NUL: an empty page or a validation error, never an internal error."""
    response = client.get("/api/v1/runs", query_string={"workflowId": workflow_id}, headers=headers)
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 200:
        assert response.get_json()["data"] == []
    else:
        assert_validation_error(response, "workflowId")


# --------------------------------------------------------------------------- stable while runs arrive


class BackgroundTriggers:
    """Triggers runs of one workflow over real HTTP from another thread until stopped."""

    def __init__(self, live_server: str, tenant: Tenant) -> None:
        self.url = f"{live_server}/api/v1/workflows/{tenant.workflows[0]}/runs"
        self.headers = tenant.headers
        self.created: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            response = session.post(self.url, json={"input": {"n": len(self.created)}}, headers=self.headers)
            if response.status_code == 202:
                self.created.append(response.json()["data"]["id"])
            else:
                self.errors.append(f"{response.status_code} {response.text}")
            self._first.set()

    def start(self) -> None:
        self._thread.start()
        assert self._first.wait(20), "no run was triggered"

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors[:3]
        return list(self.created)


def test_runs_created_between_pages_do_not_shift_the_walk(client, services, app, live_server):
    tenant = make_tenant(services, app)
    seed(services, tenant, 1_000, random.Random(99))
    snapshot = tenant.expected()
    background = BackgroundTriggers(live_server, tenant)
    inserted: list[str] = []

    def create_more(page_number: int) -> None:
        if page_number == 0:
            # Once the first page is out, runs keep arriving over HTTP for the rest of the walk.
            background.start()
        # Several new runs per page, some sharing one millisecond, all newer than the snapshot.
        now = utcnow()
        rows = [run_row(tenant, now, tenant.workflows[page_number % 2], "pending") for _ in range(3)]
        rows.append(run_row(tenant, now + timedelta(milliseconds=1), tenant.workflows[0], "failed"))
        insert_rows(services, tenant, rows)
        inserted.extend(r["id"] for r in rows)

    try:
        items, pages = walk(getter(client, tenant.headers), lambda n: (n * 17) % 100 + 1, create_more)
    finally:
        created_over_http = background.stop()
    assert pages > 5
    assert ids(items) == snapshot
    assert inserted and created_over_http
    assert not set(ids(items)) & (set(inserted) | set(created_over_http))

    # The new runs are all there, on top, for a walk that starts afresh.
    fresh, _ = walk(getter(client, tenant.headers), lambda n: 100)
    fresh_ids = ids(fresh)
    assert len(fresh_ids) == len(set(fresh_ids)) == len(snapshot) + len(inserted) + len(created_over_http)
    assert fresh_ids[-len(snapshot) :] == snapshot
    assert set(fresh_ids[: -len(snapshot)]) == set(inserted) | set(created_over_http)


def test_filtered_walk_while_runs_arrive(client, services, app):
    tenant = make_tenant(services, app)
    seed(services, tenant, 400, random.Random(5))
    workflow_id = tenant.workflows[0]
    snapshot = tenant.expected(workflowId=workflow_id, status="failed")

    def create_more(page_number: int) -> None:
        now = utcnow()
        insert_rows(services, tenant, [run_row(tenant, now, workflow_id, "failed") for _ in range(2)])

    items, _ = walk(
        getter(client, tenant.headers), lambda n: 3, create_more, workflowId=workflow_id, status="failed"
    )
    assert ids(items) == snapshot


# --------------------------------------------------------------------------- validation


def assert_validation_error(response: Any, field_name: str) -> None:
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == "VALIDATION_ERROR"
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict) and field_name in error["details"], error
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5", "", "1e2", "99999999999999999999"])
def test_bad_limit_is_a_validation_error(client, headers, limit):
    assert_validation_error(
        client.get("/api/v1/runs", query_string={"limit": limit}, headers=headers), "limit"
    )


@pytest.mark.parametrize("status", ["bogus", "COMPLETED", "success", "", "pending,failed"])
def test_bad_status_is_a_validation_error(client, headers, status):
    assert_validation_error(
        client.get("/api/v1/runs", query_string={"status": status}, headers=headers), "status"
    )


RUN = "run_550e8400-e29b-41d4-a716-446655440000"
BAD_CURSORS = {
    "not-base64": "!!!",
    "not-json": b64("not json"),
    "truncated-json": b64('{"ts":1705312000000,"id":"run_'),
    "empty-object": b64("{}"),
    "missing-id": b64('{"ts":1705312000000}'),
    "missing-ts": b64(f'{{"id":"{RUN}"}}'),
    "ts-string": b64(f'{{"ts":"1705312000000","id":"{RUN}"}}'),
    "ts-float": b64(f'{{"ts":1705312000000.5,"id":"{RUN}"}}'),
    "ts-exponent": b64(f'{{"ts":1e12,"id":"{RUN}"}}'),
    "ts-nan": b64(f'{{"ts":NaN,"id":"{RUN}"}}'),
    "ts-bool": b64(f'{{"ts":true,"id":"{RUN}"}}'),
    "ts-null": b64(f'{{"ts":null,"id":"{RUN}"}}'),
    "ts-huge": b64(f'{{"ts":99999999999999999999,"id":"{RUN}"}}'),
    "ts-very-negative": b64(f'{{"ts":-99999999999999999,"id":"{RUN}"}}'),
    "id-number": b64('{"ts":1705312000000,"id":123}'),
    "id-null": b64('{"ts":1705312000000,"id":null}'),
    "id-empty": b64('{"ts":1705312000000,"id":""}'),
    "id-object": b64('{"ts":1705312000000,"id":{"a":1}}'),
    "array": b64(f'[1705312000000,"{RUN}"]'),
    "string": b64('"hello"'),
    "null": b64("null"),
    "number": b64("42"),
    "not-utf8": b64(b"\xff\xfe\xfa\x00"),
    "too-long": b64(json.dumps({"ts": 1705312000000, "id": "run_" + "a" * 600})),
    "spaces": "eyJ0cyI6 MTcwNTMxMjAwMDAwMCwiaWQiOiJydW5fIn0=",
    "non-ascii": "ééé",
    # Valid JSON, but PostgreSQL text cannot hold NUL: it must be refused, not sent to the database.
    "id-nul": b64('{"ts":1705312000000,"id":"run_\\u0000"}'),
}


@pytest.mark.parametrize("cursor", list(BAD_CURSORS.values()), ids=list(BAD_CURSORS))
def test_malformed_cursor_is_a_validation_error(client, headers, cursor):
    assert_validation_error(
        client.get("/api/v1/runs", query_string={"cursor": cursor}, headers=headers), "cursor"
    )


def test_malformed_cursor_with_filters_is_a_validation_error(client, big):
    response = client.get(
        "/api/v1/runs",
        query_string={"cursor": b64("[]"), "status": "failed", "workflowId": big.workflows[0]},
        headers=big.headers,
    )
    assert_validation_error(response, "cursor")


def test_malformed_cursor_over_http(live_server, api_key):
    for cursor in ("!!!", b64("not json"), b64('{"ts":"1","id":"run_x"}')):
        response = requests.get(
            f"{live_server}/api/v1/runs", params={"cursor": cursor}, headers={"x-api-key": api_key}
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["success"] is False
        assert body["error"]["code"] == "VALIDATION_ERROR"
        assert "cursor" in body["error"]["details"]
