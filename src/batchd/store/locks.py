"""The database locks the store takes beyond row locks: a tenant's admission lock, held for one
transaction, and a batch's finalize lock, held on a connection of its own.

Both are PostgreSQL advisory locks in the two-int form, whose keys never meet the single-bigint
lock the migrations take (database.upgrade). SQLite has one writer at a time and one worker
process, so there the admission lock is the write lock and the finalize lock always granted.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

from sqlalchemy import Connection, Engine, text

# Transaction advisory locks serializing one tenant's admissions.
TENANT_LOCK_SPACE = 20261201

# Session advisory locks held while one worker writes a batch's result files.
FINALIZE_LOCK_SPACE = 20261202


def advisory_key(name: str) -> int:
    """A stable signed 32-bit key for an advisory lock on ``name``."""
    unsigned = zlib.crc32(name.encode())
    return unsigned - (1 << 32) if unsigned >= 1 << 31 else unsigned


def lock_tenant(conn: Connection, tenant: str) -> None:
    """Hold ``tenant``'s admission lock until ``conn``'s transaction ends, before anything in
    it is read. PostgreSQL: a transaction advisory lock keyed on the tenant. SQLite: ``BEGIN
    IMMEDIATE``, since pysqlite opens its transaction lazily, at the first write, and a count
    read before that could go stale before the insert that relies on it."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": TENANT_LOCK_SPACE, "key": advisory_key(tenant)},
        )
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.contextmanager
def finalize_lock(engine: Engine, batch_id: str) -> Iterator[bool]:
    """Whether this process may finalize ``batch_id`` now (see Store.finalize_lock)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    params = {"space": FINALIZE_LOCK_SPACE, "key": advisory_key(batch_id)}
    conn = engine.connect()
    try:
        held = bool(
            conn.execute(text("SELECT pg_try_advisory_lock(:space, :key)"), params).scalar()
        )
        conn.commit()
        try:
            yield held
        finally:
            if held:
                conn.execute(text("SELECT pg_advisory_unlock(:space, :key)"), params)
                conn.commit()
    except BaseException:
        conn.invalidate()  # never hand a connection that may still hold the lock back
        raise
    finally:
        conn.close()
