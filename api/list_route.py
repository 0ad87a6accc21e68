"""``GET /api/v1/runs``, answered before Flask's request cycle.

The runs list is read often (dashboards, scripts polling for failures), and under load its latency
is the CPU it waits for: Flask's per-request machinery (request context, URL matching, the
limiter's per-request resolution, webargs) cost more than the list itself (profiled). This WSGI
layer answers the common case alone, as ``api.trigger_route`` does for triggers: a request with an
``x-api-key`` this process has verified (or verifies now) that holds ``runs:read``, and a query
string the list's query schema accepts as it is. Every other request goes to Flask untouched: no
key (a dashboard session), a key that is invalid or lacks the scope, an unknown or repeated
parameter, a value the schema would refuse or convert, an SQLite database. Those checks have no
side effect, so each refusal is Flask's own answer.

From the rate limit on, this layer answers itself: the limit is counted on Flask-Limiter's own
counters (the key's budget is shared with every other route), then one statement on the driver's
connection in autocommit (one round trip: no ORM session, no BEGIN or ROLLBACK) reads the page.
The response is the spec's envelope, byte for byte what the Flask view sends (the entries and the
cursor are built by the same functions), and the request's latency is recorded under the route's
rule.
"""

from __future__ import annotations

import re
import time
from collections import namedtuple
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from flask import Flask
from marshmallow import ValidationError as MarshmallowError
from psycopg.rows import namedtuple_row, tuple_row
from werkzeug.http import HTTP_STATUS_CODES

from api.metrics import share_series
from api.pagination import MAX_CURSOR_CHARS, decode_cursor, meta
from api.runs import _error_view, run_summary
from api.schemas.common import ok
from api.schemas.runs import ListRunsQuerySchema
from app import keys, logs, metrics, ratelimit
from app.db import autocommitted
from app.errors import ValidationError, error_for
from app.ids import WORKFLOW_ID
from app.timeutil import from_epoch_ms
from models import RUN_STATUSES, TRIGGER_TYPES

Row = namedtuple("Row", "id created_at")  # what pagination.meta reads of a row
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
PATH = "/api/v1/runs"
# The query parameters of ListRunsQuerySchema, in the order their conditions are written.
FILTERS = ("workflowId", "status", "triggerType", "createdAfter", "createdBefore", "cursor")
FIELDS = frozenset((*FILTERS, "limit"))
DEFAULT_LIMIT = 50
# What the schema's Integer(strict=False) with Range(1, 100) reads as the same number: plain
# digits. Anything else it might accept (" 7", "+7", "007", "1_0") is left to Flask.
LIMIT = re.compile(r"[1-9][0-9]?|100")
# Only the columns a list entry shows (a run's input and output may be megabytes each). PostgreSQL
# writes each entry's JSON text, as run_summary and Flask's JSON encoder would (compact, keys in the
# schema's order, times as ``iso`` renders them), except its error (5 % of runs or so): that is
# rendered here, by _error_view. Each entry is ``head + error + tail``; the page's cursor comes
# from the last row's created_at and id.
TIME = """'"' || to_char({0} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || '"'"""
SELECT = (
    "SELECT id, created_at, "
    """'{"id":' || to_json(id)::text || ',"workflowId":' || to_json(workflow_id)::text"""
    """ || ',"status":' || to_json(status)::text || ',"triggerType":' || to_json(trigger_type)::text"""
    """ || ',"startedAt":' || coalesce(""" + TIME.format("started_at") + """, 'null')"""
    """ || ',"completedAt":' || coalesce(""" + TIME.format("completed_at") + """, 'null')"""
    """ || ',"durationMs":' || coalesce(duration_ms::text, 'null') || ',"error":',"""
    " CASE WHEN jsonb_typeof(error) = 'object' THEN error END,"
    """ ',"createdAt":' || """ + TIME.format("created_at") + """ || '}'"""
    " FROM runs WHERE company_id = %(company)s"
)
# The same page as plain columns, rendered by run_summary: for a page whose text PostgreSQL's JSON
# escaping and Python's (ASCII only) might write differently (never seen: ids are ASCII).
PLAIN = (
    "SELECT id, workflow_id, status, trigger_type, started_at, completed_at, duration_ms, error, "
    "created_at FROM runs WHERE company_id = %(company)s"
)
CONDITIONS = {
    "workflowId": " AND workflow_id = %(workflowId)s",
    "status": " AND status = %(status)s",
    "triggerType": " AND trigger_type = %(triggerType)s",
    "createdAfter": " AND created_at >= %(createdAfter)s",
    "createdBefore": " AND created_at < %(createdBefore)s",
    "cursor": " AND (created_at, id) < (%(cursorAt)s, %(cursorId)s)",
}
ORDER = " ORDER BY created_at DESC, id DESC LIMIT %(rows)s"


@lru_cache(maxsize=256)
def statement(present: frozenset[str], select: str = SELECT) -> str:
    """The page's SQL for the filters given (64 combinations at most, each built once)."""
    return select + "".join(CONDITIONS[name] for name in FILTERS if name in present) + ORDER


class ListRoute:
    """WSGI middleware: the runs list's common case here, everything else to ``flask_app``."""

    def __init__(self, app: Flask, flask_app: WSGIApp) -> None:
        self.app = app
        self.flask_app = flask_app
        self.services = app.extensions["baton"]
        self.limiter: ratelimit.FailOpenLimiter | None = app.extensions.get(ratelimit.EXTENSION)
        fields = ListRunsQuerySchema().fields
        self.dates = {name: fields[name] for name in ("createdAfter", "createdBefore")}
        rule, _ = app.url_map.bind("localhost").match(PATH, method="GET", return_rule=True)
        self.route = rule.rule  # the latency metric's label, as Flask's hook names it

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if (
            environ.get("PATH_INFO") == PATH
            and environ.get("REQUEST_METHOD") == "GET"
            and not self.services.db.is_sqlite
        ):
            return self.list(environ, start_response)
        return self.flask_app(environ, start_response)

    def list(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        request = self._accepted(environ)
        if request is None:
            return self.flask_app(environ, start_response)
        api_key, principal, params = request
        logs.clear()
        logs.bind(company_id=principal.company_id)
        headers: dict[str, str] = {}
        try:
            status, text = 200, self._page(api_key, principal.company_id, params)
        except Exception as exc:  # as Flask's error handlers answer it
            error = error_for(exc)
            status, text, headers = error.status, self._dumps(error.to_dict()), error.headers
        finally:
            logs.clear()
        # Flask's JSON response: compact, with a final newline.
        data = (text + "\n").encode()
        metrics.http_request(self.route, "GET", status, time.perf_counter() - started)
        share_series(self.services)
        start_response(
            f"{status} {HTTP_STATUS_CODES[status].upper()}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers.items()],
        )
        return [data]

    def _accepted(self, environ: dict[str, Any]) -> tuple[str, keys.Principal, dict[str, Any]] | None:
        """(key, principal, statement parameters) of a request this layer answers; None hands it to
        Flask."""
        api_key = environ.get("HTTP_X_API_KEY")
        if not api_key:
            return None
        params = self._params(environ.get("QUERY_STRING", ""))
        if params is None:
            return None
        principal = keys.verified(api_key)
        if principal is None:
            try:
                principal = keys.authenticate_on(self.services.db, api_key)
            except Exception:  # the database is down: Flask answers it (503)
                return None
        if principal is None or not principal.allows(keys.RUNS_READ):
            return None
        return api_key, principal, params

    def _params(self, query_string: str) -> dict[str, Any] | None:
        """The page's statement parameters from a query string ListRunsQuerySchema accepts with
        exactly these values, else None. Parsed as Werkzeug parses ``request.args``."""
        if not query_string.isascii():
            return None
        pairs = parse_qsl(query_string, keep_blank_values=True, errors="werkzeug.url_quote")
        args = dict(pairs)
        if len(args) != len(pairs) or not args.keys() <= FIELDS:
            return None
        params: dict[str, Any] = {name: args[name] for name in FILTERS if name in args}
        limit = args.get("limit")
        if limit is None:
            params["rows"] = DEFAULT_LIMIT + 1
        elif LIMIT.fullmatch(limit):
            params["rows"] = int(limit) + 1
        else:
            return None
        if "workflowId" in params and not WORKFLOW_ID.match(params["workflowId"]):
            return None
        if params.get("status", RUN_STATUSES[0]) not in RUN_STATUSES:
            return None
        if params.get("triggerType", TRIGGER_TYPES[0]) not in TRIGGER_TYPES:
            return None
        for name, field in self.dates.items():
            if name in params:
                try:
                    value: datetime = field.deserialize(params[name])
                except MarshmallowError:
                    return None
                params[name] = value.astimezone(timezone.utc)
        if "cursor" in params:
            cursor = params["cursor"]
            if not 1 <= len(cursor) <= MAX_CURSOR_CHARS:
                return None
            try:
                ts, params["cursorId"] = decode_cursor(cursor)
            except ValidationError:
                return None
            params["cursorAt"] = from_epoch_ms(ts)
        return params

    def _page(self, api_key: str, company_id: str, params: dict[str, Any]) -> str:
        """The spec's list envelope as JSON text: one page of the company's runs, newest first.
        The rate limit's counters are sent first and read after the query: one wait for both
        round trips (each wait is a wake-up that queues for a core on a busy machine)."""
        limited = self.limiter.start_request_limits(ratelimit.key_client(api_key)) if self.limiter else None
        present = frozenset(params)
        params = dict(params, company=company_id)
        try:
            rows = self._rows(statement(present), params)
        finally:
            if limited is not None:
                limited()  # RateLimited past the key's budget: the page read is dropped
        limit = params["rows"] - 1
        dumps = self.app.json.dumps
        entries = ",".join(
            head + ("null" if error is None else dumps(_error_view(error), separators=(",", ":"))) + tail
            for _id, _created_at, head, error, tail in rows[:limit]
        )
        if not entries.isascii() or "\x7f" in entries:
            plain = self._rows(statement(present, PLAIN), params, namedtuple_row)
            return self._dumps(ok([run_summary(r) for r in plain[:limit]], meta(plain, limit)[1]))
        page_meta = meta([Row(r[0], r[1]) for r in rows], limit)[1]
        return '{"success":true,"data":[' + entries + '],"meta":' + self._dumps(page_meta) + "}"

    def _dumps(self, value: Any) -> str:
        """Flask's compact JSON."""
        return self.app.json.dumps(value, separators=(",", ":"))

    def _rows(self, sql: str, params: dict[str, Any], row_factory: Any = tuple_row) -> list[Any]:
        """The statement's rows, on the driver's own connection in autocommit: one round trip."""
        return autocommitted(self.services.db, sql, params, lambda cursor: cursor.fetchall(), row_factory)


def install(app: Flask) -> None:
    """Put the list route in front of the app's WSGI callable (``app.wsgi_app``)."""
    app.wsgi_app = ListRoute(app, app.wsgi_app)  # type: ignore[method-assign]
