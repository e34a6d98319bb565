"""Opening the database, SQLite (one process, the default) or PostgreSQL (shared by many),
and bringing it to the newest schema with the same Alembic migrations on both."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from batchd.errors import DatabaseUrlError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SUPPORTED_DIALECTS = ("sqlite", "postgresql")


# How every SQLite connection is opened, the pool's and the pollers' own (poll_reads.py).
SQLITE_CONNECT_ARGS: dict[str, Any] = {"check_same_thread": False, "timeout": 30}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets pollers read while the scheduler writes; synchronous=FULL makes an acknowledged
    # result survive a power cut, not only a process crash.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_sqlite(path: Path) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite+pysqlite:///{path}",
        connect_args=SQLITE_CONNECT_ARGS,
        pool_size=8,
        max_overflow=8,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def connect_sqlite(path: str) -> sqlite3.Connection:
    """A DBAPI connection to the SQLite file ``path`` outside any pool, set up exactly like
    the pool's."""
    dbapi: sqlite3.Connection = sqlite3.connect(path, **SQLITE_CONNECT_ARGS)
    _sqlite_pragmas(dbapi, None)
    return dbapi


def open_url(url: str, *, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    """A database named by URL. PostgreSQL: a pooled engine (``pool_size`` kept open, up to
    ``max_overflow`` more at a peak) whose connections are checked before use (a restarted or
    failed-over server must not surface as a 500)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"not a database URL: {url[:40]!r}...") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise DatabaseUrlError(
            f"unsupported database {parsed.get_backend_name()!r} in"
            f" {parsed.render_as_string(hide_password=True)}: use postgresql+psycopg://"
        )
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database:
            raise DatabaseUrlError("a SQLite URL needs a file path: sqlite:////path/batchd.db")
        return open_sqlite(Path(parsed.database))
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver we depend on
    return create_engine(parsed, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True)


def open_database(
    database_url: str | None, sqlite_path: Path, *, pool_size: int = 10, max_overflow: int = 10
) -> Engine:
    if database_url:
        return open_url(database_url, pool_size=pool_size, max_overflow=max_overflow)
    return open_sqlite(sqlite_path)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``. On PostgreSQL the transaction first takes an
    advisory lock, so several processes starting together migrate one after another."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(2026112501)")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
