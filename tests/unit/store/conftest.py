"""The store contract suite's fixture: one ``Store`` per test, on SQLite (a temporary file) and
on PostgreSQL (a fresh database of its own; skipped, saying why, where none is reachable).

Every test that takes ``store`` runs on both: the store's one promise is that the two
databases behave alike, and this is where that is checked without a server or a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from batchd.store import database
from batchd.store.store import Store


def _open(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return database.open_sqlite(tmp_path / "db.sqlite3")
    # Requested only here, so the SQLite runs never touch (or wait for) PostgreSQL.
    url: str = request.getfixturevalue("postgres_url")
    return database.open_url(url, pool_size=2, max_overflow=4)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    engine = _open(request, tmp_path)
    database.upgrade(engine)
    yield Store(engine)
    engine.dispose()  # before postgres_url drops the database
