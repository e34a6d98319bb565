"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.store import database
from batchd.store.store import Store
from tests.support.pg import fresh_database


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own for the test (skipped, saying why, where no
    PostgreSQL server is reachable)."""
    with fresh_database() as url:
        yield url


@pytest.fixture()
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """A migrated store on SQLite in the test's temporary directory."""
    engine = database.open_sqlite(tmp_path / "db.sqlite3")
    database.upgrade(engine)
    yield Store(engine)
    engine.dispose()
