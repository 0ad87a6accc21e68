"""Webhook replay and refusals: deduplication on what the signature covers, timestamp tolerances,
and one identical 401 for every reason a delivery is refused (no existence oracle)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from standardwebhooks import Webhook

from app import webhooks
from models import WebhookDelivery

STANDARD_SECRET = "whsec_" + base64.b64encode(b"replay-tests-standard-secret-32b").decode()
PLAIN = "replay-tests-plain-secret"
URL = "/api/v1/webhooks/{}"


def _hooked(make_workflow, webhook):
    return make_workflow(
        [{"id": "echo", "action": "transform", "input": {"got": "{{ input }}"}}],
        triggers={"webhook": webhook},
    )


def _run_count(services, wid):
    from models import Run

    with services.db.session() as session:
        return session.execute(
            select(func.count()).select_from(Run).where(Run.workflow_id == wid)
        ).scalar_one()


def _delivery_rows(services, wid):
    with services.db.session() as session:
        query = select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.workflow_id == wid)
        return session.execute(query).scalar_one()


def _hex(secret, payload):
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def _standard(body, msg_id=None, at=None, secret=STANDARD_SECRET):
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
        "content-type": "application/json",
    }


def _stripe(body, at=None, secret=PLAIN):
    at = int(at or time.time())
    signature = _hex(secret, f"{at}.".encode() + body)
    return {"Stripe-Signature": f"t={at},v1={signature}", "content-type": "application/json"}


# --------------------------------------------------------------------------- replay


def test_github_replay_with_new_delivery_headers_makes_no_new_run(worker, client, services, make_workflow):
    wid = _hooked(make_workflow, {"scheme": "github", "secret": PLAIN})
    body = json.dumps({"action": "opened", "n": uuid.uuid4().hex}).encode()
    signed = {"X-Hub-Signature-256": "sha256=" + _hex(PLAIN, body), "content-type": "application/json"}
    first = client.post(
        URL.format(wid), data=body, headers={**signed, "X-GitHub-Delivery": str(uuid.uuid4())}
    )
    assert first.status_code == 202, first.get_json()
    run_id = first.get_json()["data"]["runId"]
    for replayed in ({"X-GitHub-Delivery": str(uuid.uuid4())} for _ in range(3)):
        again = client.post(URL.format(wid), data=body, headers={**signed, **replayed})
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["data"]["runId"] == run_id and again.get_json()["data"]["duplicate"] is True
    no_header = client.post(URL.format(wid), data=body, headers=signed)
    assert no_header.status_code == 200 and no_header.get_json()["data"]["runId"] == run_id
    assert _run_count(services, wid) == 1

    other = json.dumps({"action": "closed"}).encode()
    sent = {"X-Hub-Signature-256": "sha256=" + _hex(PLAIN, other), "X-GitHub-Delivery": str(uuid.uuid4())}
    assert client.post(URL.format(wid), data=other, headers=sent).status_code == 202, "another body is new"
    assert _run_count(services, wid) == 2


@pytest.mark.parametrize("id_header", ["X-Delivery-Id", "Idempotency-Key"])
def test_hmac_replay_with_new_delivery_headers_makes_no_new_run(
    worker, client, services, make_workflow, id_header
):
    wid = _hooked(make_workflow, {"scheme": "hmac-sha256", "secret": PLAIN, "header": "X-Sig"})
    body = b"plain text payload " + uuid.uuid4().hex.encode()
    sent = {"X-Sig": _hex(PLAIN, body), "content-type": "text/plain"}
    first = client.post(URL.format(wid), data=body, headers={**sent, id_header: "dlv-1"})
    assert first.status_code == 202, first.get_json()
    for n in range(2, 5):
        again = client.post(URL.format(wid), data=body, headers={**sent, id_header: f"dlv-{n}"})
        assert again.status_code == 200, again.get_json()
        assert again.get_json()["data"]["runId"] == first.get_json()["data"]["runId"]
    assert _run_count(services, wid) == 1

    other = body + b"!"
    assert client.post(URL.format(wid), data=other, headers={"X-Sig": _hex(PLAIN, other)}).status_code == 202
    assert _run_count(services, wid) == 2


def test_standard_dedupes_on_the_signed_webhook_id(worker, client, services, make_workflow):
    wid = _hooked(make_workflow, {"scheme": "standard", "secret": STANDARD_SECRET})
    body = json.dumps({"n": 1})
    sent = _standard(body)
    first = client.post(URL.format(wid), data=body, headers=sent)
    again = client.post(URL.format(wid), data=body, headers=sent)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["data"]["runId"] == first.get_json()["data"]["runId"]
    # A new id is only accepted signed: the sender's own retry of the same body is a new delivery.
    tampered = {**sent, "webhook-id": "msg_replayed"}
    assert client.post(URL.format(wid), data=body, headers=tampered).status_code == 401
    assert client.post(URL.format(wid), data=body, headers=_standard(body)).status_code == 202
    assert _run_count(services, wid) == 2


def test_stripe_dedupes_on_the_signed_event_id(worker, client, services, make_workflow):
    wid = _hooked(make_workflow, {"scheme": "stripe", "secret": PLAIN})
    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}", "type": "invoice.paid"}).encode()
    first = client.post(URL.format(wid), data=body, headers=_stripe(body, at=time.time() - 30))
    resigned = client.post(URL.format(wid), data=body, headers=_stripe(body))  # Stripe's own retry
    assert (first.status_code, resigned.status_code) == (202, 200)
    assert resigned.get_json()["data"]["runId"] == first.get_json()["data"]["runId"]
    assert _run_count(services, wid) == 1


def test_long_signed_ids_are_hashed_not_cut():
    config = {"scheme": "standard"}
    a, b = "msg_" + "x" * 300 + "a", "msg_" + "x" * 300 + "b"
    assert webhooks.dedupe_key(config, a, b"{}") != webhooks.dedupe_key(config, b, b"{}")
    assert len(webhooks.dedupe_key(config, a, b"{}")) <= 255
    github = {"scheme": "github"}
    assert webhooks.dedupe_key(github, "d-1", b"{}") == webhooks.dedupe_key(github, "d-2", b"{}")


# --------------------------------------------------------------------------- timestamp tolerance


@pytest.mark.parametrize("minutes", [-6, 6, -60, 60 * 24])
def test_standard_stale_or_future_timestamps_are_refused(worker, client, services, make_workflow, minutes):
    wid = _hooked(make_workflow, {"scheme": "standard", "secret": STANDARD_SECRET})
    body = json.dumps({"n": minutes})
    at = datetime.now(timezone.utc) + timedelta(minutes=minutes)
    assert client.post(URL.format(wid), data=body, headers=_standard(body, at=at)).status_code == 401
    inside = datetime.now(timezone.utc) + timedelta(minutes=4 if minutes > 0 else -4)
    assert client.post(URL.format(wid), data=body, headers=_standard(body, at=inside)).status_code == 202
    assert _run_count(services, wid) == 1


@pytest.mark.parametrize("offset_s", [-400, 400, -86_400])
def test_stripe_stale_or_future_timestamps_are_refused(worker, client, services, make_workflow, offset_s):
    wid = _hooked(make_workflow, {"scheme": "stripe", "secret": PLAIN})
    body = json.dumps({"id": f"evt_{uuid.uuid4().hex}"}).encode()
    stale = client.post(URL.format(wid), data=body, headers=_stripe(body, at=time.time() + offset_s))
    assert stale.status_code == 401
    inside = time.time() + (240 if offset_s > 0 else -240)
    assert client.post(URL.format(wid), data=body, headers=_stripe(body, at=inside)).status_code == 202
    assert _run_count(services, wid) == 1


# --------------------------------------------------------------------------- uniform refusal


def test_every_refusal_is_the_same_401(client, services, headers, make_workflow):
    body = json.dumps({"n": 1})
    live = _hooked(make_workflow, {"scheme": "standard", "secret": STANDARD_SECRET})
    no_trigger = make_workflow([{"id": "a", "action": "transform"}])
    deleted = _hooked(make_workflow, {"scheme": "standard", "secret": STANDARD_SECRET})
    assert client.delete(f"/api/v1/workflows/{deleted}", headers=headers).status_code == 200
    signed = _standard(body)
    stale = _standard(body, at=datetime.now(timezone.utc) - timedelta(minutes=10))
    unsigned = {k: v for k, v in signed.items() if k != "webhook-signature"}
    wrong = _standard(body, secret="whsec_" + base64.b64encode(b"w" * 32).decode())
    cases = {
        "no such workflow": ("wf_no-such-workflow-" + uuid.uuid4().hex[:8], signed),
        "malformed id": ("not-a-workflow-id", signed),
        "no webhook trigger": (no_trigger, signed),
        "deleted workflow": (deleted, signed),
        "bad signature": (live, wrong),
        "missing signature": (live, unsigned),
        "stale signature": (live, stale),
        "altered body": (live, _standard(body.replace("1", "2"))),
    }
    answers = {}
    for why, (wid, sent) in cases.items():
        response = client.post(URL.format(wid), data=body, headers=sent)
        answers[why] = (response.status_code, response.data, sorted(response.headers.items()))
    first = answers["no such workflow"]
    assert first[0] == 401 and json.loads(first[1])["error"] == {
        "code": "UNAUTHORIZED",
        "message": "Invalid webhook signature",
    }
    for why, answer in answers.items():
        assert answer == first, why
    assert client.post(URL.format(live), data=body, headers=signed).status_code == 202, "the live one works"


def test_no_delivery_log_for_a_workflow_that_does_not_exist(client, services, headers, make_workflow):
    missing = "wf_gone-" + uuid.uuid4().hex[:12]
    deleted = _hooked(make_workflow, {"scheme": "hmac-sha256", "secret": PLAIN})
    assert client.delete(f"/api/v1/workflows/{deleted}", headers=headers).status_code == 200
    live = _hooked(make_workflow, {"scheme": "hmac-sha256", "secret": PLAIN})
    for wid in (missing, deleted, live):
        for n in range(3):
            assert (
                client.post(URL.format(wid), json={"n": n}, headers={"x-signature": "00"}).status_code == 401
            )
    assert _delivery_rows(services, missing) == 0
    assert _delivery_rows(services, deleted) == 0
    assert _delivery_rows(services, live) == 3, "a refusal to a live workflow is still logged"
