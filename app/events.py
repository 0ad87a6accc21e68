"""Run events: every status change the engine's transitions make, published after its commit.

A transition *notes* its change on the SQLAlchemy session (``session.info``, no I/O); when the
session commits, one Redis script call appends the commit's events to two Redis Streams under the
queue namespace: the run's own stream (its whole history, kept ``RUN_STREAM_TTL_S``) and the
company's stream (capped, approximately, at ``COMPANY_STREAM_MAXLEN`` entries). A rolled-back
transaction publishes nothing, and publishing is best effort: a Redis error is logged and never
fails the commit it follows. Stream entry ids are the SSE event ids, so resuming after
``Last-Event-ID`` is an ``XREAD`` after that id.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from app.db import Database
from app.engine.states import RUN_TERMINAL, attempt_made
from app.timeutil import iso
from models import Run, StepRun
from models.states import RunStatus, StepStatus

logger = logging.getLogger("baton.events")

RUN_STREAM_TTL_S = 7 * 24 * 3600
# A run's stream is capped too (a pathological retry loop); a trimmed history is rebuilt from rows.
RUN_STREAM_MAXLEN = 10_000
COMPANY_STREAM_MAXLEN = 10_000
RUN, STEP = "run", "step"
_NOTED = "baton.events"
_publishers: weakref.WeakKeyDictionary[Database, Publisher] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Event:
    """One change: ``kind`` is ``run`` or ``step``; ``data`` is the SSE payload (camelCase)."""

    kind: str
    run_id: str
    company_id: str
    workflow_id: str
    data: dict[str, Any]


# --------------------------------------------------------------------------- payloads


def run_data(run: Run) -> dict[str, Any]:
    """A run event's payload, from a run row as the transition left it."""
    return run_payload(
        run.id, run.workflow_id, run.status, run.started_at, run.completed_at, run.duration_ms, run.error
    )


def run_payload(
    run_id: str,
    workflow_id: str,
    status: RunStatus,
    started: datetime | None,
    completed: datetime | None = None,
    duration: int | None = None,
    error: Any = None,
) -> dict[str, Any]:
    """A run event's payload from its columns (the hot path writes them without a loaded row)."""
    return {
        "runId": run_id,
        "workflowId": workflow_id,
        "status": str(status),
        "startedAt": iso(started),
        "completedAt": iso(completed),
        "durationMs": duration,
        "error": error,
    }


def step_data(
    run_id: str,
    step_id: str,
    status: StepStatus,
    attempt: int,
    started: datetime | None = None,
    completed: datetime | None = None,
    duration: int | None = None,
    error: Any = None,
) -> dict[str, Any]:
    """A step event's payload; ``attempt`` is the last attempt made, as ``GET /runs/:id`` shows it."""
    return {
        "runId": run_id,
        "stepId": step_id,
        "status": str(status),
        "attempt": attempt_made(status, attempt),
        "startedAt": iso(started),
        "completedAt": iso(completed),
        "durationMs": duration,
        "error": error,
    }


def row_data(row: StepRun, status: StepStatus | None = None, values: dict[str, Any] | None = None) -> dict:
    """A step event's payload from a step row, overlaid with the columns a statement just set."""
    values = values or {}

    def get(name: str) -> Any:
        return values[name] if name in values else getattr(row, name)

    return step_data(
        row.run_id,
        row.step_id,
        status or row.status,
        get("attempt"),
        get("started_at"),
        get("completed_at"),
        get("duration_ms"),
        get("error"),
    )


def encode(data: dict[str, Any]) -> str:
    """The JSON text of a payload, as stored in a stream and sent in ``data:``."""
    return json.dumps(data, separators=(",", ":"))


def is_final(kind: str, data: dict[str, Any]) -> bool:
    """Whether this is a run's last event (a terminal run status)."""
    return kind == RUN and data.get("status") in RUN_TERMINAL


def snapshot(run: Run, rows: Iterable[StepRun]) -> list[tuple[str, dict[str, Any]]]:
    """The run's current state as events (steps, then the run): the replay when its stream is gone."""
    steps = [(STEP, row_data(r)) for r in rows if r.status != StepStatus.PENDING]
    return [*steps, (RUN, run_data(run))]


# --------------------------------------------------------------------------- noting (in transitions)


def note_run(session: Session, run: Run) -> None:
    """A run moved (the loaded row follows it)."""
    _note(session, Event(RUN, run.id, run.company_id, run.workflow_id, run_data(run)))


def note_step(session: Session, owner: Any, data: dict[str, Any]) -> None:
    """A step moved; ``owner`` is anything with ``company_id`` and ``workflow_id`` (a claim, a run),
    or None to find the run in the session (it is loaded wherever a step moves without a claim)."""
    run_id = data["runId"]
    company_id, workflow_id = _owner_of(session, run_id) if owner is None else _pair(owner)
    _note(session, Event(STEP, run_id, company_id, workflow_id, data))


def note_created(session: Session, run: Run, steps: Iterable[dict[str, Any]]) -> None:
    """A new run (pending) and its steps that are already decided (reused) or queued."""
    for event in created(run, steps):
        _note(session, event)


def created(run: Any, steps: Iterable[dict[str, Any]]) -> list[Event]:
    """The events of a new run (pending) and of its steps already decided (reused) or queued: what
    ``note_created`` notes, for a trigger that commits without an ORM session and publishes itself."""
    found = [Event(RUN, run.id, run.company_id, run.workflow_id, run_data(run))]
    for row in steps:
        if row["status"] != StepStatus.PENDING:
            data = step_data(
                run.id,
                row["step_id"],
                row["status"],
                row["attempt"],
                row.get("started_at"),
                row.get("completed_at"),
                row.get("duration_ms"),
                row.get("error"),
            )
            found.append(Event(STEP, run.id, run.company_id, run.workflow_id, data))
    return found


def _pair(owner: Any) -> tuple[str, str]:
    return owner.company_id, owner.workflow_id


def _owner_of(session: Session, run_id: str) -> tuple[str, str]:
    """The run's company and workflow: from the session's identity map (no query) when loaded."""
    loaded = session.identity_map.get(identity_key(Run, run_id))
    state = loaded.__dict__ if loaded is not None else {}
    if "company_id" in state and "workflow_id" in state:
        return state["company_id"], state["workflow_id"]
    row = session.execute(select(Run.company_id, Run.workflow_id).where(Run.id == run_id)).one()
    return row[0], row[1]


def _note(session: Session, event: Event) -> None:
    session.info.setdefault(_NOTED, []).append(event)


# --------------------------------------------------------------------------- publishing


def run_stream(namespace: str, run_id: str) -> str:
    return f"{namespace}:events:run:{run_id}"


def company_stream(namespace: str, company_id: str) -> str:
    return f"{namespace}:events:company:{company_id}"


# Appends each event to its run's stream (trimmed, with its expiry renewed) and its company's stream,
# atomically: a reader blocked on either gets a commit's entries together, never half of them. One
# script call costs half the client CPU of the same commands in a pipeline (measured).
# KEYS: run stream, company stream (per event); ARGV: run maxlen, company maxlen, ttl, then
# kind, data, workflow id (per event).
_APPEND = """
for i = 0, (#ARGV - 3) / 3 - 1 do
  local kind, data = ARGV[4 + i * 3], ARGV[5 + i * 3]
  redis.call('XADD', KEYS[1 + i * 2], 'MAXLEN', '~', ARGV[1], '*', 'e', kind, 'd', data)
  redis.call('XADD', KEYS[2 + i * 2], 'MAXLEN', '~', ARGV[2], '*', 'e', kind, 'd', data, 'w', ARGV[6 + i * 3])
  redis.call('EXPIRE', KEYS[1 + i * 2], ARGV[3])
end
"""


class Publisher:
    """Publishes each commit's noted events in one script call; discards a rolled-back transaction's.

    In a worker process (``start_shipping``) a commit only hands its events to a shipping thread,
    which sends every commit waiting by then in one script call: the step's thread does not wait
    for Redis, and under load one call carries many commits (a call per commit cost a tenth of a
    worker's CPU, measured). Commits keep their order; the thread is stopped, and what it holds
    sent, when the worker shuts down.
    """

    BATCH_EVENTS = 500  # events per script call, at most

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.redis = client
        self.namespace = namespace
        self.append = client.register_script(_APPEND)  # EVALSHA, loaded again after a Redis restart
        self._outbox: queue.SimpleQueue[Any] | None = None
        self._shipper: threading.Thread | None = None

    def after_commit(self, session: Session) -> None:
        noted = session.info.pop(_NOTED, None)
        if noted:
            self.publish(noted)

    @staticmethod
    def after_transaction_end(session: Session, transaction: Any) -> None:
        if transaction.parent is None:  # the outermost transaction ended without a commit
            session.info.pop(_NOTED, None)

    def publish(self, events: list[Event]) -> None:
        """Best effort: an error is logged, never raised (the commit stands either way). A run's
        end goes after its steps' moves (a cancel's skipped steps come before the run's final
        event); other events keep the order they were noted in."""
        args = self._encode(events)
        outbox = self._outbox
        if outbox is not None:
            outbox.put(args)
        else:
            self._send(args)

    def _encode(self, events: list[Event]) -> list[Any]:
        """One commit's events as (run stream, company stream, kind, data, workflow id) tuples."""
        ns = self.namespace
        return [
            (
                run_stream(ns, e.run_id),
                company_stream(ns, e.company_id),
                e.kind,
                encode(e.data),
                e.workflow_id,
            )
            for e in sorted(events, key=_run_moves_last)
        ]

    def _send(self, encoded: list[Any]) -> None:
        keys, args = _script_call(encoded)
        try:
            self.append(keys, args)
        except Exception as exc:  # noqa: BLE001 (any failure: the transition already committed)
            logger.warning("could not publish %d run event(s): %s", len(encoded), exc)

    @property
    def shipping(self) -> bool:
        """Whether commits hand their events to the shipping thread (``start_shipping``)."""
        return self._outbox is not None

    def stage(self, pipe: Any, events: list[Event]) -> None:
        """Add the append to ``pipe`` (a pipeline on this publisher's Redis), to go in the same round
        trip as other commands; pass its result to ``staged_result``. By hash only: a pipeline that
        holds a script object asks Redis whether the script exists on every execute."""
        keys, args = _script_call(self._encode(events))
        pipe.evalsha(self.append.sha, len(keys), *keys, *args)

    def staged_result(self, events: list[Event], result: Any) -> None:
        """Finish a staged append: Redis lost the script (a restart), so send it again, which loads
        it; any other error is logged like ``publish``'s."""
        if isinstance(result, redis.exceptions.NoScriptError):
            self._send(self._encode(events))
        elif isinstance(result, Exception):
            logger.warning("could not publish %d run event(s): %s", len(events), result)

    # ----------------------------------------------------------------- shipping thread

    def start_shipping(self) -> None:
        """From now on commits hand their events to a thread of this process (workers)."""
        if self._shipper is not None:
            return
        self._outbox = queue.SimpleQueue()
        self._shipper = threading.Thread(target=self._ship, name="baton-events", daemon=True)
        self._shipper.start()

    def stop_shipping(self, timeout_s: float = 5.0) -> None:
        """Send what is waiting, then publish synchronously again."""
        outbox, shipper = self._outbox, self._shipper
        if outbox is None or shipper is None:
            return
        outbox.put(None)
        shipper.join(timeout_s)
        self._outbox = self._shipper = None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the shipping thread has sent every commit handed to it before this call
        (at once when not shipping); False if it did not within ``timeout_s``."""
        outbox = self._outbox
        if outbox is None:
            return True
        sent = threading.Event()
        outbox.put(sent)
        return sent.wait(timeout_s)

    def _ship(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        stopping = False
        while not stopping:
            first = outbox.get()
            if first is None:
                return
            batch: list[Any] = []
            flushed: list[threading.Event] = []
            item: Any = first
            while True:
                if isinstance(item, threading.Event):
                    flushed.append(item)
                else:
                    batch += item
                if len(batch) >= self.BATCH_EVENTS:
                    break
                try:
                    item = outbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
            if batch:
                self._send(batch)
            for done in flushed:
                done.set()


def _script_call(encoded: list[Any]) -> tuple[list[str], list[Any]]:
    """The append script's keys and arguments for ``Publisher._encode``'s tuples."""
    keys: list[str] = []
    args: list[Any] = [RUN_STREAM_MAXLEN, COMPANY_STREAM_MAXLEN, RUN_STREAM_TTL_S]
    for run_key, company_key, kind, data, workflow_id in encoded:
        keys += (run_key, company_key)
        args += (kind, data, workflow_id)
    return keys, args


def _run_moves_last(e: Event) -> bool:
    """A run's end goes after the step moves of the same commit; other moves keep their order (a
    pure step's claim commits with its result: the run starts between its step's running and
    success)."""
    return e.kind == RUN and e.data["status"] in _RUN_ENDS


_RUN_ENDS = frozenset(str(s) for s in RUN_TERMINAL)


def publisher_for(db: Database) -> Publisher | None:
    """The publisher of ``db``'s sessions (its namespace is where their events go)."""
    return _publishers.get(db)


def attach(db: Database, client: redis.Redis, namespace: str) -> None:
    """Publish the events of every session of ``db`` (once per database; the first client wins)."""
    if db in _publishers or not hasattr(db, "sessions"):
        return
    publisher = Publisher(client, namespace)
    _publishers[db] = publisher
    sa_event.listen(db.sessions, "after_commit", publisher.after_commit)
    sa_event.listen(db.sessions, "after_transaction_end", publisher.after_transaction_end)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry as the SSE layer sends it."""

    id: str
    kind: str
    data: str  # the JSON text, sent as is
    workflow_id: str | None = None

    def payload(self) -> dict[str, Any]:
        return json.loads(self.data)


def _decode(raw: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> Iterator[Entry]:
    for entry_id, fields in raw:
        workflow = fields.get(b"w")
        yield Entry(
            entry_id.decode(),
            fields[b"e"].decode(),
            fields[b"d"].decode(),
            workflow.decode() if workflow is not None else None,
        )


def history(client: redis.Redis, key: str) -> list[Entry]:
    """A whole stream, oldest first (a run's stream is small)."""
    return list(_decode(client.xrange(key, "-", "+")))


def last_id(client: redis.Redis, key: str) -> str:
    """The newest entry's id, or ``0-0`` for an empty or missing stream: read after it for "from now"."""
    newest = client.xrevrange(key, "+", "-", count=1)
    return newest[0][0].decode() if newest else "0-0"


def read_after(client: redis.Redis, key: str, after: str, block_ms: int, count: int = 500) -> list[Entry]:
    """Entries after ``after``, waiting up to ``block_ms`` for the first one."""
    answer = client.xread({key: after}, count=count, block=max(1, block_ms))
    if not answer:
        return []
    return list(_decode(answer[0][1]))


def is_creation(entry: Entry) -> bool:
    """The first event of a complete run history: the run, pending (no move leads back to it)."""
    return entry.kind == RUN and entry.payload().get("status") == RunStatus.PENDING
