"""The Alembic migrations build exactly the tables schema.py declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from batchd.store import database
from batchd.store.schema import metadata
from batchd.store.store import Store


def test_migrated_schema_equals_declared_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    database.upgrade(store.engine)  # idempotent on an up-to-date database
