"""The keys API and CLI: create with scopes, list, rotate, revoke; old keys are admin; revocation
reaches another process (a gunicorn ``baton api``) within a second."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import text

from app import keys
from app.cli import cli
from app.db import Database
from app.migrate import upgrade
from tests.conftest import SCHEMA, after_revoking, baton_api, new_key
from tests.e2e.test_auth_errors import assert_error

PUBLIC_FIELDS = {"id", "prefix", "name", "scopes", "createdAt", "lastUsedAt"}


def create(client: Any, headers: dict[str, str], body: Any) -> Any:
    return client.post("/api/v1/keys", json=body, headers=headers)


def listed(client: Any, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/api/v1/keys", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]


def test_create_shows_the_key_once_and_list_never_shows_it(client, headers):
    response = create(client, headers, {"name": "reader", "scopes": ["runs:read"]})
    assert response.status_code == 201, response.get_json()
    data = response.get_json()["data"]
    assert set(data) == PUBLIC_FIELDS | {"key"}
    assert data["name"] == "reader" and data["scopes"] == ["runs:read"] and data["lastUsedAt"] is None
    assert data["key"].startswith(f"bk_{data['prefix']}_")
    reader = {"x-api-key": data["key"]}
    assert client.get("/api/v1/runs", headers=reader).status_code == 200
    assert_error(client.post("/api/v1/workflows", json={}, headers=reader), 403, "FORBIDDEN")
    body = client.get("/api/v1/keys", headers=headers)
    raw = body.get_data(as_text=True)
    secret = data["key"].split("_", 2)[2]  # the secret itself may contain "_"
    assert secret not in raw and keys._digest(data["key"]) not in raw
    rows = {row["id"]: row for row in body.get_json()["data"]}
    assert all(set(row) == PUBLIC_FIELDS for row in rows.values())
    assert rows[data["id"]]["scopes"] == ["runs:read"]
    assert rows[data["id"]]["lastUsedAt"] is not None  # the reader was used above


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "x", "scopes": ["runs:read", "root"]}, "scopes.1"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x"}, "scopes"),
        ({"name": "x", "scopes": "admin"}, "scopes"),
        ({"name": "", "scopes": ["admin"]}, "name"),
    ],
    ids=["unknown", "empty", "missing", "not-a-list", "empty-name"],
)
def test_bad_scopes_are_400_and_create_nothing(client, headers, body, field):
    before = listed(client, headers)
    error = assert_error(create(client, headers, body), 400, "VALIDATION_ERROR")
    assert field in error["details"], error
    assert listed(client, headers) == before


def test_only_admin_manages_keys(client, services, headers):
    with services.db.session() as session:
        company_id = keys.authenticate(session, headers["x-api-key"]).company_id
        row, everything_but_admin = keys.issue_key(session, company_id, "ops", keys.SCOPES[:-1])
        session.commit()
    ops = {"x-api-key": everything_but_admin}
    assert_error(client.get("/api/v1/keys", headers=ops), 403, "FORBIDDEN")
    assert_error(create(client, ops, {"name": "x", "scopes": ["admin"]}), 403, "FORBIDDEN")
    assert_error(client.post(f"/api/v1/keys/{row.id}/rotate", headers=ops), 403, "FORBIDDEN")
    assert_error(client.delete(f"/api/v1/keys/{row.id}", headers=ops), 403, "FORBIDDEN")
    assert client.get("/api/v1/runs", headers=ops).status_code == 200  # the key itself still works


def test_rotate_keeps_name_and_scopes_and_retires_the_old_key(client, headers):
    old = create(client, headers, {"name": "deploy", "scopes": ["runs:write", "runs:read"]}).get_json()[
        "data"
    ]
    assert client.get("/api/v1/runs", headers={"x-api-key": old["key"]}).status_code == 200
    response = client.post(f"/api/v1/keys/{old['id']}/rotate", headers=headers)
    assert response.status_code == 201, response.get_json()
    new = response.get_json()["data"]
    assert new["name"] == "deploy" and new["scopes"] == ["runs:read", "runs:write"]
    assert new["id"] != old["id"] and new["prefix"] != old["prefix"] and new["key"] != old["key"]
    assert client.get("/api/v1/runs", headers={"x-api-key": new["key"]}).status_code == 200
    assert_error(client.get("/api/v1/runs", headers={"x-api-key": old["key"]}), 401, "UNAUTHORIZED")
    ids = [row["id"] for row in listed(client, headers)]
    assert new["id"] in ids and old["id"] not in ids
    assert_error(client.post(f"/api/v1/keys/{old['id']}/rotate", headers=headers), 404, "NOT_FOUND")


def test_delete_revokes_at_once(client, headers):
    made = create(client, headers, {"name": "temp", "scopes": ["admin"]}).get_json()["data"]
    temp = {"x-api-key": made["key"]}
    assert client.get("/api/v1/keys", headers=temp).status_code == 200
    response = client.delete(f"/api/v1/keys/{made['id']}", headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["data"]["id"] == made["id"] and "key" not in response.get_json()["data"]
    assert_error(client.get("/api/v1/keys", headers=temp), 401, "UNAUTHORIZED")
    assert made["id"] not in [row["id"] for row in listed(client, headers)]
    assert_error(client.delete(f"/api/v1/keys/{made['id']}", headers=headers), 404, "NOT_FOUND")


def test_another_companys_key_cannot_be_rotated_or_revoked(client, services, headers):
    victim = create(client, headers, {"name": "victim", "scopes": ["runs:read"]}).get_json()["data"]
    intruder = {"x-api-key": new_key(services)}
    assert_error(client.post(f"/api/v1/keys/{victim['id']}/rotate", headers=intruder), 404, "NOT_FOUND")
    assert_error(client.delete(f"/api/v1/keys/{victim['id']}", headers=intruder), 404, "NOT_FOUND")
    assert victim["id"] not in [row["id"] for row in listed(client, intruder)]
    assert client.get("/api/v1/runs", headers={"x-api-key": victim["key"]}).status_code == 200


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def run_cli(config: Any) -> Any:
    """Key administration is local: the CLI reaches the session's database through DATABASE_URL."""

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), env={"DATABASE_URL": config.database_url})

    return invoke


def test_cli_creates_scoped_keys_and_lists_them(run_cli, client):
    company = f"cli-{uuid.uuid4().hex[:10]}"
    result = run_cli(
        "keys", "create", "--company", company, "--scopes", "runs:read,runs:write", "--name", "ci"
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert result.stdout == key + "\n"
    assert client.get("/api/v1/runs", headers={"x-api-key": key}).status_code == 200
    assert_error(client.get("/api/v1/keys", headers={"x-api-key": key}), 403, "FORBIDDEN")
    admin = run_cli("keys", "create", "--company", company).stdout.strip()
    assert client.get("/api/v1/keys", headers={"x-api-key": admin}).status_code == 200
    listing = run_cli("keys", "list", "--company", company)
    assert listing.exit_code == 0, listing.output
    lines = [line.split("\t") for line in listing.stdout.splitlines()]
    assert {(fields[1], fields[2]) for fields in lines} == {
        ("ci", "runs:read,runs:write"),
        ("default", "admin"),
    }
    _, prefix, secret = key.split("_", 2)  # the secret itself may contain "_"
    assert prefix in listing.stdout and secret not in listing.stdout


def test_cli_refuses_unknown_scopes_in_one_line(run_cli):
    company = f"cli-{uuid.uuid4().hex[:10]}"
    result = run_cli("keys", "create", "--company", company, "--scopes", "runs:read,everything")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "VALIDATION_ERROR" in result.stderr and "everything" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- migration


def test_keys_made_before_scopes_existed_are_admin(config):
    """A key row written by the 0003 schema (no scopes column) is an admin key after upgrading."""
    schema = f"baton_mig_{uuid.uuid4().hex[:8]}"
    db = Database(config.with_overrides(database_url=str(config.database_url).replace(SCHEMA, schema)))
    with db.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        upgrade(db, "0003")
        key = "bk_0123456789ab_before-scopes-existed"
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO companies (id, name, created_at) VALUES ('co_old', 'old', now())"))
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, company_id, name, prefix, hash, created_at) "
                    "VALUES ('key_old', 'co_old', 'old', '0123456789ab', :hash, now())"
                ),
                {"hash": keys._digest(key)},
            )
        upgrade(db)
        with db.session() as session:
            principal = keys.authenticate(session, key)
            assert principal is not None and principal.scopes == {"admin"}
            assert all(principal.allows(scope) for scope in keys.SCOPES)
            assert [keys.scope_list(row) for row in keys.list_keys(session, "co_old")] == [["admin"]]
    finally:
        db.dispose()
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        db.dispose()


# --------------------------------------------------------------------------- revocation across processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def api_process(config: Any, tmp_path: Path) -> Iterator[str]:
    """``baton api`` (gunicorn, two worker processes) on the session's database and Redis."""
    with baton_api(config, tmp_path / "api.log", workers=2) as (base, _proc):
        yield base


def test_revocation_reaches_another_process_within_one_second(services, api_process):
    key = new_key(services)

    def status() -> int:
        return requests.get(f"{api_process}/api/v1/runs", headers={"x-api-key": key}, timeout=5).status_code

    accepted, late = after_revoking(services, key, status, ok=200, warm=30)
    print(
        f"\nrevocation: last accepted {max(accepted, default=0) * 1000:.0f} ms after the commit; "
        f"{len(accepted)} accepted"
    )
    assert max(accepted, default=0) < 1.0
    assert len(late) >= 10 and set(late) == {401}
