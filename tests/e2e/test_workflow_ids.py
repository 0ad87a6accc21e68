"""Workflow ids are per company: no probing or squatting another company's id, and a deleted id can
be used again without touching the runs, versions, schedules or deliveries of the one it replaced."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid

from tests.conftest import new_key, wait_for

URL = "/api/v1/workflows"


def _steps(value: str) -> list[dict[str, object]]:
    return [{"id": "say", "action": "transform", "input": {"said": value}}]


def _wid() -> str:
    return f"wf_acme-{uuid.uuid4().hex[:8]}"


def _create(client, key: str, wid: str, value: str, **extra: object):
    body = {"id": wid, "name": "flow", "steps": _steps(value), **extra}
    return client.post(URL, json=body, headers={"x-api-key": key})


def test_two_companies_may_use_the_same_id_and_never_see_each_other(client, services, worker):
    acme, other = new_key(services, "acme"), new_key(services, "other")
    wid = _wid()
    assert _create(client, acme, wid, "acme").status_code == 201
    second = _create(client, other, wid, "other")
    assert second.status_code == 201, "another company's id is no conflict (nothing to probe or squat)"
    assert second.get_json()["data"]["id"] == wid
    again = _create(client, acme, wid, "acme again")
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "CONFLICT"

    for key, said in ((acme, "acme"), (other, "other")):
        shown = client.get(f"{URL}/{wid}", headers={"x-api-key": key}).get_json()["data"]
        assert shown["steps"][0]["input"] == {"said": said}
        started = client.post(f"{URL}/{wid}/runs", json={"input": {}}, headers={"x-api-key": key})
        assert started.status_code == 202, started.get_json()
        run = started.get_json()["data"]
        wait_for(
            lambda run_id=run["id"], key=key: (
                client.get(f"/api/v1/runs/{run_id}", headers={"x-api-key": key}).get_json()["data"]["status"]
                == "completed"
            ),
            what="the run to complete",
        )
        done = client.get(f"/api/v1/runs/{run['id']}", headers={"x-api-key": key}).get_json()["data"]
        assert done["output"] == {"said": said}, "each run executes its own company's definition"
        listed = client.get(f"/api/v1/runs?workflowId={wid}", headers={"x-api-key": key}).get_json()["data"]
        assert [r["id"] for r in listed] == [run["id"]]

    # Replacing and deleting one company's workflow leaves the other's alone.
    replaced = client.put(
        f"{URL}/{wid}", json={"name": "flow", "steps": _steps("v2")}, headers={"x-api-key": acme}
    )
    assert replaced.status_code == 200 and replaced.get_json()["data"]["version"] == 2
    assert client.delete(f"{URL}/{wid}", headers={"x-api-key": acme}).status_code == 200
    kept = client.get(f"{URL}/{wid}", headers={"x-api-key": other}).get_json()["data"]
    assert kept["version"] == 1 and kept["steps"][0]["input"] == {"said": "other"}


def test_a_deleted_id_can_be_used_again_and_old_runs_keep_their_workflow(client, services, worker):
    key = new_key(services, "reuse")
    headers = {"x-api-key": key}
    wid = _wid()
    assert _create(client, key, wid, "first").status_code == 201
    old = client.post(f"{URL}/{wid}/runs", json={"input": {}}, headers={**headers, "Idempotency-Key": "k1"})
    old_id = old.get_json()["data"]["id"]
    wait_for(
        lambda: (
            client.get(f"/api/v1/runs/{old_id}", headers=headers).get_json()["data"]["status"] == "completed"
        ),
        what="the first workflow's run",
    )
    assert client.delete(f"{URL}/{wid}", headers=headers).status_code == 200
    assert client.get(f"{URL}/{wid}", headers=headers).status_code == 404

    reused = _create(client, key, wid, "second")
    assert reused.status_code == 201, reused.get_json()
    assert reused.get_json()["data"]["version"] == 1, "a new workflow, not a new version of the old one"

    # The same Idempotency-Key belongs to the old workflow: the new one starts a run of its own.
    new = client.post(f"{URL}/{wid}/runs", json={"input": {}}, headers={**headers, "Idempotency-Key": "k1"})
    assert new.status_code == 202 and new.get_json()["data"]["id"] != old_id
    new_id = new.get_json()["data"]["id"]
    wait_for(
        lambda: (
            client.get(f"/api/v1/runs/{new_id}", headers=headers).get_json()["data"]["status"] == "completed"
        ),
        what="the second workflow's run",
    )
    assert client.get(f"/api/v1/runs/{new_id}", headers=headers).get_json()["data"]["output"] == {
        "said": "second"
    }
    # A restart of the old run replays the definition it ran with, not the new workflow's.
    restarted = client.post(f"/api/v1/runs/{old_id}/restart", json={"fromStepId": "say"}, headers=headers)
    assert restarted.status_code == 202, restarted.get_json()
    again_id = restarted.get_json()["data"]["newRunId"]
    wait_for(
        lambda: (
            client.get(f"/api/v1/runs/{again_id}", headers=headers).get_json()["data"]["status"]
            == "completed"
        ),
        what="the restarted old run",
    )
    assert client.get(f"/api/v1/runs/{again_id}", headers=headers).get_json()["data"]["output"] == {
        "said": "first"
    }


def test_webhooks_reach_the_company_whose_secret_verifies(client, services, worker):
    acme, other = new_key(services, "hook-a"), new_key(services, "hook-b")
    wid = _wid()
    for key, secret in ((acme, "acme-secret-1234"), (other, "other-secret-5678")):
        hook = {"webhook": {"scheme": "hmac-sha256", "secret": secret, "header": "X-Sig"}}
        assert _create(client, key, wid, secret, triggers=hook).status_code == 201
    body = json.dumps({"n": uuid.uuid4().hex}).encode()
    signature = hmac.new(b"other-secret-5678", body, hashlib.sha256).hexdigest()
    sent = client.post(
        f"/api/v1/webhooks/{wid}", data=body, headers={"X-Sig": signature, "content-type": "application/json"}
    )
    assert sent.status_code == 202, sent.get_json()
    run_id = sent.get_json()["data"]["runId"]
    assert client.get(f"/api/v1/runs/{run_id}", headers={"x-api-key": other}).status_code == 200
    assert client.get(f"/api/v1/runs/{run_id}", headers={"x-api-key": acme}).status_code == 404
    logged = client.get(f"{URL}/{wid}/deliveries", headers={"x-api-key": other}).get_json()["data"]
    assert [d["runId"] for d in logged] == [run_id]
    assert client.get(f"{URL}/{wid}/deliveries", headers={"x-api-key": acme}).get_json()["data"] == []
