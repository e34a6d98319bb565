from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from batchd.clock import now
from batchd.protocol.batch_file import RequestLine
from batchd.store import database
from batchd.store.records import BatchStatus, RequestOutcome, RequestState
from batchd.store.schema import metadata
from batchd.store.store import Store


def make_store(tmp_path: Path) -> Store:
    engine = database.open_sqlite(tmp_path / "db.sqlite3")
    database.upgrade(engine)
    return Store(engine)


def add_batch(store: Store, batch_id: str, rows: int) -> None:
    store.create_batch(
        {
            "id": batch_id,
            "tenant": "t",
            "surface": "openai",
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-x",
            "completion_window": "24h",
            "status": BatchStatus.VALIDATING.value,
            "created_at": now(),
            "expires_at": now() + 3600,
        }
    )
    store.insert_requests(
        batch_id,
        [RequestLine(i + 1, f"c{i}", b"{}", "m", "k") for i in range(rows)],
    )
    assert store.transition(batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)


def test_migrated_schema_equals_declared_schema(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    database.upgrade(store.engine)  # idempotent on an up-to-date database


def test_lease_complete_and_fencing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    add_batch(store, "batch_a", 3)
    leased = store.lease("worker-1", 2, lease_seconds=30)
    assert [r.line_no for r in leased] == [1, 2]
    assert store.counts("batch_a").running == 2

    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert store.complete(leased[0], "worker-1", ok)
    assert not store.complete(leased[0], "worker-1", ok), "a final row is never written twice"
    assert not store.complete(leased[1], "worker-2", ok), "only the lease holder may write"

    # The lease lapses and another worker takes the row: the first worker's epoch is stale.
    assert store.requeue_running(lapsed_before=now() + 60) == 1
    again = store.lease("worker-2", 5, lease_seconds=30)
    assert {r.line_no for r in again} == {2, 3}
    assert not store.complete(leased[1], "worker-1", ok)
    fresh = next(r for r in again if r.line_no == 2)
    assert fresh.epoch == leased[1].epoch + 1
    assert store.complete(fresh, "worker-2", ok)
    counts = store.counts("batch_a")
    assert (counts.succeeded, counts.running) == (2, 1)


def test_the_epoch_fences_the_same_worker_after_its_own_lease_lapsed(tmp_path: Path) -> None:
    """The owner alone is not the fence: a worker that stalled past its lease and then got the
    same row again holds a newer epoch, and its stale task must not write with the old one."""
    store = make_store(tmp_path)
    add_batch(store, "batch_e", 1)
    (first,) = store.lease("worker-1", 1, lease_seconds=30)
    assert store.requeue_running(lapsed_before=now() + 60) == 1
    (second,) = store.lease("worker-1", 1, lease_seconds=30)
    assert (second.seq, second.epoch) == (first.seq, first.epoch + 1)
    assert store.held_leases("worker-1") == {(second.seq, second.epoch)}
    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert not store.release(first, "worker-1", 0), "a stale epoch cannot hand the row back"
    assert not store.complete(first, "worker-1", ok), "a stale epoch cannot write a result"
    assert store.complete(second, "worker-1", ok)
    assert store.counts("batch_e").succeeded == 1


def test_a_worker_ends_only_its_own_running_rows(tmp_path: Path) -> None:
    """Cancel and expiry across workers: each worker ends the rows it holds (after stopping
    their tasks); another worker's rows stay running until that worker stops them."""
    store = make_store(tmp_path)
    add_batch(store, "batch_o", 4)
    mine = store.lease("worker-1", 2, lease_seconds=30)
    theirs = store.lease("worker-2", 2, lease_seconds=30)
    assert store.end_running("batch_o", RequestState.CANCELED, "worker-1") == 2
    counts = store.counts("batch_o")
    assert (counts.canceled, counts.running) == (2, 2)
    assert store.held_leases("worker-2") == {(r.seq, r.epoch) for r in theirs}
    assert store.held_leases("worker-1") == set()
    assert not store.complete(
        mine[0], "worker-1", RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 1, 1, 0)
    )


def test_transitions_name_their_from_states(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    add_batch(store, "batch_b", 1)
    assert store.transition("batch_b", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    assert not store.transition("batch_b", [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert store.end_pending("batch_b", RequestState.CANCELED) == 1
    assert store.finalize(
        "batch_b", [BatchStatus.CANCELLING], BatchStatus.CANCELLED, [], None, None
    )
    assert not store.finalize(
        "batch_b", [BatchStatus.CANCELLING], BatchStatus.CANCELLED, [], None, None
    ), "finalize happens exactly once"
    batch = store.get_batch("batch_b")
    assert batch is not None and batch.status == BatchStatus.CANCELLED
    assert batch.cancelled_at is not None and batch.counts.canceled == 1


def test_pollers_share_a_recent_count_but_never_across_a_status_change(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    add_batch(store, "batch_p", 3)
    polled = store.get_batch("batch_p", stats_max_age=3600)
    assert polled is not None and polled.counts.pending == 3
    leased = store.lease("worker-1", 1, lease_seconds=30)
    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert store.complete(leased[0], "worker-1", ok)

    # A poller may see the count of up to stats_max_age ago; the scheduler's read counts now.
    stale = store.get_batch("batch_p", stats_max_age=3600)
    assert stale is not None and (stale.counts.pending, stale.counts.succeeded) == (3, 0)
    fresh = store.get_batch("batch_p")
    assert fresh is not None and (fresh.counts.pending, fresh.counts.succeeded) == (2, 1)
    assert fresh.usage.output_tokens == 4
    page, _ = store.list_batches("t", "openai", after=None, limit=10, stats_max_age=3600)
    assert page[0].counts.succeeded == 1, "a fresh count refreshes what pollers share"

    # A new status is always shown with counts taken under it.
    assert store.complete(store.lease("worker-1", 1, lease_seconds=30)[0], "worker-1", ok)
    assert store.transition("batch_p", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    cancelling = store.get_batch("batch_p", stats_max_age=3600)
    assert cancelling is not None and cancelling.counts.succeeded == 2


def test_poll_reads_on_their_own_sqlite_connection_see_every_commit(tmp_path: Path) -> None:
    """On SQLite a poller's reads run on a connection of the thread's own, kept open beside
    the pool (store/polling.py's ReadConnections). It must hold no snapshot: each read sees
    the last commit, and it never leaves a transaction open (that would stop the WAL from
    being checkpointed). The scheduler's reads still go through the pool."""
    store = make_store(tmp_path)
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
    assert store.engine.pool.checkedout() == checked_out  # nothing held from the pool
    # Unknown and foreign ids read as None on the pinned connection too.
    assert store.get_batch("batch_s", "someone-else", stats_max_age=3600) is None
    assert store.get_batch("batch_nope", "t", stats_max_age=3600) is None
    # A checkpoint completes: no reader pins an old snapshot of the WAL.
    with store.engine.connect() as conn:
        busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    assert busy == 0
