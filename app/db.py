"""Engine and session factory shared by the API, the workers and the CLI."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import Config

T = TypeVar("T")

# --------------------------------------------------------------------------- statement counter

# SQL statements this process sent to the database: every engine of a ``Database`` counts through a
# cursor event, and code that talks to the driver directly calls ``count_statements``. The metrics
# module publishes the total (``baton_db_statements_total``) so the API's ``/metrics`` sums every
# process; the benchmark divides the workers' share by the steps they executed.
_statements = 0
_statements_lock = threading.Lock()


def count_statements(n: int = 1) -> None:
    """Count ``n`` statements sent without going through a ``Database`` engine (raw driver calls)."""
    global _statements
    with _statements_lock:
        _statements += n


def statements_executed() -> int:
    """Statements this process has sent since it started (an ``executemany`` is one)."""
    return _statements


def _reset_after_fork() -> None:
    """A forked child has sent nothing yet (a pre-forking server must not count its parent twice)."""
    global _statements, _statements_lock
    _statements, _statements_lock = 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _count_cursor_execute(*_args: Any, **_kwargs: Any) -> None:
    count_statements()


def count_engine_statements(engine: Engine) -> None:
    """Count every statement ``engine`` executes (once per cursor execute, ``executemany`` included)."""
    if not event.contains(engine, "after_cursor_execute", _count_cursor_execute):
        event.listen(engine, "after_cursor_execute", _count_cursor_execute)


# --------------------------------------------------------------------------- engine and sessions


class Database:
    """One engine and one session factory per process."""

    def __init__(self, config: Config, *, pool_size: int = 10) -> None:
        self.url = config.resolved_database_url()
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            Path(config.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_serialised_writes(self.engine)
        else:
            # No pool_pre_ping: it costs a round trip and an (empty) commit on every checkout, which
            # doubled PostgreSQL commits per step. A connection that died is invalidated on its first
            # error (SQLAlchemy detects disconnects) and connections are recycled every 30 minutes.
            self.engine = create_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800
            )
        count_engine_statements(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_serialised_writes(engine: Engine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE: SQLite cannot upgrade a read lock safely."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def autocommit(conn: Any) -> Iterator[Any]:
    """A pooled driver connection (psycopg) in autocommit for the block: a lone statement is its
    own transaction, one round trip with no BEGIN or COMMIT. The pool expects it back in
    transaction mode; a connection that broke meanwhile is left to the caller to invalidate."""
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed:
            try:
                conn.autocommit = False
            except Exception:  # noqa: BLE001 (broken: the caller's error handling replaces it)
                pass


def autocommitted(
    db: Database, sql: Any, params: Any, read: Callable[[Any], T], row_factory: Any = None
) -> T:
    """``read(cursor)`` of one statement sent on a pooled driver connection (psycopg) in autocommit:
    one round trip, no ORM session, no BEGIN or COMMIT. Its errors are raised as SQLAlchemy raises
    them (an outage is then a 503, a value PostgreSQL refuses a 400), and a connection that broke
    is dropped from the pool."""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    try:
        pooled = db.engine.raw_connection()
    except psycopg.Error as exc:
        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
    conn = pooled.driver_connection
    try:
        with autocommit(conn), conn.cursor(row_factory=row_factory) as cursor:
            count_statements()  # sent on the driver's connection, past the engine's counter
            return read(cursor.execute(sql, params))
    except psycopg.Error as exc:
        if conn.closed or conn.broken:
            pooled.invalidate()
        raise DBAPIError.instance(sql, params, exc, psycopg.Error) from exc
    finally:
        pooled.close()
