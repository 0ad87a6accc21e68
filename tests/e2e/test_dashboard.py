"""Dashboard: sign-in sessions (cookie flags, CSRF, sign-out, revocation), pages, docs UI, offline assets."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import pytest
from sqlalchemy import update

from api.dashboard import sessions
from app.timeutil import utcnow
from models import ApiKey
from tests.conftest import new_key, wait_for

EXTERNAL = re.compile(r"""https?://[^\s"'<>)]+""")
# XML namespace names identify a vocabulary; a browser never fetches them.
NAMESPACES = ("http://www.w3.org/",)


def sign_in(client: Any, key: str) -> str:
    """Sign in through the form, as a browser would; the page's CSRF token."""
    form = client.get("/dashboard/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = client.post("/dashboard/login", data={"csrf_token": token, "api_key": key})
    assert answer.status_code == 302, answer.text
    page = client.get("/dashboard")
    assert page.status_code == 200
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def session_key(services: Any, client: Any) -> str:
    sid = client.get_cookie(sessions.COOKIE).value
    return services.key("dashboard", "session", hashlib.sha256(sid.encode()).hexdigest())


@pytest.fixture
def failing_workflow(make_workflow: Any) -> str:
    return make_workflow(
        [
            {"id": "prepare", "action": "transform", "input": {"n": "{{ input.n }}"}},
            {"id": "charge", "action": "transform", "input": {"card": "{{ input.card }}"}},
        ]
    )


def test_root_redirects_to_the_dashboard_which_asks_to_sign_in(client: Any) -> None:
    root = client.get("/")
    assert root.status_code == 302 and root.headers["Location"].endswith("/dashboard")
    page = client.get("/dashboard/runs/run_x?a=1")
    assert page.status_code == 302
    assert "/dashboard/login?next=" in page.headers["Location"]


def test_sign_in_keeps_the_key_on_the_server_behind_an_opaque_cookie(
    client: Any, services: Any, api_key: str
) -> None:
    sign_in(client, api_key)
    cookie = client.get_cookie(sessions.COOKIE)
    assert cookie.http_only and cookie.same_site == "Lax"
    assert not cookie.secure, "plain http on loopback: a Secure cookie would never come back"
    assert api_key not in cookie.value and len(cookie.value) >= 40
    stored = services.redis.get(session_key(services, client))
    assert stored is not None and api_key.encode() not in stored
    assert 0 < services.redis.ttl(session_key(services, client)) <= sessions.TTL_S
    assert set(json.loads(stored)) == {"key_id", "company_id", "company_name", "key_label", "csrf"}


@pytest.mark.parametrize("base_url", ["https://localhost", "http://baton.example"])
def test_the_cookie_is_secure_unless_plain_http_on_loopback(app: Any, api_key: str, base_url: str) -> None:
    client = app.test_client()
    form = client.get("/dashboard/login", base_url=base_url)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    answer = client.post(
        "/dashboard/login", data={"csrf_token": token, "api_key": api_key}, base_url=base_url
    )
    set_cookie = [h for h in answer.headers.getlist("Set-Cookie") if h.startswith(sessions.COOKIE + "=")]
    assert len(set_cookie) == 1
    flags = [part.strip().lower() for part in set_cookie[0].split(";")]
    assert {"secure", "httponly", "samesite=lax"} <= set(flags)


def test_a_bad_key_or_a_forged_form_signs_nobody_in(client: Any, api_key: str) -> None:
    form = client.get("/dashboard/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    bad = client.post("/dashboard/login", data={"csrf_token": token, "api_key": "bk_nope_nope"})
    assert bad.status_code == 401 and "not valid" in bad.text
    assert client.get_cookie(sessions.COOKIE) is None
    forged = client.post("/dashboard/login", data={"csrf_token": "guess", "api_key": api_key})
    assert forged.status_code == 400 and client.get_cookie(sessions.COOKIE) is None
    outsider = client.application.test_client()  # no login cookie at all
    assert (
        outsider.post("/dashboard/login", data={"csrf_token": token, "api_key": api_key}).status_code == 400
    )


def test_the_session_cookie_authenticates_the_api_and_unsafe_calls_need_the_csrf_token(
    client: Any, services: Any, api_key: str, trigger: Any, failing_workflow: str, worker: Any, wait_run: Any
) -> None:
    run = trigger(failing_workflow, {"n": 1, "card": "x"})
    wait_run(run["id"])
    sign_in(client, api_key)
    listed = client.get("/api/v1/runs")
    assert listed.status_code == 200 and [r["id"] for r in listed.get_json()["data"]] == [run["id"]]

    bare = client.post(f"/api/v1/runs/{run['id']}/restart", json={"fromStepId": "charge", "dryRun": True})
    assert bare.status_code == 403
    assert bare.get_json() == {
        "success": False,
        "error": {"code": "FORBIDDEN", "message": "Missing or invalid X-CSRF-Token header"},
    }
    wrong = client.post(
        f"/api/v1/runs/{run['id']}/restart",
        json={"fromStepId": "charge", "dryRun": True},
        headers={"X-CSRF-Token": "not-the-token"},
    )
    assert wrong.status_code == 403 and wrong.get_json()["error"]["code"] == "FORBIDDEN"


def test_with_the_csrf_token_an_action_works_and_an_api_key_header_still_wins(
    client: Any, services: Any, api_key: str, trigger: Any, failing_workflow: str, worker: Any, wait_run: Any
) -> None:
    run = trigger(failing_workflow, {"n": 1, "card": "x"})
    wait_run(run["id"])
    csrf = sign_in(client, api_key)
    plan = client.post(
        f"/api/v1/runs/{run['id']}/restart",
        json={"fromStepId": "charge", "dryRun": True},
        headers={"X-CSRF-Token": csrf},
    )
    assert plan.status_code == 200, plan.get_json()
    assert plan.get_json()["data"]["stepsToRun"] == ["charge"]
    other = new_key(services, "other")
    as_other = client.get(f"/api/v1/runs/{run['id']}", headers={"x-api-key": other})
    assert as_other.status_code == 404, "x-api-key speaks for its own company, whatever the cookie"
    assert client.get("/api/v1/runs", headers={"x-api-key": "bk_bad_key"}).status_code == 401


def test_sign_out_deletes_the_server_side_session(client: Any, services: Any, api_key: str) -> None:
    csrf = sign_in(client, api_key)
    cookie = client.get_cookie(sessions.COOKIE).value
    stored_at = session_key(services, client)
    assert client.post("/dashboard/logout").status_code == 403, "sign-out needs the CSRF token too"
    out = client.post("/dashboard/logout", data={"csrf_token": csrf})
    assert out.status_code == 302 and out.headers["Location"].endswith("/dashboard/login")
    assert services.redis.exists(stored_at) == 0
    client.set_cookie(sessions.COOKIE, cookie)  # a copy of the old cookie is worth nothing now
    assert client.get("/api/v1/runs").status_code == 401
    assert client.get("/dashboard").status_code == 302


def test_a_revoked_key_ends_its_sessions_within_a_second(client: Any, services: Any, api_key: str) -> None:
    sign_in(client, api_key)
    assert client.get("/api/v1/runs").status_code == 200
    prefix = api_key.split("_")[1]
    # Revoked the way another process does it: in the database, this process's cache untouched.
    with services.db.session() as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
        session.commit()
    wait_for(lambda: client.get("/api/v1/runs").status_code == 401, timeout=1.0, what="the session to end")
    page = client.get("/dashboard")
    assert page.status_code == 302 and "/dashboard/login" in page.headers["Location"]


def _pages(run_id: str, child_id: str, workflow_id: str) -> list[str]:
    return [
        "/dashboard",
        f"/dashboard?workflowId={workflow_id}&status=failed&triggerType=api&range=24h",
        "/dashboard/runs/body?status=completed",
        f"/dashboard/runs/{run_id}",
        f"/dashboard/runs/{child_id}",
        f"/dashboard/runs/{run_id}/body",
        "/dashboard/workflows",
        f"/dashboard/workflows/{workflow_id}",
        "/dashboard/overview",
        "/dashboard/overview?window=1h",
        "/dashboard/overview?window=7d",
        "/dashboard/overview/body",
        "/api/docs",
    ]


def test_every_page_renders_from_this_origin_only(
    client: Any,
    api_key: str,
    headers: dict[str, str],
    trigger: Any,
    failing_workflow: str,
    worker: Any,
    wait_run: Any,
) -> None:
    failed = wait_run(trigger(failing_workflow, {"n": 1})["id"])
    assert failed["status"] == "failed"
    child = client.post(
        f"/api/v1/runs/{failed['id']}/restart",
        json={"fromStepId": "charge", "overrideInput": {"card": "ok"}},
        headers=headers,
    ).get_json()["data"]["newRunId"]
    wait_run(child)
    sign_in(client, api_key)
    for path in _pages(failed["id"], child, failing_workflow):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text[:500])
        assert page.mimetype == "text/html"
        urls = [u for u in EXTERNAL.findall(page.text) if not u.startswith(("http://localhost", *NAMESPACES))]
        assert urls == [], (path, urls)
        for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert asset.startswith(("/", "#", "?")), (path, asset)
    for name in ("dashboard.css", "dashboard.js", "docs.js"):
        asset = client.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and EXTERNAL.findall(asset.text) == [], name
        asset.close()
    login = app_client(client).get("/dashboard/login")
    assert login.status_code == 200 and EXTERNAL.findall(login.text) == []


def app_client(client: Any) -> Any:
    return client.application.test_client()


def test_run_detail_shows_the_failed_step_attempts_and_lineage_both_ways(
    client: Any,
    api_key: str,
    headers: dict[str, str],
    trigger: Any,
    failing_workflow: str,
    worker: Any,
    wait_run: Any,
) -> None:
    failed = wait_run(trigger(failing_workflow, {"n": 1})["id"])
    retried = client.post(f"/api/v1/runs/{failed['id']}/retry", headers=headers).get_json()["data"][
        "newRunId"
    ]
    wait_run(retried)
    sign_in(client, api_key)
    page = client.get(f"/dashboard/runs/{failed['id']}").text
    assert re.search(r'class="wf-row s-error is-failed" data-step-id="charge" data-status="error"', page)
    assert 'data-step-id="prepare" data-status="success"' in page
    assert "TEMPLATE_ERROR" in page
    assert f'class="mono child-link" href="/dashboard/runs/{retried}"' in page
    child = client.get(f"/dashboard/runs/{retried}").text
    assert f'id="parent-link" href="/dashboard/runs/{failed["id"]}"' in child
    assert "reused from the original run" in child


def test_runs_list_filters_and_pages(
    client: Any,
    api_key: str,
    headers: dict[str, str],
    trigger: Any,
    failing_workflow: str,
    worker: Any,
    wait_run: Any,
) -> None:
    ids = [wait_run(trigger(failing_workflow, {"n": i, "card": "c"})["id"])["id"] for i in range(3)]
    failed = wait_run(trigger(failing_workflow, {"n": 9})["id"])["id"]
    sign_in(client, api_key)

    def listed(query: str) -> list[str]:
        page = client.get(f"/dashboard/runs/body?{query}")
        assert page.status_code == 200, page.text
        return re.findall(r'<tr data-run-id="([^"]+)"', page.text)

    assert listed("") == [failed, *reversed(ids)]
    assert listed("status=failed") == [failed]
    assert listed("status=completed&triggerType=api") == list(reversed(ids))
    assert listed("triggerType=manual") == []
    assert listed("to=2000-01-01T00:00") == []
    assert listed("range=1h") == [failed, *reversed(ids)]
    first = client.get("/dashboard/runs/body?limit=2").text
    cursor = re.search(r'id="older" href="[^"]*cursor=([^&"]+)', first).group(1)
    assert listed(f"limit=2&cursor={cursor}") == list(reversed(ids))[1:]
    assert client.get("/dashboard?status=nope").status_code == 400


def test_overview_draws_the_runs_it_counted(
    client: Any, api_key: str, trigger: Any, failing_workflow: str, worker: Any, wait_run: Any
) -> None:
    for i in range(2):
        wait_run(trigger(failing_workflow, {"n": i, "card": "c"})["id"])
    wait_run(trigger(failing_workflow, {"n": 5})["id"])
    sign_in(client, api_key)
    page = client.get("/dashboard/overview?window=1h").text
    assert page.count("<svg") == 4
    completed = sum(int(n) for n in re.findall(r"<title>[^<]*: (\d+) completed</title>", page))
    failed = sum(int(n) for n in re.findall(r"<title>[^<]*: (\d+) failed</title>", page))
    assert (completed, failed) == (2, 1)
    assert "33.3%" in page
    assert f"<title>{failing_workflow}: p50" in page


def test_api_docs_serve_swagger_ui_from_the_package(client: Any) -> None:
    page = client.get("/api/docs")
    assert page.status_code == 200 and 'data-spec-url="/api/v1/openapi.json"' in page.text
    bundle = client.get("/api/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text[:2000]
    bundle.close()
    assert client.get("/api/docs/assets/../../setup.cfg").status_code == 404
    assert client.get("/api/v1/openapi.json").status_code == 200


def test_workflow_page_shows_triggers_next_fire_and_the_delivery_log(
    client: Any, api_key: str, make_workflow: Any, worker: Any, wait_run: Any
) -> None:
    secret = "dashboard-test-secret"
    workflow_id = make_workflow(
        [{"id": "echo", "action": "transform", "input": {"got": "{{ input }}"}}],
        name="Signed hook",
        triggers={
            "webhook": {"scheme": "hmac-sha256", "secret": secret, "header": "X-Sig"},
            "schedule": {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"},
        },
    )
    body = b'{"order": 7}'
    good = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    sent = {"content-type": "application/json"}
    accepted = client.post(f"/api/v1/webhooks/{workflow_id}", data=body, headers={**sent, "X-Sig": good})
    assert accepted.status_code == 202
    run_id = accepted.get_json()["data"]["runId"]
    wait_run(run_id)
    refused = client.post(f"/api/v1/webhooks/{workflow_id}", data=body, headers={**sent, "X-Sig": "0" * 64})
    assert refused.status_code == 401
    sign_in(client, api_key)
    page = client.get(f"/dashboard/workflows/{workflow_id}").text
    log = page[page.index('id="deliveries"') :]
    assert log.count("<tr>") == 3  # the header and the two deliveries
    assert "refused" in log and "verified" in log
    assert f'href="/dashboard/runs/{run_id}"' in log
    assert "<code>0 9 * * 1-5</code> Europe/Berlin" in page
    next_fire = re.search(r"Next scheduled</dt><dd><time datetime=\"([^\"]+)\"", page)
    assert next_fire and next_fire.group(1).endswith(("07:00:00.000Z", "08:00:00.000Z"))
    listing = client.get("/dashboard/workflows").text
    assert "Signed hook" in listing and "webhook · hmac-sha256" in listing
