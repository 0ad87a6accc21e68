"""Key scopes and tenant isolation on every route of the URL map.

Each tenant-facing /api/v1 route is called with a key lacking its scope (403 FORBIDDEN), with a key
holding exactly its scope (admitted), with another company's admin key and this company's ids (404,
no data, no effect) and with a revoked key (401). The routes come from ``app.url_map``: a route added
without an entry in ``ROUTE_SCOPES`` fails here until its scope is decided.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from api import events as api_events
from app import bulk, keys
from app.keys import ADMIN, RUNS_READ, RUNS_WRITE, SCOPES, SECRETS_WRITE, WORKFLOWS_WRITE
from models import BulkKind
from tests import factories
from tests.e2e.test_auth_errors import assert_error

ANY_KEY = None  # any valid key of the company
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    ("GET", "/api/v1/workflows"): ANY_KEY,
    ("POST", "/api/v1/workflows"): WORKFLOWS_WRITE,
    ("GET", "/api/v1/workflows/<workflow_id>"): ANY_KEY,
    ("PUT", "/api/v1/workflows/<workflow_id>"): WORKFLOWS_WRITE,
    ("DELETE", "/api/v1/workflows/<workflow_id>"): WORKFLOWS_WRITE,
    ("POST", "/api/v1/workflows/<workflow_id>/runs"): RUNS_WRITE,
    ("POST", "/api/v1/workflows/<workflow_id>/runs/batch"): RUNS_WRITE,
    ("GET", "/api/v1/workflows/<workflow_id>/deliveries"): ANY_KEY,
    ("GET", "/api/v1/runs"): RUNS_READ,
    ("GET", "/api/v1/runs/<run_id>"): RUNS_READ,
    ("GET", "/api/v1/runs/<run_id>/logs"): RUNS_READ,
    ("POST", "/api/v1/runs/<run_id>/cancel"): RUNS_WRITE,
    ("POST", "/api/v1/runs/<run_id>/retry"): RUNS_WRITE,
    ("POST", "/api/v1/runs/<run_id>/restart"): RUNS_WRITE,
    ("POST", "/api/v1/runs/<run_id>/resume"): RUNS_WRITE,
    ("GET", "/api/v1/runs/<run_id>/diff"): RUNS_READ,
    ("POST", "/api/v1/runs/bulk/cancel"): RUNS_WRITE,
    ("POST", "/api/v1/runs/bulk/retry"): RUNS_WRITE,
    ("GET", "/api/v1/bulk-actions/<bulk_id>"): RUNS_READ,
    ("GET", "/api/v1/runs/<run_id>/events"): RUNS_READ,
    ("GET", "/api/v1/events"): RUNS_READ,
    ("GET", "/api/v1/keys"): ADMIN,
    ("POST", "/api/v1/keys"): ADMIN,
    ("POST", "/api/v1/keys/<key_id>/rotate"): ADMIN,
    ("DELETE", "/api/v1/keys/<key_id>"): ADMIN,
    ("GET", "/api/v1/secrets"): SECRETS_WRITE,
    ("PUT", "/api/v1/secrets/<name>"): SECRETS_WRITE,
    ("DELETE", "/api/v1/secrets/<name>"): SECRETS_WRITE,
}
# Public or signature-authenticated: not a key's business.
UNSCOPED = re.compile(r"^/api/v1/(webhooks/|openapi\.json$|docs)")
# A resource the caller names itself: another company's name is the caller's own new resource.
CALLER_NAMED = {("PUT", "/api/v1/secrets/<name>")}
# Bodies and query strings may name the world's own ids (``<run_id>``), filled in by ``World.path``.
QUERIES: dict[tuple[str, str], str] = {("GET", "/api/v1/runs/<run_id>/diff"): "?against=<run_id>"}
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/workflows"): {"name": "posted", "steps": [{"id": "a", "action": "transform"}]},
    ("PUT", "/api/v1/workflows/<workflow_id>"): {
        "name": "put",
        "steps": [{"id": "b", "action": "transform"}],
    },
    ("POST", "/api/v1/workflows/<workflow_id>/runs"): {"input": {}},
    ("POST", "/api/v1/workflows/<workflow_id>/runs/batch"): {"items": [{"input": {}}]},
    ("POST", "/api/v1/runs/<run_id>/restart"): {"fromStepId": "a"},
    ("POST", "/api/v1/runs/<run_id>/resume"): {"approved": True},
    ("POST", "/api/v1/runs/bulk/cancel"): {"runIds": ["<run_id>"]},
    ("POST", "/api/v1/runs/bulk/retry"): {"runIds": ["<run_id>"]},
    ("POST", "/api/v1/keys"): {"name": "posted", "scopes": [RUNS_READ]},
    ("PUT", "/api/v1/secrets/<name>"): {"value": "s3cret-value"},
}


def api_routes(app: Any) -> list[tuple[str, str]]:
    """Every (method, rule) of the URL map under /api/v1 that a key authorizes."""
    found = []
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", rule.rule)
        if not path.startswith("/api/v1/") or UNSCOPED.match(path):
            continue
        found += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


@dataclass
class World:
    """A company with one of everything, its admin key, and one key per single scope."""

    company_id: str
    admin: str
    marker: str
    workflow_id: str = ""
    run_id: str = ""
    key_id: str = ""
    secret_name: str = ""
    bulk_id: str = ""
    only: dict[str, str] = field(default_factory=dict)

    def path(self, rule: str) -> str:
        return (
            rule.replace("<workflow_id>", self.workflow_id)
            .replace("<run_id>", self.run_id)
            .replace("<key_id>", self.key_id)
            .replace("<name>", self.secret_name)
            .replace("<bulk_id>", self.bulk_id)
        )

    def body(self, value: Any) -> Any:
        """A request body with the world's ids in place of their placeholders."""
        if isinstance(value, dict):
            return {k: self.body(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.body(v) for v in value]
        return self.path(value) if isinstance(value, str) else value

    def ids(self) -> list[str]:
        return [self.company_id, self.workflow_id, self.run_id, self.key_id, self.secret_name, self.bulk_id]


def make_world(services: Any, client: Any) -> World:
    marker = f"m{uuid.uuid4().hex}"
    with services.db.session() as session:
        company = factories.company(session)
        world = World(company.id, keys.create_key(session, company, f"admin-{marker}"), marker)
        world.workflow_id = factories.workflow(session, company.id, name=f"wf-{marker}").id
        world.run_id = factories.run(session, world.workflow_id, "failed", input={"marker": marker}).id
        spare, _ = keys.issue_key(session, company.id, f"spare-{marker}", [RUNS_READ])
        world.key_id = spare.id
        world.only = {s: keys.create_key(session, company, f"only-{s}", [s]) for s in SCOPES}
        session.commit()
    # A finished bulk action (its failed run is no cancel's business: none selected, no message).
    selection = bulk.Selection(BulkKind.CANCEL, run_ids=(world.run_id,))
    world.bulk_id = bulk.create(services, world.company_id, selection, {"runIds": [world.run_id]})[0].id
    world.secret_name = f"S_{uuid.uuid4().hex}"  # echoed by a PUT of the same name: not the marker
    response = client.put(
        f"/api/v1/secrets/{world.secret_name}", json={"value": marker}, headers={"x-api-key": world.admin}
    )
    assert response.status_code == 200, response.get_json()
    return world


def call(client: Any, method: str, rule: str, world: World, key: str) -> Any:
    response = client.open(
        world.path(rule + QUERIES.get((method, rule), "")),
        method=method,
        json=world.body(BODIES.get((method, rule))),
        headers={"x-api-key": key},
    )
    response.get_data()  # an event stream is read to its (short) end inside its request context
    response.close()
    return response


def snapshot(client: Any, services: Any, world: World) -> dict[str, Any]:
    """What the company can see of itself (timestamps of use aside), and its cancel flag."""
    headers = {"x-api-key": world.admin}

    def data(path: str) -> Any:
        response = client.get(path, headers=headers)
        assert response.status_code == 200, (path, response.get_json())
        return response.get_json()["data"]

    listed_keys = [{k: v for k, v in key.items() if k != "lastUsedAt"} for key in data("/api/v1/keys")]
    return {
        "workflow": data(f"/api/v1/workflows/{world.workflow_id}"),
        "workflows": data("/api/v1/workflows"),
        "run": data(f"/api/v1/runs/{world.run_id}"),
        "runs": data("/api/v1/runs"),
        "logs": data(f"/api/v1/runs/{world.run_id}/logs"),
        "keys": listed_keys,
        "secrets": data("/api/v1/secrets"),
        "cancel_requested": services.is_cancel_requested(world.run_id),
    }


@pytest.fixture(autouse=True)
def short_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """The company's event stream stays open until its time limit: a short one here, so a test that
    reads a whole answer gets the stream's first moments (its own company's events, or none)."""
    monkeypatch.setattr(api_events, "STREAM_MAX_S", 0.5)


@pytest.fixture
def routes(app: Any) -> list[tuple[str, str]]:
    found = api_routes(app)
    undecided = sorted(set(found) - set(ROUTE_SCOPES))
    assert not undecided, f"routes without a decided scope: {undecided}"
    assert not set(ROUTE_SCOPES) - set(found), "ROUTE_SCOPES names a route the app no longer has"
    return found


def test_every_route_refuses_a_key_without_its_scope(client, services, routes):
    world = make_world(services, client)
    before = snapshot(client, services, world)
    pairs = 0
    for method, rule in routes:
        needed = ROUTE_SCOPES[(method, rule)]
        lacking = [s for s in SCOPES if needed is not None and s not in (needed, ADMIN)]
        for scope in lacking:
            response = call(client, method, rule, world, world.only[scope])
            error = assert_error(response, 403, "FORBIDDEN")
            assert needed in error["message"], error
            pairs += 1
    assert snapshot(client, services, world) == before  # a 403 has no effect
    print(f"\n403 FORBIDDEN: {len(routes)} routes, {pairs} (route, missing scope) pairs")
    assert pairs >= 3 * len([r for r in routes if ROUTE_SCOPES[r] not in (ANY_KEY, ADMIN)])


def test_every_route_admits_a_key_with_its_scope(client, services, routes):
    admitted = 0
    for method, rule in routes:
        needed = ROUTE_SCOPES[(method, rule)]
        holders = list(SCOPES) if needed is ANY_KEY else [needed] + ([ADMIN] if needed != ADMIN else [])
        for scope in holders:
            world = make_world(services, client)  # fresh: the call may delete, rotate or cancel
            response = call(client, method, rule, world, world.only[scope])
            assert response.status_code not in (401, 403), (method, rule, scope, response.get_json())
            assert response.status_code < 500, (method, rule, scope, response.get_json())
            admitted += 1
    print(f"\nadmitted with the route's scope (or admin): {len(routes)} routes, {admitted} calls")


def test_another_companys_admin_key_finds_nothing_and_changes_nothing(client, services, routes):
    victim, intruder = make_world(services, client), make_world(services, client)
    before = snapshot(client, services, victim)
    for method, rule in routes:
        response = call(client, method, rule, victim, intruder.admin)
        text = response.get_data(as_text=True)
        assert victim.marker not in text, (method, rule, text)
        if "<" in rule and (method, rule) not in CALLER_NAMED:
            assert_error(response, 404, "NOT_FOUND")
        else:
            assert response.status_code < 500, (method, rule, text)
            sent = victim.path(rule)
            assert not [i for i in victim.ids() if i in text and i not in sent], (method, rule, text)
    assert snapshot(client, services, victim) == before
    print(f"\nanother company's admin key: {len(routes)} routes, 404 or own data only, no effect")


def test_a_revoked_key_is_refused_on_every_route(client, services, routes):
    world = make_world(services, client)
    with services.db.session() as session:
        doomed_row, doomed = keys.issue_key(session, world.company_id, "doomed")
        session.commit()
        prefix = doomed_row.prefix
    assert call(client, "GET", "/api/v1/keys", world, doomed).status_code == 200
    with services.db.session() as session:
        assert keys.revoke(session, prefix)
    before = snapshot(client, services, world)
    for method, rule in routes:
        assert_error(call(client, method, rule, world, doomed), 401, "UNAUTHORIZED")
    assert snapshot(client, services, world) == before
    print(f"\nrevoked key: {len(routes)} routes, 401")
