"""``GET /metrics``: Prometheus text for every Baton process, and the API's request latency hooks."""

from __future__ import annotations

import hmac
import time

from flask import Flask, Response, current_app, request
from flask.views import MethodView
from flask_smorest import Api, Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from sqlalchemy import func, select

from api import context
from api.docs import public_errors
from api.schemas.common import ErrorEnvelopeSchema
from app import logs, metrics
from app.errors import Unauthorized
from app.services import Services
from app.timeutil import as_utc, utcnow
from models import StepRun
from models.states import StepStatus

blp = Blueprint("metrics", __name__, description="Prometheus metrics")
STARTED = "baton.request_started"
UNMATCHED = "unmatched"  # the route label of a request no URL rule matched (bounded, unlike paths)
UNAUTHORIZED = "UNAUTHORIZED: BATON_METRICS_TOKEN is set and the Bearer token is missing or wrong"
TEXT = {
    "description": "Prometheus text exposition format (version 0.0.4)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}


def queue_state(services: Services) -> tuple[int, float]:
    """Steps queued and due now, and how long the oldest of them has waited (seconds)."""
    now = utcnow()
    due = (StepRun.status == StepStatus.QUEUED) & (StepRun.queued_at <= now)
    with services.db.session() as session:
        depth, oldest = session.execute(select(func.count(), func.min(StepRun.queued_at)).where(due)).one()
    age = (now - as_utc(oldest)).total_seconds() if oldest is not None else 0.0
    return int(depth), max(0.0, age)


class _Snapshot:
    """A collector over samples gathered once per scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition(services: Services) -> bytes:
    """Every process's series merged, and the queue gauges read from the database now."""
    totals = metrics.cluster_samples(services.redis, services.namespace)
    families = [*metrics.families(totals), *metrics.queue_gauges(*queue_state(services))]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))  # type: ignore[arg-type]
    return generate_latest(registry)


def _check_token(token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized(
            "Missing or invalid metrics token", headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
        )


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.doc(security=[], responses={"200": TEXT})
    @public_errors(blp, 503)
    @blp.alt_response(401, schema=ErrorEnvelopeSchema, description=UNAUTHORIZED)
    def get(self) -> Response:
        """Prometheus metrics of the API, the workers and the scheduler (Bearer token if configured)."""
        services = context.services()
        _check_token(current_app.extensions["baton_config"].metrics_token)
        return Response(exposition(services), mimetype=None, content_type=CONTENT_TYPE_LATEST)


def _start_request() -> None:
    """Start the latency timer; the log context is this request's alone (threads are reused)."""
    request.environ[STARTED] = time.perf_counter()
    logs.clear()
    logs.bind(run_id=(request.view_args or {}).get("run_id"))


def _end_request(_error: BaseException | None) -> None:
    logs.clear()  # nothing of this request's context reaches what the thread logs next


def _observe(response: Response) -> Response:
    started = request.environ.get(STARTED)
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        metrics.http_request(route, request.method, response.status_code, time.perf_counter() - started)
    share_series(context.services())
    return response


def share_series(services: Services) -> None:
    """Start this process's snapshot thread once it serves requests (not at import: gunicorn forks)."""
    if metrics.current_publisher() is None:
        metrics.start_publisher(services.redis, services.namespace)


def init_app(app: Flask, api: Api) -> None:
    """Register ``/metrics`` and time every request (call before other ``before_request`` hooks)."""
    app.before_request(_start_request)
    app.after_request(_observe)
    app.teardown_request(_end_request)
    api.register_blueprint(blp)
