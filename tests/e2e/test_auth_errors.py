"""Authentication, tenant isolation, the error envelope, health probes and the OpenAPI document."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests
from sqlalchemy import select

from app import keys
from models import ApiKey
from tests import factories
from tests.conftest import new_key
from tests.spec_shapes import LIST_ITEM_KEYS

INVALID_CANCEL = "Can only cancel running or pending runs"
MIB = 1024 * 1024
RUN_PATHS = ("/api/v1/runs/{id}", "/api/v1/runs/{id}/logs")


# --------------------------------------------------------------------------- helpers


def assert_error(response: Any, status: int, code: str, message: str | None = None) -> dict[str, Any]:
    """The spec's error envelope, and nothing of the server's insides."""
    text = response.get_data(as_text=True) if hasattr(response, "get_data") else response.text
    assert response.status_code == status, (response.status_code, text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = json.loads(text)
    assert set(body) == {"success", "error"}, body
    assert body["success"] is False
    error = body["error"]
    assert {"code", "message"} <= set(error) <= {"code", "message", "details"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if message is not None:
        assert error["message"] == message
    for leak in ("Traceback", 'File "', "sqlalchemy", "psycopg", "werkzeug"):
        assert leak not in text, text
    return error


def make_run(services: Any, client: Any, headers: dict[str, str], status: str = "pending") -> str:
    """A workflow through the API, then a run row in ``status`` written directly (no message)."""
    response = client.post(
        "/api/v1/workflows",
        json={"name": "auth", "steps": [{"id": "s", "action": "transform", "input": {}}]},
        headers=headers,
    )
    assert response.status_code == 201, response.get_json()
    workflow_id = response.get_json()["data"]["id"]
    with services.db.session() as session:
        run = factories.run(session, workflow_id, status, with_steps=False, input={"secret": "tenant-data"})
        session.commit()
    return run.id


def status_of(client: Any, headers: dict[str, str], run_id: str) -> str:
    response = client.get(f"/api/v1/runs/{run_id}", headers=headers)
    assert response.status_code == 200
    return response.get_json()["data"]["status"]


@pytest.fixture
def pending_run(services, client, headers) -> str:
    return make_run(services, client, headers)


# --------------------------------------------------------------------------- authentication


def authed_requests(run_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", "/api/v1/runs"),
        ("GET", "/api/v1/runs?status=failed&limit=20"),
        ("GET", f"/api/v1/runs/{run_id}"),
        ("GET", f"/api/v1/runs/{run_id}/logs"),
        ("POST", f"/api/v1/runs/{run_id}/cancel"),
        ("GET", "/api/v1/workflows"),
        ("POST", "/api/v1/workflows"),
        ("GET", "/api/v1/workflows/wf_anything"),
        ("POST", "/api/v1/workflows/wf_anything/runs"),
    ]


def test_missing_api_key_is_401_everywhere(client, pending_run, headers):
    for method, path in authed_requests(pending_run):
        response = client.open(path, method=method, json={"input": {}})
        assert_error(response, 401, "UNAUTHORIZED")
    # Nothing happened to the run.
    assert status_of(client, headers, pending_run) == "pending"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "garbage",
        "bk_",
        "bk_000000000000_notthesecret",
        "Bearer bk_000000000000_x",
        "bk_" + "a" * 300,
    ],
    ids=["empty", "garbage", "bare-prefix", "unknown-prefix", "bearer", "too-long"],
)
def test_wrong_api_key_is_401(client, pending_run, key):
    for method, path in authed_requests(pending_run):
        response = client.open(path, method=method, json={"input": {}}, headers={"x-api-key": key})
        assert_error(response, 401, "UNAUTHORIZED")


def test_right_prefix_wrong_secret_is_401(client, api_key, pending_run):
    prefix, _, secret = api_key.rpartition("_")
    forged = f"{prefix}_{secret[::-1]}" if secret[::-1] != secret else f"{prefix}_x{secret}"
    assert forged != api_key
    response = client.get(f"/api/v1/runs/{pending_run}", headers={"x-api-key": forged})
    assert_error(response, 401, "UNAUTHORIZED")
    response = client.get(f"/api/v1/runs/{pending_run}", headers={"x-api-key": api_key + "x"})
    assert_error(response, 401, "UNAUTHORIZED")


def test_header_name_is_case_insensitive(client, api_key, pending_run):
    for name in ("x-api-key", "X-API-KEY", "X-Api-Key"):
        response = client.get(f"/api/v1/runs/{pending_run}", headers={name: api_key})
        assert response.status_code == 200, name


def test_key_elsewhere_than_the_header_does_not_authenticate(client, api_key):
    assert_error(client.get("/api/v1/runs", query_string={"x-api-key": api_key}), 401, "UNAUTHORIZED")
    assert_error(
        client.get("/api/v1/runs", headers={"Authorization": f"Bearer {api_key}"}), 401, "UNAUTHORIZED"
    )


def test_revoked_key_is_401(client, services, api_key, pending_run):
    assert client.get(f"/api/v1/runs/{pending_run}", headers={"x-api-key": api_key}).status_code == 200
    prefix = api_key[len(keys.KEY_PREFIX) :].split("_", 1)[0]
    with services.db.session() as session:
        assert keys.revoke(session, prefix)
        revoked_at = session.execute(select(ApiKey.revoked_at).where(ApiKey.prefix == prefix)).scalar_one()
    assert revoked_at is not None
    response = client.get(f"/api/v1/runs/{pending_run}", headers={"x-api-key": api_key})
    assert_error(response, 401, "UNAUTHORIZED")


def test_authentication_comes_before_validation_and_lookup(client):
    """An anonymous caller learns nothing: not whether a run exists, not which parameter is wrong."""
    assert_error(client.get("/api/v1/runs?limit=abc"), 401, "UNAUTHORIZED")
    assert_error(client.get("/api/v1/runs?cursor=!!!"), 401, "UNAUTHORIZED")
    assert_error(client.get(f"/api/v1/runs/run_{uuid.uuid4()}"), 401, "UNAUTHORIZED")
    assert_error(client.get("/api/v1/runs/not-a-run-id/logs"), 401, "UNAUTHORIZED")


def test_401_over_http(live_server):
    response = requests.get(f"{live_server}/api/v1/runs", params={"status": "failed", "limit": 20})
    assert_error(response, 401, "UNAUTHORIZED")
    response = requests.get(f"{live_server}/api/v1/runs", headers={"x-api-key": "wrong"})
    assert_error(response, 401, "UNAUTHORIZED")


# --------------------------------------------------------------------------- tenant isolation


def test_another_companys_run_is_not_found(client, services, headers, pending_run):
    intruder = {"x-api-key": new_key(services)}
    for template in RUN_PATHS:
        response = client.get(template.format(id=pending_run), headers=intruder)
        assert_error(response, 404, "NOT_FOUND", "Run not found")
    response = client.post(f"/api/v1/runs/{pending_run}/cancel", headers=intruder)
    assert_error(response, 404, "NOT_FOUND", "Run not found")
    # The owner still sees it pending: the intruder's cancel did nothing.
    assert status_of(client, headers, pending_run) == "pending"
    assert not services.is_cancel_requested(pending_run)
    listed = client.get("/api/v1/runs", headers=intruder).get_json()
    assert listed == {"success": True, "data": [], "meta": {"cursor": None, "hasMore": False}}


def test_another_companys_finished_run_is_not_found_not_invalid_state(client, services, headers):
    """Cancel of someone else's completed run must not reveal its state."""
    run_id = make_run(services, client, headers, "completed")
    intruder = {"x-api-key": new_key(services)}
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=intruder)
    assert_error(response, 404, "NOT_FOUND", "Run not found")


def test_another_companys_workflow_is_not_found(client, services, headers):
    response = client.post(
        "/api/v1/workflows",
        json={"name": "mine", "steps": [{"id": "s", "action": "transform", "input": {}}]},
        headers=headers,
    )
    workflow_id = response.get_json()["data"]["id"]
    intruder = {"x-api-key": new_key(services)}
    assert_error(client.get(f"/api/v1/workflows/{workflow_id}", headers=intruder), 404, "NOT_FOUND")
    response = client.post(f"/api/v1/workflows/{workflow_id}/runs", json={"input": {}}, headers=intruder)
    assert_error(response, 404, "NOT_FOUND")
    # No run was created for either company.
    assert client.get("/api/v1/runs", headers=headers).get_json()["data"] == []
    assert client.get("/api/v1/runs", headers=intruder).get_json()["data"] == []


@pytest.mark.parametrize(
    "run_id",
    [
        f"run_{uuid.UUID(int=0)}",
        "run_550e8400-e29b-41d4-a716-446655440000",
        "run_123",
        "abc",
        "550e8400-e29b-41d4-a716-446655440000",
        "run_550E8400-E29B-41D4-A716-446655440000",
        "run_550e8400-e29b-41d4-a716-4466554400000",
        "run_550e8400e29b41d4a716446655440000",
        "wf_xxx",
        "run_' OR '1'='1",
        "run_%00",
        "r" * 500,
    ],
)
def test_unknown_or_malformed_run_id_is_not_found(client, headers, run_id):
    for template in RUN_PATHS:
        response = client.get(template.format(id=run_id), headers=headers)
        assert_error(response, 404, "NOT_FOUND", "Run not found")
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert_error(response, 404, "NOT_FOUND", "Run not found")


# --------------------------------------------------------------------------- cancel states


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled", "timeout"])
def test_cancel_of_a_finished_run_is_invalid_state(client, services, headers, status):
    run_id = make_run(services, client, headers, status)
    before = client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json()
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert_error(response, 400, "INVALID_STATE", INVALID_CANCEL)
    assert response.get_json() == {
        "success": False,
        "error": {"code": "INVALID_STATE", "message": INVALID_CANCEL},
    }
    assert client.get(f"/api/v1/runs/{run_id}", headers=headers).get_json() == before


@pytest.mark.parametrize("status", ["pending", "running", "suspended"])
def test_cancel_twice(client, services, headers, status):
    run_id = make_run(services, client, headers, status)
    first = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert first.status_code == 200
    assert first.get_json() == {
        "success": True,
        "data": {"id": run_id, "status": "cancelled", "message": "Run cancellation requested"},
    }
    second = client.post(f"/api/v1/runs/{run_id}/cancel", headers=headers)
    assert_error(second, 400, "INVALID_STATE", INVALID_CANCEL)
    assert status_of(client, headers, run_id) == "cancelled"


# --------------------------------------------------------------------------- routing errors


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/api/v1/nope",
        "/api/v2/runs",
        "/api/v1/run",
        f"/api/v1/runs/run_{uuid.uuid4()}/bogus",
        f"/api/v1/runs/run_{uuid.uuid4()}/logs/extra",
    ],
)
def test_unknown_route_is_a_404_envelope(client, headers, path):
    assert_error(client.get(path, headers=headers), 404, "NOT_FOUND")
    assert_error(client.get(path), 404, "NOT_FOUND")


WRONG_METHODS = [
    ("POST", "/api/v1/runs", "GET"),
    ("DELETE", "/api/v1/runs", "GET"),
    ("DELETE", "/api/v1/runs/{id}", "GET"),
    ("PUT", "/api/v1/runs/{id}", "GET"),
    ("POST", "/api/v1/runs/{id}/logs", "GET"),
    ("GET", "/api/v1/runs/{id}/cancel", "POST"),
    ("DELETE", "/api/v1/runs/{id}/cancel", "POST"),
    ("PATCH", "/api/v1/workflows", "POST"),
]


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS)
def test_wrong_method_is_a_405_envelope(client, headers, pending_run, method, path, allowed):
    url = path.format(id=pending_run)
    for auth in (headers, {}):
        assert_error(client.open(url, method=method, headers=auth), 405, "METHOD_NOT_ALLOWED")
    assert status_of(client, headers, pending_run) == "pending"


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS)
def test_405_names_the_allowed_methods(client, headers, pending_run, method, path, allowed):
    """RFC 9110 15.5.6: a 405 response MUST carry an Allow header."""
    response = client.open(path.format(id=pending_run), method=method, headers=headers)
    assert response.status_code == 405
    assert allowed in {m.strip() for m in response.headers.get("Allow", "").split(",")}, response.headers


def test_routing_errors_over_http(live_server, api_key):
    response = requests.get(f"{live_server}/api/v1/nope", headers={"x-api-key": api_key})
    assert_error(response, 404, "NOT_FOUND")
    response = requests.get(f"{live_server}/api/v1/runs/run_{uuid.uuid4()}/cancel")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")


# --------------------------------------------------------------------------- request bodies


def padded_json(payload: dict[str, Any], size: int) -> bytes:
    raw = json.dumps(payload).encode()
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


WORKFLOW = {"name": "big", "steps": [{"id": "s", "action": "transform", "input": {}}]}


def test_body_over_1_mib_is_413(client, headers):
    body = padded_json(WORKFLOW, MIB + 1)
    response = client.post("/api/v1/workflows", data=body, content_type="application/json", headers=headers)
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    response = client.post(
        "/api/v1/workflows",
        data=json.dumps({**WORKFLOW, "description": "x" * (2 * MIB)}),
        content_type="application/json",
        headers=headers,
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    # Nothing was created.
    assert client.get("/api/v1/workflows", headers=headers).get_json()["data"] == []


def test_body_of_exactly_1_mib_is_accepted(client, headers):
    response = client.post(
        "/api/v1/workflows", data=padded_json(WORKFLOW, MIB), content_type="application/json", headers=headers
    )
    assert response.status_code == 201, response.get_data(as_text=True)[:500]


def test_trigger_body_over_1_mib_is_413(client, headers):
    workflow_id = client.post("/api/v1/workflows", json=WORKFLOW, headers=headers).get_json()["data"]["id"]
    response = client.post(
        f"/api/v1/workflows/{workflow_id}/runs",
        data=json.dumps({"input": {"blob": "x" * MIB}}),
        content_type="application/json",
        headers=headers,
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert client.get("/api/v1/runs", headers=headers).get_json()["data"] == []


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("{not json", "application/json"),
        ('{"name": "x", "steps": [', "application/json"),
        ("", "application/json"),
        ("\xff\xfe", "application/json"),
        (json.dumps(WORKFLOW), "text/plain"),
        (json.dumps(WORKFLOW), None),
        ("[]", "application/json"),
        ('"a string"', "application/json"),
        ("null", "application/json"),
        ("42", "application/json"),
    ],
    ids=[
        "broken",
        "truncated",
        "empty",
        "not-utf8",
        "text-plain",
        "no-content-type",
        "array",
        "string",
        "null",
        "number",
    ],
)
def test_invalid_json_body_to_create_workflow_is_400(client, headers, data, content_type):
    kwargs: dict[str, Any] = {"data": data, "headers": headers}
    if content_type:
        kwargs["content_type"] = content_type
    assert_error(client.post("/api/v1/workflows", **kwargs), 400, "VALIDATION_ERROR")
    assert client.get("/api/v1/workflows", headers=headers).get_json()["data"] == []


def test_invalid_definition_is_400_with_details(client, headers):
    response = client.post("/api/v1/workflows", json={"name": "x"}, headers=headers)
    error = assert_error(response, 400, "VALIDATION_ERROR")
    assert isinstance(error.get("details"), dict) and error["details"]
    response = client.post(
        "/api/v1/workflows",
        json={"name": "x", "steps": [{"id": "s", "action": "no.such.action"}]},
        headers=headers,
    )
    error = assert_error(response, 400, "VALIDATION_ERROR")
    assert error["details"]


@pytest.mark.parametrize(
    "data", ["{not json", "[]", '{"input": "not an object"}', '{"input": {}, "unexpected": 1}']
)
def test_invalid_trigger_body_is_400(client, headers, data):
    workflow_id = client.post("/api/v1/workflows", json=WORKFLOW, headers=headers).get_json()["data"]["id"]
    response = client.post(
        f"/api/v1/workflows/{workflow_id}/runs", data=data, content_type="application/json", headers=headers
    )
    assert_error(response, 400, "VALIDATION_ERROR")
    assert client.get("/api/v1/runs", headers=headers).get_json()["data"] == []


def test_invalid_json_over_http(live_server, api_key):
    response = requests.post(
        f"{live_server}/api/v1/workflows",
        data="{not json",
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    assert_error(response, 400, "VALIDATION_ERROR")


# --------------------------------------------------------------------------- NUL characters
# PostgreSQL text and JSONB cannot hold NUL (U+0000); input carrying one must be answered like any
# other bad input, never by letting the database refuse it (a 500).


def test_api_key_with_nul_is_401(client):
    for key in ("bk_\x00abc_secret", "bk_abc\x00_secret", "\x00"):
        assert_error(client.get("/api/v1/runs", headers={"x-api-key": key}), 401, "UNAUTHORIZED")


def test_workflow_id_with_nul_is_404(client, headers):
    assert_error(client.get("/api/v1/workflows/wf_%00", headers=headers), 404, "NOT_FOUND")
    response = client.post("/api/v1/workflows/wf_%00/runs", json={"input": {}}, headers=headers)
    assert_error(response, 404, "NOT_FOUND")


def test_run_id_with_nul_is_404(client, headers):
    for path in ("/api/v1/runs/run_%00", "/api/v1/runs/run_%00/logs"):
        assert_error(client.get(path, headers=headers), 404, "NOT_FOUND", "Run not found")
    assert_error(client.post("/api/v1/runs/run_%00/cancel", headers=headers), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "payload",
    [
        {**WORKFLOW, "name": "a\u0000b"},
        {**WORKFLOW, "steps": [{"id": "s", "action": "transform", "input": {"k": "\u0000"}}]},
    ],
    ids=["name", "step-input"],
)
def test_workflow_body_with_nul_is_not_a_500(client, headers, payload):
    response = client.post("/api/v1/workflows", json=payload, headers=headers)
    assert response.status_code in (201, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert_error(response, 400, "VALIDATION_ERROR")


def test_trigger_with_nul_is_not_a_500(client, headers):
    workflow_id = client.post("/api/v1/workflows", json=WORKFLOW, headers=headers).get_json()["data"]["id"]
    url = f"/api/v1/workflows/{workflow_id}/runs"
    response = client.post(url, json={"input": {"text": "a\u0000b"}}, headers=headers)
    assert response.status_code in (202, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert_error(response, 400, "VALIDATION_ERROR")
    response = client.post(url, json={"input": {}}, headers={**headers, "Idempotency-Key": "a\x00b"})
    assert response.status_code in (202, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        assert_error(response, 400, "VALIDATION_ERROR")


# --------------------------------------------------------------------------- probes and OpenAPI


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"


def test_readyz_reports_database_and_redis(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"


def test_probes_over_http(live_server):
    assert requests.get(f"{live_server}/healthz").status_code == 200
    response = requests.get(f"{live_server}/readyz")
    assert response.status_code == 200 and response.json()["checks"] == {"database": "ok", "redis": "ok"}


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    return schema


def test_openapi_document(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    expected = {
        "/api/v1/runs": {"get"},
        "/api/v1/runs/{run_id}": {"get"},
        "/api/v1/runs/{run_id}/logs": {"get"},
        "/api/v1/runs/{run_id}/cancel": {"post"},
        "/api/v1/workflows": {"get", "post"},
        "/api/v1/workflows/{workflow_id}": {"get", "put", "delete"},
        "/api/v1/workflows/{workflow_id}/runs": {"post"},
    }
    for path, methods in expected.items():
        assert path in paths, sorted(paths)
        assert methods <= set(paths[path]), (path, sorted(paths[path]))

    # The error envelope is documented: {success: false, error: {code, message, details}}.
    schemas = document["components"]["schemas"]
    envelope = schemas["ErrorEnvelope"]
    assert {"success", "error"} <= set(envelope["properties"])
    assert set(envelope["required"]) >= {"success", "error"}
    body = resolve(document, envelope["properties"]["error"])
    assert {"code", "message", "details"} <= set(body["properties"])
    assert {"code", "message"} <= set(body["required"])

    # Each Runs operation documents that errors come in that envelope.
    for path in ("/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/logs"):
        default = paths[path]["get"]["responses"]["default"]
        if "$ref" in default:
            default = document["components"]["responses"][default["$ref"].rsplit("/", 1)[-1]]
        assert resolve(document, default["content"]["application/json"]["schema"]) == envelope

    # The list query parameters and the x-api-key scheme of the spec.
    params = {p["name"]: p for p in paths["/api/v1/runs"]["get"]["parameters"]}
    assert {"workflowId", "status", "limit", "cursor"} <= set(params)
    assert set(params["status"]["schema"]["enum"]) >= {
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
    }
    schemes = document["components"]["securitySchemes"]
    assert {"type": "apiKey", "in": "header", "name": "x-api-key"} in schemes.values()

    # The list item schema carries the spec's fields.
    item = schemas["RunSummary"]["properties"]
    assert LIST_ITEM_KEYS <= set(item)
