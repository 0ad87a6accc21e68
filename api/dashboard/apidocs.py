"""Swagger UI for ``/api/v1/openapi.json`` at ``/api/docs``, from the assets a pip package ships."""

from __future__ import annotations

from importlib.resources import files

from flask import Blueprint, Response, g, render_template, send_from_directory

from api import context
from api.dashboard import sessions
from app.errors import is_transient

bp = Blueprint("docs_ui", __name__, url_prefix="/api/docs")
ASSETS = str(files("flask_swagger_ui") / "dist")
SERVED = ("swagger-ui.css", "index.css", "swagger-ui-bundle.js", "favicon-32x32.png")


@bp.route("")
@bp.route("/")
def index() -> str:
    """The docs page; a signed-in dashboard user's "Try it out" calls carry the session's CSRF token."""
    try:
        found = sessions.current(context.services())
    except Exception as exc:  # the docs stay readable through a Redis or database outage
        if not is_transient(exc):
            raise
        found = None
    g.dashboard_session = found[0] if found else None
    return render_template("dashboard/docs.html")


@bp.route("/assets/<path:name>")
def asset(name: str) -> Response:
    if name not in SERVED:
        return Response(status=404)
    return send_from_directory(ASSETS, name, max_age=3600)


@bp.after_request
def security_headers(response: Response) -> Response:
    from api.dashboard.views import CSP

    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
