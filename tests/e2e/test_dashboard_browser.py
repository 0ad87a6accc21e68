"""The dashboard in headless Chromium: sign in, find a failed run, restart it from the failed step
with an override, watch the new run complete without reloading and compare it with the original;
screenshots are saved under ``tests/artifacts/``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from workers.actions import ActionContext, StepError, action

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)",
)


@action("dashtest.charge")
def charge(ctx: ActionContext, params: Any) -> dict[str, Any]:
    """A payment that only a valid card passes (retried, so a failure shows two attempts)."""
    if params.get("card") != "valid":
        raise StepError("CARD_DECLINED", f"card {params.get('card')!r} was declined", retriable=True)
    return {"charged": True, "card": params["card"]}


ORDER_STEPS = [
    {"id": "fetch-order", "action": "transform", "input": {"order": "{{ input.order }}"}},
    {
        "id": "charge",
        "action": "dashtest.charge",
        "input": {"card": "{{ input.card }}"},
        "retry": {"maxAttempts": 2, "backoff": "fixed", "initialDelayMs": 300},
    },
    # Long enough that the restarted run is still going when its page opens.
    {"id": "settle", "action": "delay", "input": {"durationMs": 3000}},
    {"id": "receipt", "action": "transform", "input": {"card": "{{ steps.charge.output.card }}"}},
]


@pytest.fixture
def browser_page(live_server: str) -> Any:
    """A fresh headless Chromium page; every request it makes is recorded."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.requests = []  # type: ignore[attr-defined]
        page.problems = []  # type: ignore[attr-defined]
        page.on("request", lambda request: page.requests.append(request.url))  # type: ignore[attr-defined]
        page.on("pageerror", lambda error: page.problems.append(f"script error: {error}"))  # type: ignore[attr-defined]
        page.on(  # a Content-Security-Policy refusal or a failed load shows up as a console error
            "console",
            lambda m: page.problems.append(f"console: {m.text}") if m.type == "error" else None,  # type: ignore[attr-defined]
        )
        page.set_default_timeout(15_000)
        yield page
        context.close()
        browser.close()


def _seed(make_workflow: Any, trigger: Any, wait_run: Any) -> tuple[str, str]:
    """A failed order run (the card is declined twice), plus a few runs the overview can draw."""
    orders = make_workflow(ORDER_STEPS, name="Order paid")
    quick = make_workflow(
        [{"id": "echo", "action": "transform", "input": {"n": "{{ input.n }}"}}], name="Echo"
    )
    for n in range(4):
        wait_run(trigger(quick, {"n": n})["id"])
    wait_run(trigger(quick, {})["id"])  # TEMPLATE_ERROR: one failure in the overview
    failed = wait_run(trigger(orders, {"order": 42, "card": "expired"})["id"])
    assert failed["status"] == "failed", failed
    return quick, failed["id"]


def _sign_in(page: Any, live_server: str, api_key: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live_server}/")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.fill("#api_key", api_key)
    page.click("#sign-in")
    expect(page).to_have_url(f"{live_server}/dashboard")


def _open_the_failed_run(page: Any, live_server: str, failed_id: str) -> None:
    """From the runs list, filtered to failures, to the run; its failed step is marked."""
    from playwright.sync_api import expect

    page.select_option("select[name=status]", "failed")
    page.click("button:has-text('Apply')")
    page.click(f"a:text-is('{failed_id}')")
    expect(page).to_have_url(f"{live_server}/dashboard/runs/{failed_id}")
    charge_row = page.locator('#timeline .wf-row[data-step-id="charge"]')
    expect(charge_row).to_have_attribute("data-status", "error")
    expect(charge_row.locator(".fail-mark")).to_be_visible()
    expect(charge_row.locator(".wf-bar.s-error")).to_have_count(2)  # each attempt its own bar
    expect(page.locator("#run-status .badge")).to_have_text("failed")
    page.screenshot(path=str(ARTIFACTS / "run-detail-failed.png"), full_page=True)


def _restart_and_watch(page: Any, live_server: str, failed_id: str) -> str:
    """Restart from the failed step with an override; the new run's page follows it to the end."""
    from playwright.sync_api import expect

    expect(page.locator("#restart-step")).to_have_value("charge")
    page.fill("#restart-override", '{"card": "valid"}')
    page.click("#restart-preview")
    expect(page.locator("#plan-steps li")).to_have_text(["charge", "settle", "receipt"])
    page.screenshot(path=str(ARTIFACTS / "restart-preview.png"))
    page.click("#restart-submit")
    page.wait_for_url(re.compile(r"/dashboard/runs/(?!" + re.escape(failed_id) + ")"))
    new_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__sameDocument = true")
    assert page.locator("#run-live").get_attribute("data-initial-status") not in ("completed", "failed")
    expect(page.locator("#run-status .badge")).to_have_text("completed", timeout=30_000)
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    assert f"{live_server}/api/v1/runs/{new_id}/events" in page.requests
    assert not page.evaluate("window.__batonPolling"), "updates came from polling, not the event stream"
    receipt = page.locator('#timeline .wf-row[data-step-id="receipt"]')
    expect(receipt).to_have_attribute("data-status", "success")
    reused = page.locator("#timeline .wf-row[data-step-id='fetch-order'] .wf-note")
    expect(reused).to_have_text("reused from the original run")
    expect(page.locator("#parent-link")).to_have_text(failed_id)
    page.locator("#step-receipt summary").click()
    page.screenshot(path=str(ARTIFACTS / "run-detail.png"), full_page=True)
    return new_id


def _compare_with_the_original(page: Any, live_server: str, failed_id: str, new_id: str) -> None:
    """The restarted run's "compare with original" link: what the override changed, step by step."""
    from playwright.sync_api import expect

    page.click("#compare-original")
    expect(page).to_have_url(f"{live_server}/dashboard/runs/{new_id}/diff?against={failed_id}")
    expect(page.locator('.diff-step[data-step-id="fetch-order"] .muted')).to_have_text("no change")
    charge = page.locator('.diff-step[data-step-id="charge"]')
    expect(charge.locator(".badge")).to_have_text(["error", "success"])  # before → after
    card = charge.locator('.change[data-path="input.card"]')
    expect(card.locator(".before")).to_have_text('"expired"')
    expect(card.locator(".after")).to_have_text('"valid"')
    page.screenshot(path=str(ARTIFACTS / "run-diff.png"), full_page=True)
    page.click("#diff-this")
    expect(page).to_have_url(f"{live_server}/dashboard/runs/{new_id}")


def _visit_the_other_pages(page: Any, live_server: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{live_server}/dashboard/overview?window=1h")
    expect(page.locator("svg.chart")).to_have_count(4)
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.goto(f"{live_server}/dashboard")
    page.screenshot(path=str(ARTIFACTS / "runs.png"), full_page=True)
    page.goto(f"{live_server}/dashboard/workflows")
    page.click("a:has-text('Order paid')")
    expect(page.locator("#deliveries")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "workflow.png"), full_page=True)
    page.goto(f"{live_server}/api/docs")
    expect(page.locator(".opblock").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "api-docs.png"))


def test_restart_a_failed_run_from_the_dashboard(
    worker: Any,
    live_server: str,
    api_key: str,
    make_workflow: Any,
    trigger: Any,
    wait_run: Any,
    browser_page: Any,
) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    quick, failed_id = _seed(make_workflow, trigger, wait_run)
    page = browser_page
    _sign_in(page, live_server, api_key)
    expect(page.locator("[data-live-indicator]")).to_have_attribute("data-state", "live")
    fresh = trigger(quick, {"n": 99})["id"]  # the list shows a new run as it happens
    expect(page.locator(f'tr[data-run-id="{fresh}"] .badge')).to_have_text("completed")

    _open_the_failed_run(page, live_server, failed_id)
    new_id = _restart_and_watch(page, live_server, failed_id)
    assert wait_run(new_id)["status"] == "completed"
    _compare_with_the_original(page, live_server, failed_id, new_id)
    _visit_the_other_pages(page, live_server)

    elsewhere = [u for u in page.requests if not u.startswith((live_server, "data:"))]
    assert elsewhere == [], f"requests left this origin: {elsewhere}"
    assert page.problems == []  # type: ignore[attr-defined]


def test_trigger_from_the_workflow_page_then_approve_the_suspended_run(
    worker: Any, live_server: str, api_key: str, make_workflow: Any, wait_run: Any, browser_page: Any
) -> None:
    from playwright.sync_api import expect

    workflow_id = make_workflow(
        [
            {"id": "ask", "action": "approval"},
            {"id": "done", "action": "transform", "input": {"by": "{{ steps.ask.output.by }}"}},
        ],
        name="Needs approval",
    )
    page = browser_page
    _sign_in(page, live_server, api_key)
    page.goto(f"{live_server}/dashboard/workflows/{workflow_id}")
    page.fill("#trigger-input", '{"order": 7}')
    page.click("#trigger-submit")
    page.wait_for_url(re.compile(r"/dashboard/runs/run_"))
    run_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("#run-status .badge")).to_have_text("suspended")
    expect(page.locator("button[data-action='approve']")).to_be_visible()
    expect(page.locator("button[data-action='retry']")).to_be_hidden()
    page.fill("#resume-data", '{"by": "ops"}')
    page.click("button[data-action='approve']")
    expect(page.locator("#run-status .badge")).to_have_text("completed")
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    run = wait_run(run_id)
    assert run["triggerType"] == "manual" and run["input"] == {"order": 7}
    assert run["output"] == {"by": "ops"}
    assert page.problems == []  # type: ignore[attr-defined]
