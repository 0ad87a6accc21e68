"""Run events as Server-Sent Events: one run's history then its live changes, or a company's feed.

Each event is ``id:`` (its Redis Stream entry id), ``event: run|step`` and one ``data:`` line of
camelCase JSON (``app.events``). Resume with the ``Last-Event-ID`` header (or ``lastEventId``) to
get exactly the events after it. A stream ends after ``STREAM_MAX_S`` (the client reconnects with
``Last-Event-ID``) or at shutdown, so open streams never hold a server thread for long.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Response, request, stream_with_context
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import EXCLUDE, Schema, fields, validate

from api import context
from api.docs import errors
from app import engine, events
from app.errors import NotFound, ValidationError
from app.events import Entry
from app.ids import RUN_ID, WORKFLOW_ID
from app.keys import RUNS_READ
from models.states import StepStatus

logger = logging.getLogger("baton.events")
blp = Blueprint("events", __name__, url_prefix="/api/v1", description="Run events (Server-Sent Events)")
blp.before_request(context.authenticate)

HEARTBEAT_S = 15.0  # a comment line this often while nothing else is sent (proxies, dead clients)
STREAM_MAX_S = 300.0  # then the stream ends and the client resumes with Last-Event-ID
POLL_S = 1.0  # longest blocking read, so shutdown and the time limit are noticed promptly
LINGER_S = 30.0  # after a run's final event, how long to wait for a step still executing
# Set on SIGTERM in a server process (app/gunicorn_conf.py): every open stream ends within POLL_S.
SHUTDOWN = threading.Event()

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}\Z")
_ID_RULE = "An event id as sent in `id:` (digits-digits)"


# --------------------------------------------------------------------------- SSE text


def sse_event(event_id: str, kind: str, data: str) -> str:
    """One SSE event; a multi-line payload becomes several ``data:`` lines (JSON text has none)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\nevent: {kind}\n{lines}\n"


def sse_comment(text: str) -> str:
    return f": {text}\n\n"


HEARTBEAT = sse_comment("heartbeat")


def parse_event_id(value: str | None) -> tuple[int, int] | None:
    """``ms-seq`` → a comparable pair; None when absent; a 400 when it is not an event id."""
    if value is None or value == "":
        return None
    if not _EVENT_ID.match(value):
        raise ValidationError(f"Invalid Last-Event-ID: {_ID_RULE}", details={"Last-Event-ID": [_ID_RULE]})
    ms, seq = value.split("-")
    return int(ms), int(seq)


# --------------------------------------------------------------------------- streaming


@dataclass
class RunState:
    """What a run's events said so far: is it final, and which steps are still executing."""

    final: bool = False
    running: set[str] = field(default_factory=set)

    def see(self, kind: str, data: dict[str, Any]) -> None:
        if kind == events.RUN:
            self.final = events.is_final(kind, data)
        elif data.get("status") == StepStatus.RUNNING:
            self.running.add(data["stepId"])
        else:
            self.running.discard(data.get("stepId"))

    @property
    def done(self) -> bool:
        return self.final and not self.running


@dataclass
class Feed:
    """One open stream: where it reads, from which id, and what it has already to send."""

    client: redis.Redis
    key: str
    cursor: str
    replay: list[Entry] = field(default_factory=list)
    state: RunState | None = None  # a run's stream (it ends with the run), else a company's feed
    workflow_id: str | None = None


def pump(feed: Feed) -> Iterator[str]:
    """Replay, then live entries, heartbeats while idle, until done, the time limit or shutdown."""
    started = last_sent = time.monotonic()
    yield sse_comment("connected")  # the headers and this line go out now, not at the first event
    for entry in feed.replay:
        yield sse_event(entry.id, entry.kind, entry.data)
    final_since: float | None = None
    while not SHUTDOWN.is_set() and not (feed.state is not None and feed.state.done):
        now = time.monotonic()
        if feed.state is not None and feed.state.final:
            final_since = final_since or now
            if now - final_since >= LINGER_S:
                return
        if now - started >= STREAM_MAX_S:
            return
        if now - last_sent >= HEARTBEAT_S:
            yield HEARTBEAT
            last_sent = now
        wait = min(POLL_S, HEARTBEAT_S - (now - last_sent), STREAM_MAX_S - (now - started))
        try:
            batch = events.read_after(feed.client, feed.key, feed.cursor, int(wait * 1000))
        except redis.RedisError as exc:
            logger.warning("event stream %s ended: %s", feed.key, exc)
            return  # the client reconnects with Last-Event-ID once Redis is back
        for entry in batch:
            feed.cursor = entry.id
            if feed.workflow_id is not None and entry.workflow_id != feed.workflow_id:
                continue
            yield sse_event(entry.id, entry.kind, entry.data)
            last_sent = time.monotonic()
            if feed.state is not None:
                feed.state.see(entry.kind, entry.payload())


def _respond(feed: Feed) -> Response:
    return Response(stream_with_context(pump(feed)), mimetype="text/event-stream", headers=HEADERS)


def _last_event_id(args: dict[str, Any]) -> tuple[str, tuple[int, int]] | None:
    """The header wins over the query parameter (EventSource sends the header when it resumes)."""
    raw = request.headers.get("Last-Event-ID") or args.get("lastEventId")
    parsed = parse_event_id(raw)
    return None if parsed is None else (raw, parsed)


def _key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def run_feed(services: Any, company_id: str, run_id: str, last: tuple[str, tuple[int, int]] | None) -> Feed:
    """A run's feed: its stream's history (the part after ``last``) then the live tail.

    A stream that does not begin with the run's creation lost its start (expired, trimmed, or Redis
    restarted empty): the replay is then the run's current rows, with ids ``0-1``, ``0-2``… that
    sort before any real entry, and the tail follows the stream from its newest entry."""
    with services.db.session() as session:
        run = engine.get_run(session, company_id, run_id)
    key = events.run_stream(services.namespace, run.id)
    entries = events.history(services.redis, key)
    state = RunState()
    complete = bool(entries) and events.is_creation(entries[0])
    if complete and (last is None or last[1] >= _key(entries[0].id)):
        for entry in entries:
            state.see(entry.kind, entry.payload())
        replay = [e for e in entries if last is None or _key(e.id) > last[1]]
        cursor = entries[-1].id
    else:
        replay = _snapshot(services, company_id, run_id, last)
        for entry in replay:
            state.see(entry.kind, entry.payload())
        cursor = entries[-1].id if entries else "0-0"
    return Feed(services.redis, key, cursor, replay, state)


def _snapshot(
    services: Any, company_id: str, run_id: str, last: tuple[str, tuple[int, int]] | None
) -> list[Entry]:
    """The run's current state as events; a final run's is stable, so a resume skips what was sent."""
    with services.db.session() as session:
        run = engine.get_run(session, company_id, run_id)
        rows = engine.step_runs(session, run.id)
    snap = events.snapshot(run, rows)
    entries = [Entry(f"0-{i}", kind, events.encode(data)) for i, (kind, data) in enumerate(snap, 1)]
    stable = events.is_final(*snap[-1])
    if last is not None and last[1][0] == 0 and stable:
        entries = [e for e in entries if _key(e.id) > last[1]]
    return entries


def _replay_nothing(feed: Feed) -> bool:
    return feed.state is not None and feed.state.done and not feed.replay


# --------------------------------------------------------------------------- routes


class RunEventsQuerySchema(Schema):
    lastEventId = fields.String(
        validate=validate.Regexp(_EVENT_ID, error=_ID_RULE),
        metadata={"description": "Resume after this event id (for clients that cannot send Last-Event-ID)"},
    )


class CompanyEventsQuerySchema(RunEventsQuerySchema):
    workflowId = fields.String(
        validate=validate.Regexp(WORKFLOW_ID, error="Not a workflow id"),
        metadata={"description": "Only this workflow's runs"},
    )


class LastEventIdHeaderSchema(Schema):
    class Meta:
        unknown = EXCLUDE  # every other header

    lastEventId = fields.String(
        data_key="Last-Event-ID",
        validate=validate.Regexp(_EVENT_ID, error=_ID_RULE),
        metadata={"description": "Resume after this event id: exactly the events after it, none twice"},
    )


# One event of the stream (comments such as ``: heartbeat`` are not events).
EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "description": "Resume after it with Last-Event-ID"},
        "event": {"type": "string", "enum": [events.RUN, events.STEP]},
        "data": {
            "type": "string",
            "description": (
                "camelCase JSON: run events {runId, workflowId, status, startedAt, completedAt, "
                "durationMs, error}; step events {runId, stepId, status, attempt, startedAt, "
                "completedAt, durationMs, error}"
            ),
        },
    },
}


def _stream_responses(what: str, *, no_content: bool = False) -> dict[str, Any]:
    content = {"text/event-stream": {"schema": {**EVENT_SCHEMA, "description": what}}}
    responses: dict[str, Any] = {"200": {"description": what, "content": content}}
    if no_content:
        responses["204"] = {
            "description": "Resumed after the final event of a finished run: nothing more (EventSource stops)"
        }
    return {"responses": responses}


RUN_STREAM_DOC = "The run's events: its history, then live, ending after its final event"


@blp.route("/runs/<string:run_id>/events")
class RunEvents(MethodView):
    @blp.arguments(RunEventsQuerySchema, location="query", error_status_code=400)
    @blp.arguments(LastEventIdHeaderSchema, location="headers", error_status_code=400)
    @blp.doc(**_stream_responses(RUN_STREAM_DOC, no_content=True))
    @errors(blp, 403, 404)
    def get(self, args: dict[str, Any], _headers: dict[str, Any], run_id: str) -> Response:
        """Stream a run's status and step changes (Server-Sent Events); ends after its final event."""
        context.require(RUNS_READ)
        if not RUN_ID.match(run_id):
            raise NotFound("Run not found")
        last = _last_event_id(args)
        feed = run_feed(context.services(), context.company_id(), run_id, last)
        if last is not None and _replay_nothing(feed):
            return Response(status=204, headers=HEADERS)
        return _respond(feed)


@blp.route("/events")
class CompanyEvents(MethodView):
    @blp.arguments(CompanyEventsQuerySchema, location="query", error_status_code=400)
    @blp.arguments(LastEventIdHeaderSchema, location="headers", error_status_code=400)
    @blp.doc(**_stream_responses("The company's run and step changes from now (or after Last-Event-ID)"))
    @errors(blp, 403)
    def get(self, args: dict[str, Any], _headers: dict[str, Any]) -> Response:
        """Stream the company's run and step changes (Server-Sent Events), optionally one workflow's."""
        context.require(RUNS_READ)
        last = _last_event_id(args)
        services = context.services()
        key = events.company_stream(services.namespace, context.company_id())
        cursor = last[0] if last is not None else events.last_id(services.redis, key)
        return _respond(Feed(services.redis, key, cursor, workflow_id=args.get("workflowId")))
