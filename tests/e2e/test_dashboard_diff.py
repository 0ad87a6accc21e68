"""The dashboard's run comparison: a restarted run links to its diff with the original, a form
compares with any run id, and the page shows each changed path."""

from __future__ import annotations

import html
import re
from typing import Any

from tests.e2e.test_dashboard import sign_in

STEPS = [
    {"id": "fetch", "action": "transform", "input": {"amount": "{{ input.amount }}"}},
    {"id": "charge", "action": "fail", "if": "{{ input.fail }}", "input": {"message": "card declined"}},
]


def _restarted(
    client: Any, headers: dict[str, str], make_workflow: Any, trigger: Any, wait_run: Any
) -> tuple:
    wid = make_workflow(STEPS)
    original = wait_run(trigger(wid, {"amount": 5, "fail": True})["id"])
    response = client.post(
        f"/api/v1/runs/{original['id']}/restart",
        json={"fromStepId": "fetch", "overrideInput": {"amount": 7, "fail": False}},
        headers=headers,
    )
    assert response.status_code == 202, response.get_json()
    restart = wait_run(response.get_json()["data"]["newRunId"])
    return wid, original, restart


def test_a_restarted_run_links_to_its_diff_with_the_original(
    worker, app, api_key, headers, make_workflow, trigger, wait_run
):
    browser = app.test_client()
    api = app.test_client()
    sign_in(browser, api_key)
    _, original, restart = _restarted(api, headers, make_workflow, trigger, wait_run)

    page = browser.get(f"/dashboard/runs/{restart['id']}").text
    link = re.search(r'id="compare-original" href="([^"]+)"', page).group(1)
    assert html.unescape(link) == f"/dashboard/runs/{restart['id']}/diff?against={original['id']}"
    assert 'id="compare-form"' in page and f'value="{original["id"]}"' in page
    assert 'id="compare-original"' not in browser.get(f"/dashboard/runs/{original['id']}").text

    diff = browser.get(html.unescape(link))
    assert diff.status_code == 200
    text = diff.text
    assert f'id="diff-this" href="/dashboard/runs/{restart["id"]}"' in text
    assert f'id="diff-against" href="/dashboard/runs/{original["id"]}"' in text
    assert 'id="diff-count">2 of 2<' in text
    rows = re.findall(r'<tr class="change" data-path="([^"]+)">', text)
    assert rows == ["input.amount", "output.amount", "input", "error"]  # charge: skipped now
    assert '<pre class="code before">5</pre>' in text and '<pre class="code after">7</pre>' in text
    # Without `against`, a restarted run is compared with its original.
    assert browser.get(f"/dashboard/runs/{restart['id']}/diff").text.count('class="change"') == 4


def test_the_diff_page_refuses_runs_it_cannot_compare(
    worker, app, api_key, headers, make_workflow, trigger, wait_run
):
    browser = app.test_client()
    api = app.test_client()
    sign_in(browser, api_key)
    _, original, restart = _restarted(api, headers, make_workflow, trigger, wait_run)
    elsewhere = wait_run(trigger(make_workflow(STEPS), {"amount": 1, "fail": False})["id"])

    across = browser.get(f"/dashboard/runs/{restart['id']}/diff?against={elsewhere['id']}")
    assert across.status_code == 400 and "different workflows" in across.text
    missing = browser.get(f"/dashboard/runs/{original['id']}/diff")  # an original has no default
    assert missing.status_code == 400
    unknown = browser.get(
        f"/dashboard/runs/{restart['id']}/diff?against=run_00000000-0000-7000-8000-000000000000"
    )
    assert unknown.status_code == 404
