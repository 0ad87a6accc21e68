"""Engine and session factory shared by the API, the workers and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import Config


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
