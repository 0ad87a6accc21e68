"""Secrets: the API, the CLI, ``{{ secrets.NAME }}`` in steps, and no value in clear anywhere."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import uuid
from datetime import datetime, timezone
from urllib.parse import quote, quote_plus, unquote

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from models import Secret, Workflow, WorkflowVersion
from tests.conftest import SCHEMA, new_key

SECRET_REF = "{{ secrets.SLACK_TOKEN }}"


def _put(client, headers, name: str, value: object):
    return client.put(f"/api/v1/secrets/{name}", json={"value": value}, headers=headers)


def test_put_list_delete_never_return_the_value(client, headers, services):
    value = f"xoxb-{uuid.uuid4().hex}"
    created = _put(client, headers, "SLACK_TOKEN", value)
    assert created.status_code == 200
    body = created.get_json()
    assert body["success"] is True and set(body["data"]) == {"name", "createdAt", "updatedAt"}
    assert body["data"]["name"] == "SLACK_TOKEN" and value not in created.get_data(as_text=True)

    updated = _put(client, headers, "SLACK_TOKEN", value + "-2").get_json()["data"]
    assert updated["createdAt"] == body["data"]["createdAt"] and updated["updatedAt"] >= updated["createdAt"]
    _put(client, headers, "OTHER", "x")
    listed = client.get("/api/v1/secrets", headers=headers)
    assert listed.status_code == 200
    assert [s["name"] for s in listed.get_json()["data"]] == ["OTHER", "SLACK_TOKEN"]
    assert value not in listed.get_data(as_text=True)

    with services.db.session() as session:
        query = select(Secret.ciphertext).where(Secret.name == "SLACK_TOKEN")
        stored = session.execute(query).scalars().all()
    assert stored and all(value not in token for token in stored)

    deleted = client.delete("/api/v1/secrets/SLACK_TOKEN", headers=headers)
    assert deleted.status_code == 200 and deleted.get_json()["success"] is True
    again = client.delete("/api/v1/secrets/SLACK_TOKEN", headers=headers)
    assert again.status_code == 404 and again.get_json()["error"]["code"] == "NOT_FOUND"
    assert [s["name"] for s in client.get("/api/v1/secrets", headers=headers).get_json()["data"]] == ["OTHER"]


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("1BAD", {"value": "x"}, "name"),
        ("bad-name", {"value": "x"}, "name"),
        ("A" * 65, {"value": "x"}, "name"),
        ("GOOD", {"value": ""}, "value"),
        ("GOOD", {"value": 5}, "value"),
        ("GOOD", {"value": "x" * (64 * 1024 + 1)}, "value"),
        ("GOOD", {}, "value"),
        ("GOOD", {"value": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_names_and_values_are_validation_errors(client, headers, name, body, field):
    response = client.put(f"/api/v1/secrets/{name}", json=body, headers=headers)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and field in error["details"]
    assert client.get("/api/v1/secrets", headers=headers).get_json()["data"] == []


def test_secrets_belong_to_one_company_and_need_a_key(client, headers, services):
    assert _put(client, headers, "MINE", "v").status_code == 200
    other = {"x-api-key": new_key(services, "other")}
    assert client.get("/api/v1/secrets", headers=other).get_json()["data"] == []
    assert client.delete("/api/v1/secrets/MINE", headers=other).status_code == 404
    assert client.get("/api/v1/secrets").status_code == 401
    assert _put(client, {}, "MINE", "v").status_code == 401
    assert [s["name"] for s in client.get("/api/v1/secrets", headers=headers).get_json()["data"]] == ["MINE"]


def test_unknown_secret_in_a_step_is_a_template_error(worker, make_workflow, trigger, wait_run):
    workflow_id = make_workflow([{"id": "a", "action": "transform", "input": {"v": "{{ secrets.MISSING }}"}}])
    run = wait_run(trigger(workflow_id)["id"])
    assert run["status"] == "failed"
    assert run["stepResults"][0]["error"]["code"] == "TEMPLATE_ERROR"


def _leaks(text: str, values: list[str]) -> list[str]:
    return [v for v in values if v in text]


def test_secrets_reach_the_target_and_nowhere_else(
    worker, client, headers, make_workflow, trigger, wait_run, target, caplog
):
    caplog.set_level(logging.DEBUG)
    token = f"xoxb-{uuid.uuid4().hex}/+"
    bearer = f"Bearer xyz{uuid.uuid4().hex}"
    assert _put(client, headers, "SLACK_TOKEN", token).status_code == 200
    target.reply(200, {"echo": token})  # a target that echoes the secret back
    target.reply(404, {"missing": True})
    workflow_id = make_workflow(
        [
            {
                "id": "post",
                "action": "http.request",
                "input": {
                    "method": "POST",
                    "url": target.url + "/hook?token={{ secrets.SLACK_TOKEN }}&channel=ops",
                    "headers": {"Authorization": bearer},
                    "json": {"text": "token {{ secrets.SLACK_TOKEN }} sent", "auth": SECRET_REF},
                },
            },
            {
                "id": "fetch",
                "action": "http.request",
                "input": {"method": "GET", "url": target.url + "/items/{{ secrets.SLACK_TOKEN|urlencode }}"},
            },
        ]
    )
    run_id = trigger(workflow_id)["id"]
    run = wait_run(run_id)
    assert run["status"] == "failed" and run["stepResults"][1]["error"]["code"] == "HTTP_ERROR"

    # The listener received the real values.
    first, second = target.requests
    assert first["headers"]["Authorization"] == bearer
    assert first["json"] == {"text": f"token {token} sent", "auth": token}
    assert unquote(first["path"]) == f"/hook?token={token}&channel=ops"
    assert unquote(second["path"]) == f"/items/{token}"

    values = [token, bearer, bearer.split()[1], quote(token, safe=""), quote_plus(token)]
    responses = {
        "run": client.get(f"/api/v1/runs/{run_id}", headers=headers),
        "logs": client.get(f"/api/v1/runs/{run_id}/logs", headers=headers),
        "list": client.get("/api/v1/runs", headers=headers),
        "list by workflow": client.get(f"/api/v1/runs?workflowId={workflow_id}", headers=headers),
        "dry run": client.post(
            f"/api/v1/runs/{run_id}/restart", json={"fromStepId": "fetch", "dryRun": True}, headers=headers
        ),
        "workflow": client.get(f"/api/v1/workflows/{workflow_id}", headers=headers),
        "workflows": client.get("/api/v1/workflows", headers=headers),
    }
    for name, response in responses.items():
        assert response.status_code == 200, (name, response.get_json())
        assert _leaks(response.get_data(as_text=True), values) == [], name
    shown = json.dumps(responses["run"].get_json())
    assert "[REDACTED]" in shown and run_id in json.dumps(responses["dry run"].get_json())
    post = responses["run"].get_json()["data"]["stepResults"][0]
    assert post["input"]["headers"]["Authorization"] == "[REDACTED]"
    assert post["output"]["body"] == {"echo": "[REDACTED]"}

    dump = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "root", "-d", "test", "--data-only", f"--schema={SCHEMA}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert run_id in dump and workflow_id in dump  # the dump holds this run
    assert _leaks(dump, values) == []

    assert worker is not None and caplog.records  # the worker's log lines were captured
    assert _leaks(caplog.text, values) == []
    assert _leaks(" ".join(str(r.args) for r in caplog.records), values) == []


WEBHOOK_SECRET = "whsec_" + base64.b64encode(uuid.uuid4().bytes * 2).decode()


def _signed(secret: str, body: str) -> dict[str, str]:
    msg_id, at = f"msg_{uuid.uuid4().hex}", datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
        "content-type": "application/json",
    }


def test_webhook_secrets_are_stored_encrypted_and_still_verify(client, headers, make_workflow, services):
    old = "whsec_" + base64.b64encode(b"an-older-secret-of-32-bytes-ok!!").decode()
    workflow_id = make_workflow(
        [{"id": "a", "action": "transform", "input": {}}],
        triggers={"webhook": {"scheme": "standard", "secrets": [WEBHOOK_SECRET, old]}},
    )
    with services.db.session() as session:
        stored = session.execute(
            select(WorkflowVersion.definition)
            .join(Workflow, Workflow.key == WorkflowVersion.workflow_key)
            .where(Workflow.id == workflow_id)
        ).scalar_one()
    assert WEBHOOK_SECRET not in json.dumps(stored) and old not in json.dumps(stored)
    assert all(s.startswith("{{ secrets._WEBHOOK_") for s in stored["triggers"]["webhook"]["secrets"])

    shown = client.get(f"/api/v1/workflows/{workflow_id}", headers=headers).get_json()["data"]
    assert shown["triggers"]["webhook"]["secrets"] == ["…", "…"]
    for secret in (WEBHOOK_SECRET, old):
        body = json.dumps({"id": uuid.uuid4().hex})
        sent = client.post(f"/api/v1/webhooks/{workflow_id}", data=body, headers=_signed(secret, body))
        assert sent.status_code == 202, sent.get_json()
    wrong = "whsec_" + base64.b64encode(b"x" * 32).decode()
    refused = client.post(f"/api/v1/webhooks/{workflow_id}", data="{}", headers=_signed(wrong, "{}"))
    assert refused.status_code == 401

    # A definition sent back as GET showed it keeps the secrets.
    definition = {k: shown[k] for k in ("name", "steps", "triggers")}
    assert client.put(f"/api/v1/workflows/{workflow_id}", json=definition, headers=headers).status_code == 200
    body = json.dumps({"again": True})
    again = client.post(f"/api/v1/webhooks/{workflow_id}", data=body, headers=_signed(WEBHOOK_SECRET, body))
    assert again.status_code == 202, again.get_json()


def test_literal_header_is_stored_as_a_reference_and_kept_on_round_trip(
    client, headers, make_workflow, services
):
    literal = f"Bearer lit{uuid.uuid4().hex}"
    step = {
        "id": "a",
        "action": "http.request",
        "input": {"url": "https://h.example/", "headers": {"Cookie": literal}},
    }
    workflow_id = make_workflow([step])
    shown = client.get(f"/api/v1/workflows/{workflow_id}", headers=headers).get_json()["data"]
    reference = shown["steps"][0]["input"]["headers"]["Cookie"]
    assert reference.startswith("{{ secrets._HEADER_") and literal not in json.dumps(shown)
    names = [s["name"] for s in client.get("/api/v1/secrets", headers=headers).get_json()["data"]]
    assert names == [reference[len("{{ secrets.") : -len(" }}")]]
    # A GET body whose header shows [REDACTED] (a version stored before) keeps the stored value.
    shown["steps"][0]["input"]["headers"]["Cookie"] = "[REDACTED]"
    definition = {k: shown[k] for k in ("name", "steps")}
    replaced = client.put(f"/api/v1/workflows/{workflow_id}", json=definition, headers=headers)
    assert replaced.get_json()["data"]["steps"][0]["input"]["headers"]["Cookie"] == reference
