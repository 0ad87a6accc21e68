"""PostgreSQL's hot path on the driver's connection, without the ORM session.

A message's claim, a chained step's record-and-claim-next and the last step's record-and-finish
are each one statement of ``statements`` and one commit. They run here on a pooled psycopg
connection: the statements are compiled once to SQL text (their constants kept as parameters),
and psycopg prepares them on the server after a few executions. The ORM session around the same
statements cost about a third of a worker's CPU per step (measured): a Session, its transaction
events, SQLAlchemy's parameter and result processing. Everything else (retries, failures,
parking, SQLite) keeps the session-based functions of ``execution`` and ``transitions``.

What a transition notes on a session (its run events, its metrics) is noted on the ``Tx`` here
and published or counted only after the commit, as the session's hooks do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import psycopg
from sqlalchemy.dialects.postgresql import psycopg as pg_dialect

from app import events, metrics
from app.db import Database, autocommit, count_statements
from app.engine import statements as sql
from app.engine.graph import graph
from app.engine.reads import cached_definition, remember_definition
from app.engine.transitions import claimed_data
from app.engine.types import Claim, Outcome
from app.timeutil import duration_ms
from models.states import RunStatus, StepStatus

R, S = RunStatus, StepStatus
_DIALECT = pg_dialect.dialect()
# A chain of pure steps stays in one transaction (one commit) while it is younger than this: its
# locks and its steps' progress are held back from others for no longer.
OPEN_CHAIN_S = 0.05


class Statement:
    """A statement compiled once for psycopg: its SQL text and its constant parameters."""

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.text = str(compiled)
        self.constants = {
            name: value.value if isinstance(value, Enum) else value
            for name, value in compiled.params.items()
            if value is not None
        }


CLAIM_QUEUED = Statement(sql.CLAIM_QUEUED)
CHAIN = Statement(sql.CHAIN)
FINISH = Statement(sql.FINISH)
FINISHED_RESULTS = Statement(sql.FINISHED_RESULTS)
DEFINITION = "SELECT definition FROM workflow_versions WHERE workflow_key = %(k)s AND version = %(v)s"


def jsonb(value: Any) -> str:
    """A JSON column's parameter (the statements cast it to JSONB; None is JSON null, as the
    ORM's JSON type writes it)."""
    return json.dumps(value)


def utc(value: datetime | None) -> datetime | None:
    return value.astimezone(timezone.utc) if value is not None else None


# Called with "statement" or "commit" for each sent on the hot path (tests count them; the ORM's
# engine events do not see the driver's connection).
observers: list[Callable[[str], None]] = []


def _observe(kind: str) -> None:
    if kind == "statement":
        count_statements()  # the process's statement counter (the ORM engine's event misses these)
    for observer in observers:
        observer(kind)


class Tx:
    """One transaction on a pooled driver connection; its events and counts follow its commit."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.raw = db.engine.raw_connection()
        self.conn: psycopg.Connection[Any] = self.raw.driver_connection  # type: ignore[assignment]
        self.events: list[events.Event] = []
        self.counts: list[Callable[[], None]] = []
        self.opened = time.monotonic()

    def young(self) -> bool:
        """Still short enough to carry on with another pure step (``OPEN_CHAIN_S``)."""
        return time.monotonic() - self.opened < OPEN_CHAIN_S

    def __enter__(self) -> Tx:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, _tb: Any) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """Give the connection back, rolling back what was not committed."""
        try:
            if exc is not None or self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._rollback(exc)
        finally:
            self.raw.close()

    def _rollback(self, exc: BaseException | None) -> None:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            self.raw.invalidate()  # the connection may be dead: the pool replaces it
            return
        try:
            self.conn.rollback()
        except psycopg.Error:
            self.raw.invalidate()

    def one(self, statement: Statement, params: dict[str, Any]) -> Any:
        _observe("statement")
        return self.conn.execute(statement.text, {**statement.constants, **params}).fetchone()

    def all(self, statement: Statement, params: dict[str, Any]) -> list[Any]:
        _observe("statement")
        return self.conn.execute(statement.text, {**statement.constants, **params}).fetchall()

    def note_step(self, claim: Any, data: dict[str, Any]) -> None:
        self.events.append(
            events.Event(events.STEP, data["runId"], claim.company_id, claim.workflow_id, data)
        )

    def note_run(self, claim: Any, data: dict[str, Any]) -> None:
        self.events.append(events.Event(events.RUN, data["runId"], claim.company_id, claim.workflow_id, data))

    def one_and_commit(self, statement: Statement, params: dict[str, Any]) -> Any:
        """The transaction's last statement, then its commit; the statement's row. A lone statement
        runs in autocommit mode: its own transaction, one round trip (no BEGIN or COMMIT); after a
        deferred claim the commit follows. Only for a statement that writes nothing when it does
        not apply (the commit does not depend on its row)."""
        _observe("statement")
        _observe("commit")
        conn = self.conn
        query = {**statement.constants, **params}
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            row = conn.execute(statement.text, query).fetchone()
            conn.commit()
            return row
        with autocommit(conn):  # a broken connection: the pool replaces it (``close``)
            return conn.execute(statement.text, query).fetchone()

    def commit(self) -> None:
        _observe("commit")
        self.conn.commit()
        self.after_commit()

    def after_commit(self) -> None:
        """Publish the noted events and count the noted metrics (the transaction committed)."""
        if self.events:
            publisher = events.publisher_for(self.db)
            if publisher is not None:
                publisher.publish(self.events)
        for count in self.counts:
            count()

    def rollback(self) -> None:
        self.conn.rollback()
        self.events.clear()
        self.counts.clear()


def definition(tx: Tx, workflow_key: str, version: int) -> dict[str, Any]:
    """A workflow version's definition (immutable: cached by the process)."""
    found = cached_definition(workflow_key, version)
    if found is None:
        _observe("statement")
        row = tx.conn.execute(DEFINITION, {"k": workflow_key, "v": version}).fetchone()
        found = row[0]
        remember_definition(workflow_key, version, found)
    return found


def finished_results(tx: Tx, run_id: str) -> dict[str, dict[str, Any]]:
    rows = tx.all(FINISHED_RESULTS, {"b_run": run_id})
    return {step_id: {"output": output, "status": S(status)} for step_id, output, status in rows}


def record_params(claim: Claim, to: StepStatus, values: dict[str, Any]) -> dict[str, Any]:
    """RECORD's parameters (see ``transitions._record_params``), JSON columns as JSON text."""
    return {
        "b_run": claim.run_id,
        "b_step": claim.step_id,
        "b_attempt": claim.attempt,
        "v_status": to.value,
        "v_input": jsonb(values.get("input")),
        "v_output": jsonb(values.get("output")),
        "v_error": jsonb(values.get("error")),
        "v_started_at": values.get("started_at"),
        "v_completed_at": values.get("completed_at"),
        "v_duration_ms": values.get("duration_ms"),
    }


def note_recorded(tx: Tx, claim: Claim, to: StepStatus, values: dict[str, Any]) -> None:
    """The recorded attempt's event."""
    tx.note_step(claim, claimed_data(claim, to, values))


def count_attempt(tx: Tx, claim: Claim, outcome: Outcome, to: StepStatus, duration_ms: int | None) -> None:
    seconds = duration_ms / 1000 if duration_ms is not None else None
    tx.counts.append(lambda: metrics.count_attempt(claim.step["action"], str(to), seconds))


# --------------------------------------------------------------------------- the three moves


class Fallback(Exception):
    """The message's step is not plainly claimable (a due delay, a stale message, a deadline that
    passed): the general, session-based claim decides."""


def never(_step: dict[str, Any]) -> bool:
    return False


def claim_queued(
    db: Database,
    run_id: str,
    step_id: str,
    attempt: int,
    now: datetime,
    lease: datetime,
    defer: Callable[[dict[str, Any]], bool] = never,
) -> Claim | None:
    """``statements.CLAIM_QUEUED``: the message's queued step → running, a pending run → running;
    None when the run is not active, ``Fallback`` when the general claim must decide.

    When ``defer(step)`` is true (a pure step) the claim is not committed: the claim holds its open
    transaction (``Claim.tx``), and the step's result is recorded and committed in it."""
    params = {"b_run": run_id, "b_step": step_id, "b_attempt": attempt, "now": now, "lease": lease}
    tx = Tx(db)
    try:
        row = tx.one(CLAIM_QUEUED, params)
        if row is None:
            return None
        (
            company_id,
            workflow_id,
            workflow_key,
            version,
            trigger_type,
            run_input,
            status,
            _deadline,
            run_started_at,
            position,
            error,
            started,
        ) = row
        if position is None:
            tx.rollback()
            if status in (R.PENDING, R.RUNNING):
                raise Fallback
            return None
        found = definition(tx, workflow_key, version)
        # Only a step that needs others has finished steps to see (their results feed templates).
        results = finished_results(tx, run_id) if graph(found).needs[position] else {}
        claim = Claim(
            run_id=run_id,
            company_id=company_id,
            workflow_id=workflow_id,
            trigger_type=trigger_type,
            run_input=run_input,
            definition=found,
            position=position,
            attempt=attempt,
            started_at=now,
            results=results,
            run_started_at=now if started else utc(run_started_at),
        )
        tx.note_step(claim, events.step_data(run_id, step_id, S.RUNNING, attempt, now, error=error))
        if started:
            tx.note_run(claim, events.run_payload(run_id, workflow_id, R.RUNNING, now))
        # A DAG's step records through the run's lock (``execution.settle``): its claim commits first.
        if defer(claim.step) and graph(found).linear:
            claim.tx, tx = tx, None
            return claim
        tx.commit()
    except BaseException as exc:
        if tx is not None:
            tx.close(exc)
            tx = None
        raise
    finally:
        if tx is not None:
            tx.close()
    return claim


def commit_claim(claim: Claim) -> None:
    """A deferred claim (``claim_queued``) committed on its own: its step did not simply finish."""
    tx, claim.tx = claim.tx, None
    if tx is not None:
        with tx:
            tx.commit()


def abandon_claim(claim: Claim, exc: BaseException | None = None) -> None:
    """A deferred claim rolled back: its step stays queued, as if the message was never taken."""
    tx, claim.tx = claim.tx, None
    if tx is not None:
        tx.close(exc or RuntimeError("claim abandoned"))


def _tx_of(db: Database, claim: Claim) -> Tx:
    """The deferred claim's open transaction (the record commits it), or a new one."""
    tx, claim.tx = claim.tx, None
    return tx if tx is not None else Tx(db)


def chain(
    db: Database,
    claim: Claim,
    outcome: Outcome,
    values: dict[str, Any],
    lease: datetime,
    keep_open: bool = False,
) -> tuple[bool, bool, Tx | None]:
    """``statements.CHAIN``: the attempt recorded and logged, the next step claimed while the run
    is running; whether each applied. With ``keep_open`` (the claim's transaction is still open and
    the next step is pure too) nothing is committed and the open transaction is returned, for the
    next step's claim: it commits with that step's result."""
    following = claim.definition["steps"][claim.position + 1]["id"]
    now = values["completed_at"]
    params = record_params(claim, outcome.status, values) | {"b_next": following, "now": now, "lease": lease}
    tx: Tx | None = _tx_of(db, claim)
    assert tx is not None
    try:
        if keep_open:
            _held, recorded, _logged, claimed = tx.one(CHAIN, params)
        else:
            _held, recorded, _logged, claimed = tx.one_and_commit(CHAIN, params)
        if recorded == 1:
            note_recorded(tx, claim, outcome.status, values)
            count_attempt(tx, claim, outcome, outcome.status, values["duration_ms"])
            if claimed == 1:
                tx.note_step(claim, events.step_data(claim.run_id, following, S.RUNNING, 1, now))
        if keep_open and recorded == 1 and claimed == 1:
            kept, tx = tx, None
            return True, True, kept
        if keep_open:
            tx.commit()
        else:
            tx.after_commit()
        return recorded == 1, claimed == 1, None
    except BaseException as exc:
        if tx is not None:
            failed, tx = tx, None
            failed.close(exc)
        raise
    finally:
        if tx is not None:
            tx.close()


def finish(
    db: Database, claim: Claim, outcome: Outcome, values: dict[str, Any], ending: tuple[RunStatus, Any, Any]
) -> bool | None:
    """``statements.FINISH``: the last attempt recorded and logged, and the run ended as ``ending``
    (status, output, error) if it is still running. None when the record did not apply (someone
    else recorded this attempt); else whether the run ended here."""
    status, output, error = ending
    now = values["completed_at"]
    took = duration_ms(claim.run_started_at, now)
    run_values = {
        "r_status": status.value,
        "r_completed_at": now,
        "r_duration_ms": took,
        "r_output": jsonb(output),
        "r_error": jsonb(error),
    }
    with _tx_of(db, claim) as tx:
        _held, recorded, _logged, finished = tx.one_and_commit(
            FINISH, record_params(claim, outcome.status, values) | run_values
        )
        if recorded != 1:
            tx.after_commit()
            return None
        note_recorded(tx, claim, outcome.status, values)
        count_attempt(tx, claim, outcome, outcome.status, values["duration_ms"])
        if finished == 1:
            data = events.run_payload(
                claim.run_id, claim.workflow_id, status, claim.run_started_at, now, took, error
            )
            tx.note_run(claim, data)
            tx.counts.append(lambda: metrics.count_run_finished(claim.workflow_id, status))
        tx.after_commit()
    return finished == 1
