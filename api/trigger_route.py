"""``POST /api/v1/workflows/:id/runs``, answered before Flask's request cycle.

The trigger is the API's busiest route, and Flask's per-request machinery (request context,
session, URL matching, hooks, the marshmallow response schema) cost more CPU than the trigger
itself (profiled). This WSGI layer answers the common case alone: a request with an ``x-api-key``
this process has verified (or verifies now) that holds ``runs:write``, and a body the trigger
schema accepts. Every other request goes to Flask untouched, its body included: no key (a
dashboard session), a key that is invalid or lacks the scope, a body that is not a valid trigger, a
bad ``Idempotency-Key``. Those checks have no side effect, so each refusal is Flask's own answer.

From the rate limit on, this layer answers itself. The limit is counted on Flask-Limiter's own
counters, so the key's budget is shared with every other route. Then the engine triggers the
run. The response is the spec's envelope, byte for byte what the Flask view would send, and the
request's latency is recorded under the route's rule.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.http import HTTP_STATUS_CODES

from api.context import nested_deeper_than
from api.metrics import share_series
from api.schemas.runs import RunEnvelope
from api.schemas.workflows import CALLER_TRIGGER_TYPES
from api.workflows import REPLAY_HEADERS, replay_view
from app import engine, keys, logs, metrics, ratelimit
from app.engine.trigger import NewRun
from app.errors import error_for
from app.timeutil import iso

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
PATH = re.compile(r"/api/v1/workflows/([^/]+)/runs")
FIELDS = frozenset({"input", "triggerType"})


class TriggerRoute:
    """WSGI middleware: the trigger route's common case here, everything else to ``flask_app``."""

    def __init__(self, app: Flask, flask_app: WSGIApp) -> None:
        self.app = app
        self.flask_app = flask_app
        self.services = app.extensions["baton"]
        self.limiter: ratelimit.FailOpenLimiter | None = app.extensions.get(ratelimit.EXTENSION)
        self.max_length = app.config["MAX_CONTENT_LENGTH"]
        rule, _ = app.url_map.bind("localhost").match(
            "/api/v1/workflows/wf_x/runs", method="POST", return_rule=True
        )
        self.route = rule.rule  # the latency metric's label, as Flask's hook names it

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "POST":
            match = PATH.fullmatch(environ.get("PATH_INFO", ""))
            if match is not None:
                return self.trigger(environ, start_response, match.group(1))
        return self.flask_app(environ, start_response)

    def trigger(
        self, environ: dict[str, Any], start_response: Callable[..., Any], workflow_id: str
    ) -> Iterable[bytes]:
        started = time.perf_counter()
        request = self._accepted(environ, workflow_id)
        if request is None:
            return self.flask_app(environ, start_response)
        api_key, principal, run_input, trigger_type, idempotency_key = request
        logs.clear()
        logs.bind(company_id=principal.company_id)
        headers: dict[str, str] = {}
        try:
            if self.limiter is not None:
                self.limiter.hit_request_limits(ratelimit.key_client(api_key))
            run, created = engine.trigger_run(
                self.services,
                principal.company_id,
                workflow_id,
                run_input,
                trigger_type,
                idempotency_key=idempotency_key,
            )
            if created:
                status, body = 202, created_view(run)
            else:
                status, body = (
                    200,
                    RunEnvelope().dump(replay_view(self.services, principal.company_id, run.id)),
                )
                headers = REPLAY_HEADERS
        except Exception as exc:  # as Flask's error handlers answer it
            error = error_for(exc)
            status, body, headers = error.status, error.to_dict(), error.headers
        finally:
            logs.clear()
        # Flask's JSON response: compact, with a final newline.
        data = (self.app.json.dumps(body, separators=(",", ":")) + "\n").encode()
        metrics.http_request(self.route, "POST", status, time.perf_counter() - started)
        share_series(self.services)
        start_response(
            f"{status} {HTTP_STATUS_CODES[status].upper()}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers.items()],
        )
        return [data]

    def _accepted(
        self, environ: dict[str, Any], workflow_id: str
    ) -> tuple[str, keys.Principal, dict[str, Any], str, str | None] | None:
        """(key, principal, input, trigger type, Idempotency-Key) of a request this layer answers;
        None hands it to Flask (with its body put back)."""
        api_key = environ.get("HTTP_X_API_KEY")
        if not api_key or not workflow_id.isascii() or "HTTP_TRANSFER_ENCODING" in environ:
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if not 0 <= length <= self.max_length:
            return None
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        if len(body) != length:
            return None
        idempotency_key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if idempotency_key is not None and not (
            1 <= len(idempotency_key) <= 255 and idempotency_key.isprintable()
        ):
            return None
        args = self._body(environ, body)
        if args is None:
            return None
        principal = keys.verified(api_key)
        if principal is None:
            try:
                with self.services.db.session() as session:
                    principal = keys.authenticate(session, api_key)
            except Exception:  # the database is down: Flask answers it (503)
                return None
        if principal is None or not principal.allows(keys.RUNS_WRITE):
            return None
        return api_key, principal, args[0], args[1], idempotency_key

    def _body(self, environ: dict[str, Any], body: bytes) -> tuple[dict[str, Any], str] | None:
        """(input, trigger type) of a body the trigger schema accepts as it is, else None."""
        if body:
            mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
            is_json = mimetype == "application/json" or (
                mimetype.startswith("application/") and mimetype.endswith("+json")
            )
            if not is_json or nested_deeper_than(body, self.services.config.json_max_depth):
                return None
            try:
                args = json.loads(body)
            except (ValueError, RecursionError):
                return None
        else:
            args = {}
        if type(args) is not dict or not args.keys() <= FIELDS:
            return None
        run_input = args.get("input", {})
        trigger_type = args.get("triggerType", "api")
        if (
            type(run_input) is not dict
            or type(trigger_type) is not str
            or trigger_type not in CALLER_TRIGGER_TYPES
        ):
            return None
        return run_input, trigger_type


def created_view(run: NewRun) -> dict[str, Any]:
    """A new run as the route's response schema renders it (``RunEnvelope`` of ``run_detail``),
    without the schema's per-field work."""
    return {
        "success": True,
        "data": {
            "id": run.id,
            "workflowId": run.workflow_id,
            "status": run.status.value,
            "triggerType": run.trigger_type,
            "input": run.input,
            "output": None,
            "stepResults": [],
            "startedAt": None,
            "completedAt": None,
            "durationMs": None,
            "error": None,
            "createdAt": iso(run.created_at),
            "workflowVersion": run.workflow_version,
            "restartedFromRunId": None,
            "restartFromStepId": None,
        },
    }


def install(app: Flask) -> None:
    """Put the trigger route in front of the app's WSGI callable (``app.wsgi_app``)."""
    app.wsgi_app = TriggerRoute(app, app.wsgi_app)  # type: ignore[method-assign]
