"""The ``baton`` commands that act over the HTTP API: runs, workflows, deliveries, secrets, login."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import click

from app import cli_format as fmt
from app.cli_watch import (
    EXIT_CODES,
    EXIT_GAVE_UP,
    GaveUp,
    WatchView,
    follow_events,
    poll,
    step_ids_of,
    summary,
)
from app.client import DEFAULT_URL, ApiClient, ApiError, ClientError, Endpoint, endpoint, write_profile
from app.config import Config
from models.states import RunStatus, TriggerType

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the API's JSON envelope (for scripts) instead of a table."
)


def _client() -> ApiClient:
    return ApiClient(endpoint(Config.from_env()))


def _seg(value: str) -> str:
    """An id or name as one path segment (a slash or a question mark in it stays inside)."""
    return quote(value, safe="")


class JsonObject(click.ParamType):
    """A JSON object given on the command line (a bad one is a usage error, exit 2)."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            self.fail(f"not valid JSON ({exc})", param, ctx)
        if not isinstance(parsed, dict):
            self.fail("must be a JSON object", param, ctx)
        return parsed


JSON_OBJECT = JsonObject()


def _pages(client: ApiClient, path: str, params: dict[str, Any], follow: bool) -> Iterator[dict[str, Any]]:
    """Each page's envelope; with ``follow``, the next page while the API says there is one."""
    count = 0
    while True:
        envelope = client.call("GET", path, params={k: v for k, v in params.items() if v is not None})
        yield envelope
        count += len(envelope.get("data") or [])
        meta = envelope.get("meta") or {}
        if not follow or not meta.get("hasMore") or not meta.get("cursor"):
            return
        if sys.stderr.isatty():
            click.echo(f"\r{count} so far…", err=True, nl=False)
        params = {**params, "cursor": meta["cursor"]}


def _listing(
    path: str,
    params: dict[str, Any],
    *,
    follow: bool,
    as_json: bool,
    render: Callable[[list[dict[str, Any]]], str],
    again: str,
) -> None:
    """A list command: one page (or all of them), as a table or the API's envelope."""
    envelopes = list(_pages(_client(), path, params, follow))
    if follow and sys.stderr.isatty():
        click.echo("\r\x1b[K", err=True, nl=False)
    rows = [row for envelope in envelopes for row in envelope.get("data") or []]
    meta = envelopes[-1].get("meta") or {}
    if as_json:
        # Several pages make one envelope: every row, and the last page's meta.
        fmt.echo_envelope(
            envelopes[0] if len(envelopes) == 1 else {"success": True, "data": rows, "meta": meta}
        )
        return
    click.echo(render(rows))
    if meta.get("hasMore") and meta.get("cursor"):
        click.echo(f"\nnext cursor: {meta['cursor']}\n  ({again} --cursor {meta['cursor']})")


limit_option = click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, 100), help="Rows per page."
)
cursor_option = click.option("--cursor", default=None, help="Start after this cursor (from a previous page).")
all_option = click.option("--all", "follow", is_flag=True, help="Follow the cursor to the last page.")


# --------------------------------------------------------------------------- login


@click.command("login")
@click.option("--url", default=None, help=f"The API's base URL (default: BATON_URL or {DEFAULT_URL}).")
def login(url: str | None) -> None:
    """Check an API key against the API and keep URL and key in a profile (mode 0600).

    The key comes from BATON_API_KEY, stdin, or a hidden prompt (never the command line).
    """
    config = Config.from_env()
    if not url and not config.api_url and sys.stdin.isatty():
        url = click.prompt("Baton URL", default=DEFAULT_URL)
    url = (url or config.api_url or DEFAULT_URL).rstrip("/")
    key = config.api_key
    if not key:
        key = click.prompt("API key", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise ClientError("no API key given")
    # Any valid key may read workflows, whatever its scopes.
    ApiClient(Endpoint(url=url, api_key=key)).call("GET", "/api/v1/workflows", params={"limit": 1})
    write_profile(config.cli_profile_path, url, key)
    click.echo(f"logged in to {url}; profile written to {config.cli_profile_path}", err=True)


# --------------------------------------------------------------------------- runs


@click.group("runs")
def runs_group() -> None:
    """Inspect and control runs (over the API: BATON_URL, BATON_API_KEY)."""


def _runs_table(rows: list[dict[str, Any]]) -> str:
    return fmt.table(
        ["ID", "WORKFLOW", "STATUS", "TRIGGER", "CREATED", "DURATION", "ERROR"],
        [
            [
                r["id"],
                r.get("workflowId", ""),
                r.get("status", ""),
                r.get("triggerType", ""),
                fmt.ago(r.get("createdAt")),
                fmt.duration(r.get("durationMs")),
                fmt.error_text(r.get("error"), 50),
            ]
            for r in rows
        ],
    )


@runs_group.command("list")
@click.option("--workflow", "workflow_id", default=None, help="Only this workflow's runs.")
@click.option("--status", default=None, type=click.Choice([s.value for s in RunStatus]))
@click.option("--trigger-type", default=None, type=click.Choice([t.value for t in TriggerType]))
@click.option("--created-after", default=None, help="ISO 8601 time (inclusive).")
@click.option("--created-before", default=None, help="ISO 8601 time (exclusive).")
@limit_option
@cursor_option
@all_option
@json_option
def runs_list(
    workflow_id: str | None,
    status: str | None,
    trigger_type: str | None,
    created_after: str | None,
    created_before: str | None,
    limit: int,
    cursor: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    """List runs, newest first."""
    filters = {
        "workflow": workflow_id,
        "status": status,
        "trigger-type": trigger_type,
        "created-after": created_after,
        "created-before": created_before,
        "limit": limit,
    }
    params = {
        "workflowId": workflow_id,
        "status": status,
        "triggerType": trigger_type,
        "createdAfter": created_after,
        "createdBefore": created_before,
        "limit": limit,
        "cursor": cursor,
    }
    again = "baton runs list" + "".join(f" --{k} {v}" for k, v in filters.items() if v)
    _listing("/api/v1/runs", params, follow=follow, as_json=as_json, render=_runs_table, again=again)


def _steps_table(steps: list[dict[str, Any]]) -> str:
    return fmt.table(
        ["STEP", "STATUS", "ATTEMPT", "STARTED", "DURATION", "ERROR"],
        [
            [
                s.get("stepId", "") + (" (reused)" if s.get("reused") else ""),
                s.get("status", ""),
                s.get("attempt", ""),
                fmt.clock(s.get("startedAt")),
                fmt.duration(s.get("durationMs")),
                fmt.error_text(s.get("error"), 70),
            ]
            for s in steps
        ],
    )


def _json_block(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


@runs_group.command("get")
@click.argument("run_id")
@json_option
def runs_get(run_id: str, as_json: bool) -> None:
    """Show a run: status, steps, input and output."""
    envelope = _client().call("GET", f"/api/v1/runs/{_seg(run_id)}")
    if as_json:
        fmt.echo_envelope(envelope)
        return
    run = envelope["data"]
    click.echo(
        fmt.fields(
            [
                ("run", run["id"]),
                ("workflow", f"{run.get('workflowId')} v{run.get('workflowVersion')}"),
                ("status", run.get("status")),
                ("trigger", run.get("triggerType")),
                (
                    "created",
                    f"{fmt.clock(run.get('createdAt'), with_date=True)} ({fmt.ago(run.get('createdAt'))})",
                ),
                ("duration", fmt.duration(run.get("durationMs"))),
                ("restarted from", run.get("restartedFromRunId")),
                ("restarted as", ", ".join(run.get("restartedRunIds") or [])),
                ("error", fmt.error_text(run.get("error"), 200)),
            ]
        )
    )
    click.echo("\n" + _steps_table(run.get("stepResults") or []))
    click.echo("\ninput:\n" + _json_block(run.get("input")))
    if run.get("output") is not None:
        click.echo("output:\n" + _json_block(run.get("output")))


@runs_group.command("logs")
@click.argument("run_id")
@json_option
def runs_logs(run_id: str, as_json: bool) -> None:
    """Show the execution log: one line per attempt."""
    envelope = _client().call("GET", f"/api/v1/runs/{_seg(run_id)}/logs")
    if as_json:
        fmt.echo_envelope(envelope)
        return
    click.echo(_steps_table(envelope["data"].get("logs") or []))


def _act(run_id: str, action: str, body: dict[str, Any] | None, as_json: bool) -> dict[str, Any]:
    envelope = _client().call("POST", f"/api/v1/runs/{_seg(run_id)}/{action}", body=body)
    if as_json:
        fmt.echo_envelope(envelope)
    return envelope["data"]


@runs_group.command("cancel")
@click.argument("run_id")
@json_option
def runs_cancel(run_id: str, as_json: bool) -> None:
    """Cancel a pending, running or suspended run."""
    data = _act(run_id, "cancel", None, as_json)
    if not as_json:
        click.echo(f"{data['id']}: {data['status']} ({data.get('message', '')})")


def _restarted(data: dict[str, Any]) -> None:
    click.echo(
        f"{data['newRunId']}: {data.get('status')}, restarted from step {data.get('restartFromStepId')} "
        f"of {data.get('originalRunId')} (workflow {data.get('workflowId')} v{data.get('workflowVersion')})"
    )


@runs_group.command("retry")
@click.argument("run_id")
@click.option("--latest", is_flag=True, help="Run the workflow's latest version instead of the original.")
@json_option
def runs_retry(run_id: str, latest: bool, as_json: bool) -> None:
    """Retry a failed or timed-out run from its first failed step, in a new run."""
    data = _act(run_id, "retry", {"workflowVersion": "latest" if latest else "original"}, as_json)
    if not as_json:
        _restarted(data)


@runs_group.command("restart")
@click.argument("run_id")
@click.option("--from-step", "from_step", required=True, help="The first step to run again.")
@click.option("--override-input", type=JSON_OBJECT, default=None, help="JSON deep-merged into the input.")
@click.option("--dry-run", is_flag=True, help="Show the plan; create nothing.")
@click.option("--latest", is_flag=True, help="Run the workflow's latest version instead of the original.")
@json_option
def runs_restart(
    run_id: str,
    from_step: str,
    override_input: dict[str, Any] | None,
    dry_run: bool,
    latest: bool,
    as_json: bool,
) -> None:
    """Restart a finished run from a step, in a new run; earlier steps' outputs are reused."""
    body = {
        "fromStepId": from_step,
        "overrideInput": override_input or {},
        "dryRun": dry_run,
        "workflowVersion": "latest" if latest else "original",
    }
    data = _act(run_id, "restart", body, as_json)
    if as_json:
        return
    if not dry_run:
        _restarted(data)
        return
    reused = ", ".join(s["stepId"] for s in data.get("reusedSteps") or []) or "none"
    click.echo(
        fmt.fields(
            [
                ("dry run", f"restart {data.get('originalRunId')} from step {data.get('restartFromStepId')}"),
                ("workflow", f"{data.get('workflowId')} v{data.get('workflowVersion')}"),
                ("reused steps", reused),
                ("steps to run", ", ".join(data.get("stepsToRun") or []) or "none"),
            ]
        )
    )
    click.echo("input:\n" + _json_block(data.get("input")))


@runs_group.command("resume")
@click.argument("run_id")
@click.option("--approve/--reject", "approved", default=None, help="Continue the run, or fail it.")
@click.option("--data", type=JSON_OBJECT, default=None, help="JSON object: the approval step's output.")
@json_option
def runs_resume(run_id: str, approved: bool | None, data: dict[str, Any] | None, as_json: bool) -> None:
    """Answer a suspended run's approval step."""
    if approved is None:
        raise click.UsageError("pass --approve or --reject")
    result = _act(run_id, "resume", {"approved": approved, "data": data or {}}, as_json)
    if not as_json:
        click.echo(f"{result['id']}: {result['status']} ({result.get('message', '')})")


@runs_group.command("trigger")
@click.argument("workflow_id")
@click.option("--input", "run_input", type=JSON_OBJECT, default=None, help="The run input, a JSON object.")
@click.option("--input-file", type=click.File("r"), default=None, help="A file holding the input JSON.")
@click.option("--watch", "then_watch", is_flag=True, help="Then watch the run until it ends.")
@json_option
def runs_trigger(
    workflow_id: str, run_input: dict[str, Any] | None, input_file: Any, then_watch: bool, as_json: bool
) -> None:
    """Start a run by hand (trigger type manual)."""
    if run_input is not None and input_file is not None:
        raise click.UsageError("pass --input or --input-file, not both")
    if input_file is not None:
        run_input = JSON_OBJECT.convert(input_file.read(), None, click.get_current_context())
    body = {"input": run_input or {}, "triggerType": "manual"}
    envelope = _client().call("POST", f"/api/v1/workflows/{_seg(workflow_id)}/runs", body=body)
    run = envelope["data"]
    if as_json and not then_watch:
        fmt.echo_envelope(envelope)
    elif not as_json:
        click.echo(
            f"{run['id']}: {run['status']} (workflow {run['workflowId']} v{run.get('workflowVersion')})"
        )
    if then_watch:
        _watch(run["id"], None, 0.5, as_json)


@runs_group.command("watch")
@click.argument("run_id")
@click.option(
    "--timeout", "timeout_s", type=click.FloatRange(min=0), default=None, help="Give up after N s (exit 2)."
)
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Polling interval (without an event stream).",
)
@json_option
def runs_watch(run_id: str, timeout_s: float | None, interval: float, as_json: bool) -> None:
    """Show a run's steps as they happen until it ends.

    Exits 0 when it completed, 1 when it failed, 2 when it was cancelled or timed out (or --timeout passed).
    """
    _watch(run_id, timeout_s, interval, as_json)


def _watch(run_id: str, timeout_s: float | None, interval_s: float, as_json: bool) -> None:
    """Follow the run's event stream (or poll it when the API has none); exit with its outcome."""
    client = _client()
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    run = client.call("GET", f"/api/v1/runs/{_seg(run_id)}")["data"]
    run_id = run["id"]  # the API's own spelling, safe in the paths below
    out = sys.stderr if as_json else sys.stdout
    view = WatchView(out=out, step_ids=step_ids_of(client, run), tty=out.isatty())
    click.echo(f"watching {run_id} (workflow {run['workflowId']} v{run.get('workflowVersion')})", file=out)
    try:
        if not follow_events(client, run_id, view, deadline):
            poll(client, run_id, view, deadline, interval_s)
    except GaveUp:
        view.close()
        click.echo(f"gave up after {timeout_s:g} s: {run_id} has not ended", err=True)
        sys.exit(EXIT_GAVE_UP)
    envelope = client.call("GET", f"/api/v1/runs/{_seg(run_id)}")
    for step in envelope["data"].get("stepResults") or []:
        view.step(step)  # anything the stream did not show (an API without step events)
    view.close()
    click.echo(summary(envelope["data"], view), file=out)
    if as_json:
        fmt.echo_envelope(envelope)
    sys.exit(EXIT_CODES.get(envelope["data"]["status"], 1))


def _bulk_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The selection flags of ``bulk-cancel`` and ``bulk-retry``: a filter, or run ids."""
    options = [
        click.option("--workflow", "workflow_id", default=None, help="Runs of this workflow."),
        click.option("--status", default=None, type=click.Choice([s.value for s in RunStatus])),
        click.option("--trigger-type", default=None, type=click.Choice([t.value for t in TriggerType])),
        click.option("--created-after", default=None, help="ISO 8601 time (inclusive)."),
        click.option("--created-before", default=None, help="ISO 8601 time (exclusive)."),
        click.option(
            "--run-id", "run_ids", multiple=True, help="A run to act on (repeatable; instead of a filter)."
        ),
        click.option("--dry-run", is_flag=True, help="Count the runs and show the first ids; act on none."),
        click.option("--wait", "then_wait", is_flag=True, help="Follow the action's progress until it ends."),
        click.option(
            "--interval",
            default=0.5,
            show_default=True,
            type=click.FloatRange(min=0.05),
            help="Seconds between progress checks (--wait).",
        ),
        click.option(
            "--idempotency-key", default=None, help="Sent as Idempotency-Key: a repeat is the same action."
        ),
        json_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _bulk_body(options: dict[str, Any]) -> dict[str, Any]:
    given = {
        "workflowId": options["workflow_id"],
        "status": options["status"],
        "triggerType": options["trigger_type"],
        "createdAfter": options["created_after"],
        "createdBefore": options["created_before"],
    }
    selection = {k: v for k, v in given.items() if v is not None}
    if options["run_ids"] and selection:
        raise click.UsageError("pass --run-id or filter flags (--workflow, --status, …), not both")
    if not options["run_ids"] and not selection:
        raise click.UsageError(
            "say which runs: --workflow, --status, --trigger-type, --created-after, --created-before "
            "or --run-id"
        )
    body: dict[str, Any] = (
        {"runIds": list(options["run_ids"])} if options["run_ids"] else {"filter": selection}
    )
    return {**body, "dryRun": options["dry_run"]}


def _bulk(action: str, body: dict[str, Any], options: dict[str, Any]) -> None:
    """POST the bulk action; show the dry run's count, or the action (and, with --wait, its
    progress until it ends: exit 0 when every run was acted on, 1 otherwise)."""
    client = _client()
    as_json = options["as_json"]
    key = options["idempotency_key"]
    headers = {"Idempotency-Key": key} if key and not body["dryRun"] else None
    envelope = client.call("POST", f"/api/v1/runs/bulk/{action}", body=body, headers=headers)
    data = envelope["data"]
    if body["dryRun"]:
        if as_json:
            fmt.echo_envelope(envelope)
            return
        click.echo(f"dry run: would {action} {data['count']} run(s)")
        for run_id in data.get("sampleRunIds") or []:
            click.echo(f"  {run_id}")
        if data["count"] > len(data.get("sampleRunIds") or []):
            click.echo(f"  … and {data['count'] - len(data['sampleRunIds'])} more")
        return
    if not options["then_wait"]:
        if as_json:
            fmt.echo_envelope(envelope)
        else:
            click.echo(
                f"{data['id']}: bulk {data['action']} {data['status']} "
                f"(progress: GET /api/v1/bulk-actions/{data['id']})"
            )
        return
    out = sys.stderr if as_json else sys.stdout
    tty = out.isatty()
    path = f"/api/v1/bulk-actions/{_seg(data['id'])}"
    last = None
    while True:
        envelope = client.call("GET", path)
        progress = envelope["data"]
        line = (
            f"{progress['id']}: {progress['action']} {progress['status']}: "
            f"{progress['done'] + progress['failed']}/{progress['total']} "
            f"({progress['done']} done, {progress['failed']} failed)"
        )
        if line != last:
            click.echo(("\r\x1b[K" if tty else "") + line, file=out, nl=not tty)
            last = line
        if progress["status"] != "running":
            break
        time.sleep(options["interval"])
    if tty:
        click.echo("", file=out)
    if as_json:
        fmt.echo_envelope(envelope)
    sys.exit(0 if progress["status"] == "completed" and not progress["failed"] else 1)


@runs_group.command("bulk-cancel")
@_bulk_options
def runs_bulk_cancel(**options: Any) -> None:
    """Cancel every pending, running or suspended run a filter (or --run-id) selects, in the background.

    With --wait, exits 0 when every selected run was cancelled and 1 when some could not be
    (e.g. they finished first) or the action failed.
    """
    _bulk("cancel", _bulk_body(options), options)


@runs_group.command("bulk-retry")
@_bulk_options
@click.option(
    "--latest", is_flag=True, help="Retry on each workflow's latest version instead of the run's own."
)
def runs_bulk_retry(latest: bool, **options: Any) -> None:
    """Retry every failed or timed-out run a filter (or --run-id) selects, each in a new linked run.

    With --wait, exits 0 when every selected run was retried and 1 when some could not be or the
    action failed.
    """
    body = _bulk_body(options)
    body["workflowVersion"] = "latest" if latest else "original"
    _bulk("retry", body, options)


# --------------------------------------------------------------------------- workflows


@click.group("workflows")
def workflows_group() -> None:
    """Workflow definitions (over the API)."""


def _workflows_table(rows: list[dict[str, Any]]) -> str:
    return fmt.table(
        ["ID", "NAME", "VERSION", "STEPS", "TRIGGERS", "NEXT RUN", "UPDATED"],
        [
            [
                w["id"],
                w.get("name", ""),
                w.get("version", ""),
                len(w.get("steps") or []),
                ",".join(sorted(w.get("triggers") or {})) or "-",
                fmt.clock(w.get("nextRunAt"), with_date=True),
                fmt.ago(w.get("updatedAt")),
            ]
            for w in rows
        ],
    )


@workflows_group.command("list")
@limit_option
@cursor_option
@all_option
@json_option
def workflows_list(limit: int, cursor: str | None, follow: bool, as_json: bool) -> None:
    """List workflows, newest first."""
    params = {"limit": limit, "cursor": cursor}
    again = f"baton workflows list --limit {limit}"
    _listing(
        "/api/v1/workflows", params, follow=follow, as_json=as_json, render=_workflows_table, again=again
    )


@workflows_group.command("get")
@click.argument("workflow_id")
@json_option
def workflows_get(workflow_id: str, as_json: bool) -> None:
    """Show a workflow's current definition."""
    envelope = _client().call("GET", f"/api/v1/workflows/{_seg(workflow_id)}")
    if as_json:
        fmt.echo_envelope(envelope)
    else:
        fmt.echo_json(envelope["data"])


@workflows_group.command("apply")
@click.argument("file", type=click.File("r"))
@json_option
def workflows_apply(file: Any, as_json: bool) -> None:
    """Create a workflow from a JSON file, or add a version when its id exists; prints the version."""
    try:
        definition = json.load(file)
    except ValueError as exc:
        raise click.BadParameter(f"{file.name} is not valid JSON ({exc})", param_hint="FILE") from None
    if not isinstance(definition, dict):
        raise click.BadParameter(f"{file.name} must hold a JSON object", param_hint="FILE")
    client = _client()
    workflow_id = definition.get("id")
    envelope = None
    if isinstance(workflow_id, str) and workflow_id:
        try:
            envelope = client.call("PUT", f"/api/v1/workflows/{_seg(workflow_id)}", body=definition)
        except ApiError as exc:
            if exc.status != 404:
                raise
    created = envelope is None
    if envelope is None:
        envelope = client.call("POST", "/api/v1/workflows", body=definition)
    if as_json:
        fmt.echo_envelope(envelope)
        return
    data = envelope["data"]
    click.echo(f"{data['id']}: version {data['version']} ({'created' if created else 'updated'})")


@workflows_group.command("delete")
@click.argument("workflow_id")
@json_option
def workflows_delete(workflow_id: str, as_json: bool) -> None:
    """Delete a workflow (its runs stay readable)."""
    envelope = _client().call("DELETE", f"/api/v1/workflows/{_seg(workflow_id)}")
    if as_json:
        fmt.echo_envelope(envelope)
    else:
        click.echo(f"deleted {workflow_id}")


# --------------------------------------------------------------------------- deliveries


@click.group("deliveries")
def deliveries_group() -> None:
    """Webhook deliveries (over the API)."""


def _deliveries_table(rows: list[dict[str, Any]]) -> str:
    return fmt.table(
        ["RECEIVED", "DELIVERY ID", "STATUS", "VERIFIED", "REASON", "RUN"],
        [
            [
                fmt.ago(d.get("receivedAt")),
                d.get("deliveryId") or "-",
                d.get("statusCode", ""),
                "yes" if d.get("verified") else "no",
                d.get("reason") or "-",
                (d.get("runId") or "-") + (" (duplicate)" if d.get("duplicate") else ""),
            ]
            for d in rows
        ],
    )


@deliveries_group.command("list")
@click.argument("workflow_id")
@limit_option
@cursor_option
@all_option
@json_option
def deliveries_list(workflow_id: str, limit: int, cursor: str | None, follow: bool, as_json: bool) -> None:
    """A workflow's webhook delivery log, newest first."""
    path = f"/api/v1/workflows/{_seg(workflow_id)}/deliveries"
    again = f"baton deliveries list {workflow_id} --limit {limit}"
    params = {"limit": limit, "cursor": cursor}
    _listing(path, params, follow=follow, as_json=as_json, render=_deliveries_table, again=again)


# --------------------------------------------------------------------------- secrets


@click.group("secrets")
def secrets_group() -> None:
    """Encrypted secrets, used in templates as {{ secrets.NAME }} (over the API)."""


@secrets_group.command("set")
@click.argument("name")
@json_option
def secrets_set(name: str, as_json: bool) -> None:
    """Create or replace secret NAME; the value comes from stdin (a hidden prompt on a terminal)."""
    value = click.prompt("Value", hide_input=True) if sys.stdin.isatty() else sys.stdin.read().rstrip("\r\n")
    envelope = _client().call("PUT", f"/api/v1/secrets/{_seg(name)}", body={"value": value})
    if as_json:
        fmt.echo_envelope(envelope)
    else:
        click.echo(f"set {name}", err=True)


@secrets_group.command("list")
@json_option
def secrets_list(as_json: bool) -> None:
    """The company's secrets: names and times, never values."""
    envelope = _client().call("GET", "/api/v1/secrets")
    if as_json:
        fmt.echo_envelope(envelope)
        return
    rows = [[s["name"], fmt.ago(s.get("createdAt")), fmt.ago(s.get("updatedAt"))] for s in envelope["data"]]
    click.echo(fmt.table(["NAME", "CREATED", "UPDATED"], rows))


@secrets_group.command("delete")
@click.argument("name")
@json_option
def secrets_delete(name: str, as_json: bool) -> None:
    """Delete secret NAME."""
    envelope = _client().call("DELETE", f"/api/v1/secrets/{_seg(name)}")
    if as_json:
        fmt.echo_envelope(envelope)
    else:
        click.echo(f"deleted {name}", err=True)


COMMANDS = (login, runs_group, workflows_group, deliveries_group, secrets_group)
