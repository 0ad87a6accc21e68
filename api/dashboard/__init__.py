"""The operator dashboard (``/dashboard``) and the API docs UI (``/api/docs``), served by the API app."""

from __future__ import annotations

from flask import Flask, Response, redirect


def register(app: Flask) -> None:
    """Mount the dashboard, the docs UI and ``GET /`` → ``/dashboard``."""
    from api.dashboard import apidocs, views

    app.register_blueprint(views.bp)
    app.register_blueprint(apidocs.bp)
    app.add_url_rule("/", "root", _root)


def _root() -> Response:
    return redirect("/dashboard")
