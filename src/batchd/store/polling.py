"""The polling reads of ``Store.get_batch`` and ``Store.list_batches``: their statements, built
and compiled once per dialect, run on the DBAPI cursor of the pooled connection.

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

import dataclasses
import functools
import operator
from collections import namedtuple
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Dialect, bindparam, select
from sqlalchemy.sql import Select
from sqlalchemy.sql.compiler import Compiled

from batchd.store import schema

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
def _compiled(statement: Select[Any], dialect: Dialect) -> Compiled:
    return statement.compile(dialect=dialect)


def fetch(conn: Connection, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
    """All rows of ``statement`` with ``params``, as the DBAPI returns them (tuples)."""
    compiled = _compiled(statement, conn.dialect)
    values = compiled.construct_params(params)  # with the literals Core added (SQLite's OFFSET)
    cursor = conn.connection.cursor()
    try:
        if compiled.positiontup is not None:
            cursor.execute(compiled.string, tuple(values[name] for name in compiled.positiontup))
        else:
            cursor.execute(compiled.string, values)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def batch_rows(conn: Connection, statement: Select[Any], params: dict[str, Any]) -> list[Any]:
    """``fetch`` for statements selecting whole batches rows: named tuples (``row.status``)."""
    return [BatchRow._make(row) for row in fetch(conn, statement, params)]


@functools.cache
def _field_values(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    getter = operator.attrgetter(*(field.name for field in dataclasses.fields(cls)))
    return lambda obj: tuple(getter(obj))


def copied(obj: T) -> T:
    """A copy of a dataclass whose fields are all positional ``__init__`` arguments (the counts
    and usage of a batch): ``dataclasses.replace`` costs 2.4 us, this a third of that, and a
    list page copies two per batch."""
    return type(obj)(*_field_values(type(obj))(obj))
