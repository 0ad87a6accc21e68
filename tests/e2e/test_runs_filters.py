"""GET /api/v1/runs filters by triggerType, createdAfter and createdBefore: each alone, combined
with workflowId, status and each other, through cursor pages; bad values; list entries only."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from tests.e2e.test_pagination import (
    BASE,
    Tenant,
    assert_validation_error,
    getter,
    ids,
    insert_rows,
    make_tenant,
    run_row,
    walk,
)
from tests.spec_shapes import LIST_ITEM_KEYS

TRIGGERS = ("api", "webhook", "schedule", "manual")
STATUSES = ("pending", "running", "completed", "failed", "cancelled")


def iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture(scope="module")
def mixed(services: Any, app: Any) -> Tenant:
    """400 runs over two workflows, every status and trigger type, a second or so apart."""
    rng = random.Random(101)
    tenant = make_tenant(services, app)
    rows = []
    for index in range(400):
        row = run_row(
            tenant, BASE + timedelta(seconds=index), rng.choice(tenant.workflows), rng.choice(STATUSES)
        )
        row["trigger_type"] = rng.choice(TRIGGERS)
        rows.append(row)
    insert_rows(services, tenant, rows)
    return tenant


def expected(tenant: Tenant, **filters: Any) -> list[str]:
    """Run ids newest first, filtered as the API documents (createdAfter inclusive, createdBefore not)."""
    rows = [
        r
        for r in tenant.runs
        if r["workflow_id"] == filters.get("workflowId", r["workflow_id"])
        and r["status"] == filters.get("status", r["status"])
        and r["trigger_type"] == filters.get("triggerType", r["trigger_type"])
        and ("after" not in filters or r["created_at"] >= filters["after"])
        and ("before" not in filters or r["created_at"] < filters["before"])
    ]
    rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return [r["id"] for r in rows]


def query(**filters: Any) -> dict[str, Any]:
    params = {k: v for k, v in filters.items() if k not in ("after", "before")}
    if "after" in filters:
        params["createdAfter"] = iso(filters["after"])
    if "before" in filters:
        params["createdBefore"] = iso(filters["before"])
    return params


@pytest.mark.parametrize("trigger_type", TRIGGERS)
def test_filter_by_trigger_type(client, mixed, trigger_type):
    items, pages = walk(getter(client, mixed.headers), lambda n: 13, triggerType=trigger_type)
    assert ids(items) == expected(mixed, triggerType=trigger_type) and pages > 1
    assert {item["triggerType"] for item in items} == {trigger_type}


def test_filter_by_time_window_alone_and_each_bound(client, mixed):
    after, before = BASE + timedelta(seconds=100), BASE + timedelta(seconds=250)
    for bounds in ({"after": after}, {"before": before}, {"after": after, "before": before}):
        items, _ = walk(getter(client, mixed.headers), lambda n: 17, **query(**bounds))
        assert ids(items) == expected(mixed, **bounds), bounds
    window, _ = walk(getter(client, mixed.headers), lambda n: 50, **query(after=after, before=before))
    assert len(window) == 150  # one run a second: 100 inclusive to 250 exclusive


def test_every_filter_combined_through_cursor_pages(client, mixed):
    after, before = BASE + timedelta(seconds=20), BASE + timedelta(seconds=380)
    for workflow_id in mixed.workflows:
        for status in ("completed", "failed"):
            filters = {"workflowId": workflow_id, "status": status, "triggerType": "webhook"}
            items, _ = walk(
                getter(client, mixed.headers), lambda n: 3, **query(**filters, after=after, before=before)
            )
            assert ids(items) == expected(mixed, **filters, after=after, before=before)
            assert items, filters


def test_offsets_and_times_without_one_are_understood(client, mixed):
    at = BASE + timedelta(seconds=300)
    in_berlin = at.astimezone(timezone(timedelta(hours=1))).isoformat()
    items, _ = walk(getter(client, mixed.headers), lambda n: 100, createdAfter=in_berlin)
    assert ids(items) == expected(mixed, after=at)
    naive = walk(
        getter(client, mixed.headers), lambda n: 100, createdAfter=at.replace(tzinfo=None).isoformat()
    )[0]
    assert ids(naive) == ids(items), "no offset means UTC"


def test_list_entries_carry_only_the_spec_fields(client, mixed):
    body = client.get("/api/v1/runs", query_string={"limit": 5}, headers=mixed.headers).get_json()
    assert body["data"] and all(set(item) == LIST_ITEM_KEYS for item in body["data"])
    assert not {"input", "output"} & set(body["data"][0])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("triggerType", "cron"),
        ("triggerType", "API"),
        ("triggerType", ""),
        ("createdAfter", "yesterday"),
        ("createdAfter", "2024-13-01T00:00:00Z"),
        ("createdAfter", ""),
        ("createdBefore", "1705312000000"),
        ("createdBefore", "2024-01-15T25:00:00Z"),
    ],
)
def test_bad_values_are_validation_errors_naming_the_parameter(client, headers, name, value):
    response = client.get("/api/v1/runs", query_string={name: value}, headers=headers)
    assert_validation_error(response, name)
    assert name in response.get_json()["error"]["details"]
