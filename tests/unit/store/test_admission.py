"""Admission: a batch is created only while its tenant stays within its limits, counted and
inserted under the tenant's lock; a refusal reports the figures it counted and writes nothing."""

from __future__ import annotations

import threading

from batchd.store.records import BatchStatus
from batchd.store.store import Store
from tests.unit.store.builders import TENANT, add_batch, batch_values, finish_all, lines


def create(store: Store, batch_id: str, *, adding: int, active: int, queued: int) -> object:
    return store.create_batch_within_limits(
        batch_values(batch_id), adding_requests=adding, max_active=active, max_queued=queued
    )


def test_a_batch_within_the_limits_is_created(store: Store) -> None:
    assert create(store, "batch_1", adding=3, active=1, queued=3) is None
    batch = store.get_batch("batch_1", TENANT)
    assert batch is not None and batch.status == BatchStatus.VALIDATING


def test_a_refusal_reports_the_tenant_s_load_and_writes_nothing(store: Store) -> None:
    add_batch(store, "batch_a", 3)
    add_batch(store, "batch_b", 2)
    store.lease("worker-1", 1, lease_seconds=30)  # running rows count as queued too
    assert store.tenant_load(TENANT) == (2, 5)
    assert create(store, "batch_c", adding=1, active=2, queued=100) == (2, 5), "too many batches"
    assert create(store, "batch_c", adding=6, active=9, queued=10) == (2, 5), "too many rows"
    assert create(store, "batch_c", adding=0, active=9, queued=5) == (2, 5), "0 counts as 1"
    assert store.get_batch("batch_c") is None
    assert create(store, "batch_c", adding=5, active=3, queued=10) is None, "exactly full"
    assert store.tenant_load(TENANT) == (3, 5)


def test_ended_batches_and_finished_rows_free_their_room(store: Store) -> None:
    add_batch(store, "batch_a", 2)
    finish_all(store)
    assert store.tenant_load(TENANT) == (1, 0), "succeeded rows are no longer queued"
    assert store.transition("batch_a", [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert store.finalize(
        "batch_a", [BatchStatus.FINALIZING], BatchStatus.COMPLETED, [], None, None
    )
    assert store.tenant_load(TENANT) == (0, 0)
    assert create(store, "batch_b", adding=1, active=1, queued=1) is None


def test_limits_are_per_tenant(store: Store) -> None:
    add_batch(store, "batch_theirs", 4, tenant="other")
    assert store.tenant_load("other") == (1, 4)
    assert store.tenant_load(TENANT) == (0, 0)
    assert create(store, "batch_mine", adding=4, active=1, queued=4) is None


def test_rows_count_once_their_batch_row_exists(store: Store) -> None:
    """A message batch inserts its rows before its batch row: those rows are not counted
    against the create that is inserting them (nor against anyone: no batch owns them yet)."""
    store.insert_requests("msgbatch_1", lines(3))
    assert store.tenant_load(TENANT) == (0, 0)
    values = batch_values("msgbatch_1", surface="anthropic", status=BatchStatus.IN_PROGRESS)
    created = store.create_batch_within_limits(
        values, adding_requests=3, max_active=1, max_queued=3
    )
    assert created is None
    assert store.tenant_load(TENANT) == (1, 3)
    assert store.counts("msgbatch_1").pending == 3


def test_racing_creates_cannot_both_take_the_last_room(store: Store) -> None:
    add_batch(store, "batch_a", 1)
    results: list[object] = []
    start = threading.Barrier(4)

    def racer(batch_id: str) -> None:
        start.wait()
        results.append(create(store, batch_id, adding=1, active=2, queued=10))

    threads = [threading.Thread(target=racer, args=(f"batch_r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(None) == 1, results
    assert store.tenant_load(TENANT) == (2, 1)
