"""The pollers' reads on SQLite: a connection of the thread's own beside the pool, which must
see every commit and never hold a snapshot."""

from __future__ import annotations

from batchd.store.records import BatchStatus
from batchd.store.store import Store
from tests.unit.store.builders import add_batch


def test_poll_reads_on_their_own_sqlite_connection_see_every_commit(sqlite_store: Store) -> None:
    """On SQLite a poller's reads run on a connection of the thread's own, kept open beside
    the pool (store/poll_reads.py's ReadConnections). It must hold no snapshot: each read sees
    the last commit, and it never leaves a transaction open (that would stop the WAL from
    being checkpointed). The scheduler's reads still go through the pool."""
    store = sqlite_store
    add_batch(store, "batch_s", 2)
    first = store.get_batch("batch_s", "t", stats_max_age=3600)
    assert first is not None and first.status == BatchStatus.IN_PROGRESS
    pinned = store._reads._local.dbapi
    checked_out = store.engine.pool.checkedout()
    # Another thread commits (the scheduler's own pooled connection): the pinned one sees it.
    assert store.transition("batch_s", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    again = store.get_batch("batch_s", "t", stats_max_age=3600)
    assert again is not None and again.status == BatchStatus.CANCELLING
    page, _ = store.list_batches("t", "openai", after=None, limit=10, stats_max_age=3600)
    assert [b.status for b in page] == [BatchStatus.CANCELLING]
    assert store._reads._local.dbapi is pinned  # one connection, reused
    assert not pinned.in_transaction
    assert store.engine.pool.checkedout() == checked_out
    # Unknown and foreign ids read as None on the pinned connection too.
    assert store.get_batch("batch_s", "someone-else", stats_max_age=3600) is None
    assert store.get_batch("batch_nope", "t", stats_max_age=3600) is None
    # A checkpoint completes: no reader pins an old snapshot of the WAL.
    with store.engine.connect() as conn:
        busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    assert busy == 0
