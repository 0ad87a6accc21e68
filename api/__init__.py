"""HTTP API: one blueprint module per resource."""

from __future__ import annotations

from flask_smorest import Api


def register(api: Api) -> None:
    from api import bulk, events, health, keys, runs, secrets, webhooks, workflows

    api.register_blueprint(health.blp)
    api.register_blueprint(workflows.blp)
    api.register_blueprint(bulk.blp)  # before runs: /runs/bulk/… is not a run id
    api.register_blueprint(runs.blp)
    api.register_blueprint(webhooks.blp)
    api.register_blueprint(keys.blp)
    api.register_blueprint(secrets.blp)
    api.register_blueprint(events.blp)
