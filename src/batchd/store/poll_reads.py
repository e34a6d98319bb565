"""The polling reads of ``Store.get_batch`` and ``Store.list_batches``: their statements, built
and compiled once per dialect, run on a DBAPI cursor (see ``ReadConnections`` for whose).

These two reads are what every poll costs the database layer. Profiled on the 2-core test
machine, one retrieve's row cost ~95 us through ``Connection.execute`` (statement cache key,
execution context, result metadata, ``Row`` objects) against ~20 us for the same SQL on the
DBAPI cursor, and building the record from a ``Row`` cost 4x what it costs from a named tuple.
The SQL is SQLAlchemy's own compilation of a Core statement for the connection's dialect, with
its bind parameters in the dialect's style, so it is the query Core would send; the batches
columns are plain strings and integers, which no dialect post-processes, so the values are the
ones Core would return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Dialect, Engine, bindparam, select
from sqlalchemy.sql import Select
from sqlalchemy.sql.compiler import SQLCompiler

from batchd.store import database, schema

T = TypeVar("T")

_B = schema.batches
# A row of ``select(batches)``: the table's columns, in order, by name.
BatchRow = namedtuple("BatchRow", [column.name for column in _B.c])  # type: ignore[misc]

BATCH_BY_ID = select(_B).where(_B.c.id == bindparam("id"))
TENANT_BATCH_BY_ID = BATCH_BY_ID.where(_B.c.tenant == bindparam("tenant"))
TENANT_BATCH_SEQ = select(_B.c.seq).where(
    _B.c.id == bindparam("id"), _B.c.tenant == bindparam("tenant")
)
_TENANT_BATCHES = select(_B).where(
    _B.c.tenant == bindparam("tenant"), _B.c.surface == bindparam("surface")
)
# A page of ``n`` rows: newest first; older than a cursor seq; newer than it (oldest first).
PAGE = _TENANT_BATCHES.order_by(_B.c.seq.desc()).limit(bindparam("n"))
PAGE_OLDER = (
    _TENANT_BATCHES.where(_B.c.seq < bindparam("cursor"))
    .order_by(_B.c.seq.desc())
    .limit(bindparam("n"))
)
PAGE_NEWER = (
    _TENANT_BATCHES.where(_B.c.seq > bindparam("cursor"))
    .order_by(_B.c.seq.asc())
    .limit(bindparam("n"))
)


@functools.lru_cache(maxsize=32)
def _compiled(statement: Select[Any], dialect: Dialect) -> SQLCompiler:
    return statement.compile(dialect=dialect)


def fetch(
    dbapi: Any, dialect: Dialect, statement: Select[Any], params: dict[str, Any]
) -> list[Any]:
    """All rows of ``statement`` with ``params`` on the DBAPI connection ``dbapi``, as the
    DBAPI returns them (tuples)."""
    compiled = _compiled(statement, dialect)
    values = compiled.construct_params(params)  # with the literals Core added (SQLite's OFFSET)
    cursor = dbapi.cursor()
    try:
        if compiled.positiontup is not None:
            cursor.execute(compiled.string, tuple(values[name] for name in compiled.positiontup))
        else:
            cursor.execute(compiled.string, values)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def batch_rows(
    dbapi: Any, dialect: Dialect, statement: Select[Any], params: dict[str, Any]
) -> list[Any]:
    """``fetch`` for statements selecting whole batches rows: named tuples (``row.status``)."""
    return [BatchRow._make(row) for row in fetch(dbapi, dialect, statement, params)]


class ReadConnections:
    """The DBAPI connections the polling reads run on.

    PostgreSQL: a connection checked out of the engine's pool for each read (and pinged
    first, as the pool does for every checkout), since the server is across a network and
    may have restarted.

    SQLite: each thread's own connection to the local file, opened once beside the pool and
    kept. Checking a connection out of SQLAlchemy's pool and back in (the ``Connection``
    object, the checkout events, the rollback on return) cost more CPU than the read itself,
    and a poll pays it 200 times a second under load (measured: about a quarter of a
    retrieve's CPU). The connection is opened with the engine's own arguments and the same
    ``connect`` listeners as the pool's (WAL, busy timeout), and only ever runs SELECTs: in
    the sqlite3 module's default mode a SELECT opens no transaction that outlives it, so
    every read sees the latest commit and holds no snapshot that would stop a checkpoint.
    Only the threads that poll (the event loop's, on SQLite) ever open one."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._pinned = engine.dialect.name == "sqlite"
        self._local = threading.local()

    @contextlib.contextmanager
    def connection(self, *, poller: bool) -> Iterator[Any]:
        """A DBAPI connection for one read. ``poller``: a client's poll (on SQLite these run
        on the event loop's thread, inline); other reads (the scheduler's, from its thread
        pool) always take a pooled connection, so no pool thread pins one of its own."""
        if not (self._pinned and poller):
            with self.engine.connect() as conn:
                yield conn.connection
            return
        dbapi = getattr(self._local, "dbapi", None)
        if dbapi is None:
            dbapi = self._local.dbapi = database.connect_sqlite(self.engine.url.database or "")
        yield dbapi
        if dbapi.in_transaction:  # never, with SELECTs only; a guard, not a code path
            dbapi.rollback()


@functools.cache
def _field_values(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    getter = operator.attrgetter(*(field.name for field in dataclasses.fields(cls)))
    return lambda obj: tuple(getter(obj))


def copied(obj: T) -> T:
    """A copy of a dataclass whose fields are all positional ``__init__`` arguments (the counts
    and usage of a batch): ``dataclasses.replace`` costs 2.4 us, this a third of that, and a
    list page copies two per batch."""
    # mypy does not count a class as Hashable for functools.cache; every class is.
    return type(obj)(*_field_values(type(obj))(obj))  # type: ignore[arg-type]
