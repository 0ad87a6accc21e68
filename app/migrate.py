"""Schema migrations through Alembic, configured from Baton's config."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

from app.db import Database

MIGRATIONS = Path(__file__).resolve().parent.parent / "models" / "migrations"


def alembic_config(db: Database) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    cfg = alembic_config(db)
    with db.engine.connect() as connection:
        if db.is_sqlite:
            # SQLite alters a table by copying and dropping it, and dropping a parent table with
            # foreign keys on would cascade-delete its children. The pragma is ignored inside a
            # transaction, so it goes to the driver connection before the first statement.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, revision)
        finally:
            if db.is_sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
