"""Dashboard pages: server-rendered, signed in with an API key kept in a server-side session."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, Response, g, make_response, redirect, render_template, request, url_for
from sqlalchemy import select

from api import context
from api.dashboard import charts, queries, sessions, timeline
from api.schemas.runs import step_view
from app import engine, keys, rundiff
from app.engine.states import RUN_TERMINAL
from app.errors import BatonError, Forbidden, NotFound, ValidationError
from app.ids import RUN_ID, WORKFLOW_ID
from app.keys import RUNS_READ
from app.timeutil import iso, utcnow
from models import RUN_STATUSES, TRIGGER_TYPES, ApiKey, Company, StepStatus, Workflow

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
PUBLIC_ENDPOINTS = ("dashboard.login", "dashboard.static")
FINAL = sorted(str(s) for s in RUN_TERMINAL)
# The whole page comes from this origin; inline style attributes only (bar widths), never inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


@bp.before_request
def require_session() -> Any:
    """Every page but sign-in needs a live session whose key is still valid (re-checked each time)."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    found = sessions.current(context.services())
    if found is None:
        return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
    g.dashboard_session, g.principal = found
    g.company_id = g.principal.company_id
    if request.method not in sessions.SAFE_METHODS and not sessions.csrf_ok(g.dashboard_session, form=True):
        raise Forbidden("Missing or invalid CSRF token; reload the page and try again")
    return None


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(BatonError)
def error_page(error: BatonError) -> tuple[str, int]:
    return render_template("dashboard/error.html", error=error), error.status


@bp.app_template_filter("ts")
def format_ts(value: datetime | None) -> str:
    """A timestamp as people read it, in UTC (the API's exact form is in the element's title)."""
    return "–" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("iso")
def format_iso(value: datetime | None) -> str:
    return iso(value) or ""


@bp.app_template_filter("duration")
def format_duration(value: float | None) -> str:
    return timeline.human_ms(value)


@bp.app_template_filter("pretty")
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


@bp.app_context_processor
def page_context() -> dict[str, Any]:
    found = g.get("dashboard_session")
    return {
        "signed_in": found,
        "csrf_token": found.csrf if found else "",
        "final_statuses": FINAL,
    }


# ---- sign-in ---------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard (never another host) is followed after sign-in."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return url_for("dashboard.runs")


def _login_form(error: str | None = None, status: int = 200) -> Response:
    token = sessions.new_csrf()
    body = render_template(
        "dashboard/login.html", error=error, login_token=token, next=request.args.get("next")
    )
    response = make_response(body, status)
    sessions.set_cookie(response, sessions.LOGIN_COOKIE, token, sessions.LOGIN_TTL_S, path="/dashboard/login")
    return response


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """Sign in with an API key; a double-submit token guards the form against login CSRF."""
    services = context.services()
    if request.method == "GET":
        if sessions.current(services) is not None:
            return redirect(_safe_next(request.args.get("next")))
        return _login_form()
    sent, expected = request.form.get(sessions.CSRF_FIELD, ""), request.cookies.get(sessions.LOGIN_COOKIE, "")
    if not expected or sent != expected:
        return _login_form("The sign-in form expired; please try again.", 400)
    key = request.form.get("api_key", "").strip()
    with services.db.session() as db:
        principal = keys.authenticate(db, key)
        if principal is None:
            return _login_form("That API key is not valid (or was revoked).", 401)
        company = db.get(Company, principal.company_id)
        row = db.get(ApiKey, principal.key_id)
        found = sessions.DashboardSession(
            key_id=principal.key_id,
            company_id=principal.company_id,
            company_name=company.name if company else principal.company_id,
            key_label=f"{row.name} ({row.prefix}…)" if row else principal.key_id,
            csrf=sessions.new_csrf(),
        )
    sid = sessions.create(services, found)
    response = redirect(_safe_next(request.args.get("next")))
    sessions.set_cookie(response, sessions.COOKIE, sid, sessions.TTL_S)
    sessions.clear_cookie(response, sessions.LOGIN_COOKIE, path="/dashboard/login")
    return response


@bp.route("/logout", methods=["POST"])
def logout() -> Any:
    """Sign out: the server forgets the session, so the cookie is worthless even if kept."""
    sessions.delete(context.services(), request.cookies.get(sessions.COOKIE))
    response = redirect(url_for("dashboard.login"))
    sessions.clear_cookie(response, sessions.COOKIE)
    return response


# ---- runs ------------------------------------------------------------------------------------


def _parse_time(name: str) -> datetime | None:
    """A ``datetime-local`` value (or ISO 8601) from the query string, read as UTC."""
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"Invalid {name}: not a date and time") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _filters() -> queries.RunFilters:
    args = request.args
    workflow_id = args.get("workflowId") or None
    status = args.get("status") or None
    trigger_type = args.get("triggerType") or None
    if workflow_id and not WORKFLOW_ID.match(workflow_id):
        raise ValidationError("Invalid workflowId")
    if status and status not in RUN_STATUSES:
        raise ValidationError(f"Invalid status: one of {', '.join(RUN_STATUSES)}")
    if trigger_type and trigger_type not in TRIGGER_TYPES:
        raise ValidationError(f"Invalid triggerType: one of {', '.join(TRIGGER_TYPES)}")
    after, before = _parse_time("from"), _parse_time("to")
    window = args.get("range") or ""
    if after is None and window in queries.RANGES:
        after = utcnow() - queries.RANGES[window]
    return queries.RunFilters(workflow_id, status, trigger_type, after, before)


def _runs_context() -> dict[str, Any]:
    context.require(RUNS_READ)
    filters = _filters()
    cursor = request.args.get("cursor") or None
    limit = request.args.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise ValidationError("Invalid limit: 1 to 100")
    with context.services().db.session() as db:
        rows, meta = queries.runs_page(db, context.company_id(), filters, cursor, int(limit))
        names = queries.workflow_names(db, context.company_id())
        run_names = queries.names_by_key(db, {r.workflow_key for r in rows})
    base = {k: v for k, v in request.args.items() if k != "cursor" and v}
    return {
        "runs": rows,
        "meta": meta,
        "args": base,
        "cursor": cursor,
        "workflow_names": names,
        "run_names": run_names,
        "statuses": RUN_STATUSES,
        "trigger_types": TRIGGER_TYPES,
        "ranges": list(queries.RANGES),
        "query": request.query_string.decode(),
    }


@bp.route("")
def runs() -> str:
    return render_template("dashboard/runs.html", **_runs_context())


@bp.route("/runs/body")
def runs_body() -> str:
    """The runs table alone: what live updates swap in."""
    return render_template("dashboard/_runs_body.html", **_runs_context())


def _run_context(run_id: str) -> dict[str, Any]:
    context.require(RUNS_READ)
    if not RUN_ID.match(run_id):
        raise NotFound("Run not found")
    company_id = context.company_id()
    with context.services().db.session() as db:
        run = engine.get_run(db, company_id, run_id)
        rows = engine.step_runs(db, run.id)
        attempts = engine.step_attempts(db, run.id)
        definition = engine.definition_for(db, run.workflow_key, run.workflow_version)
        kids = queries.children(db, company_id, run.id)
        workflow_row = db.get(Workflow, run.workflow_key)
    running = [r for r in rows if r.status == StepStatus.RUNNING]
    logs = [step_view(a) for a in attempts] + [step_view(r) for r in running]
    steps = definition.get("steps", [])
    return {
        "run": run,
        "status": str(run.status),
        "steps": rows,
        "definition_steps": steps,
        "timeline": timeline.build(run, rows, attempts, steps),
        "logs": logs,
        "children": kids,
        "workflow_live": workflow_row is not None and workflow_row.deleted_at is None,
        "workflow_name": workflow_row.name if workflow_row is not None else run.workflow_id,
        "is_final": run.status in RUN_TERMINAL,
    }


@bp.route("/runs/<string:run_id>")
def run(run_id: str) -> str:
    return render_template("dashboard/run.html", **_run_context(run_id))


@bp.route("/runs/<string:run_id>/body")
def run_body(run_id: str) -> str:
    return render_template("dashboard/_run_body.html", **_run_context(run_id))


@bp.route("/runs/<string:run_id>/diff")
def run_diff(run_id: str) -> str:
    """This run compared with another of its workflow (``against``; its original by default)."""
    context.require(RUNS_READ)
    if not RUN_ID.match(run_id):
        raise NotFound("Run not found")
    company_id = context.company_id()
    against = request.args.get("against", "").strip()
    with context.services().db.session() as db:
        run = engine.get_run(db, company_id, run_id)
        if not against:
            if not run.restarted_from_run_id:
                raise ValidationError("Give the id of a run to compare with (against)")
            against = run.restarted_from_run_id
        diff = rundiff.diff_runs(db, company_id, run.id, against)
        other = engine.get_run(db, company_id, diff["againstRunId"])
    changed = sum(1 for step in diff["steps"] if step["changes"] or step["status"][0] != step["status"][1])
    return render_template("dashboard/diff.html", run=run, other=other, diff=diff, changed=changed)


# ---- workflows -------------------------------------------------------------------------------


@bp.route("/workflows")
def workflows() -> str:
    from app import workflows as store

    company_id = context.company_id()
    with context.services().db.session() as db:
        rows = db.execute(
            select(Workflow)
            .where(Workflow.company_id == company_id, Workflow.deleted_at.is_(None))
            .order_by(Workflow.created_at.desc(), Workflow.id.desc())
            .limit(200)
        ).scalars()
        items = [store.view(db, w, store.current_definition(db, w)) for w in rows]
    return render_template("dashboard/workflows.html", workflows=items)


@bp.route("/workflows/<string:workflow_id>")
def workflow(workflow_id: str) -> str:
    from app import workflows as store

    company_id = context.company_id()
    cursor = request.args.get("cursor") or None
    with context.services().db.session() as db:
        row = engine.get_workflow(db, company_id, workflow_id)
        item = store.view(db, row, store.current_definition(db, row))
        versions = queries.versions(db, row)
        deliveries, meta = queries.deliveries(db, row, cursor)
        recent = queries.last_runs(db, row) if g.principal.allows(RUNS_READ) else []
    shown = {k: v for k, v in item.items() if k not in ("created_at", "updated_at", "next_run_at", "version")}
    return render_template(
        "dashboard/workflow.html",
        workflow=item,
        definition=shown,
        versions=versions,
        deliveries=deliveries,
        meta=meta,
        cursor=cursor,
        recent=recent,
    )


# ---- overview --------------------------------------------------------------------------------


def _overview_context() -> dict[str, Any]:
    context.require(RUNS_READ)
    window = request.args.get("window", "24h")
    if window not in queries.WINDOWS:
        raise ValidationError(f"Invalid window: one of {', '.join(queries.WINDOWS)}")
    now = utcnow()
    with context.services().db.session() as db:
        figures = queries.overview(db, context.company_id(), window, now)
        names = queries.workflow_names(db, context.company_id())
    oldest_age = (now - figures.oldest_queued_at).total_seconds() * 1000 if figures.oldest_queued_at else None
    return {
        "window": window,
        "windows": list(queries.WINDOWS),
        "figures": figures,
        "oldest_age_ms": max(oldest_age, 0) if oldest_age is not None else None,
        "status_chart": charts.status_bars(figures.buckets, figures.bucket, figures.per_status),
        "failure_chart": charts.failure_line(figures.buckets, figures.bucket, figures.failure_rates()),
        "duration_chart": charts.duration_bars(figures.durations, names),
        "queue_chart": charts.queue_bar(figures.step_states),
        "colors": charts.COLORS,
    }


@bp.route("/overview")
def overview() -> str:
    return render_template("dashboard/overview.html", **_overview_context())


@bp.route("/overview/body")
def overview_body() -> str:
    return render_template("dashboard/_overview_body.html", **_overview_context())
