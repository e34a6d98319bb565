"""Batches: reading them back, pages in both directions, transitions that name their legal
"from" states, finalizing exactly once, deleting only what has ended, and the finalize lock."""

from __future__ import annotations

import orjson
import pytest

from batchd.clock import now
from batchd.store.records import BatchRecord, BatchStatus, RequestState
from batchd.store.store import Store
from tests.unit.store.builders import CHAT, TENANT, add_batch, batch_values, file_record, lines


def ids(page: list[BatchRecord]) -> list[str]:
    return [batch.id for batch in page]


def test_a_batch_reads_back_as_written(store: Store) -> None:
    errors = [{"code": "invalid", "message": "bad", "param": None, "line": 2}]
    store.create_batch(
        batch_values("batch_1", metadata='{"k": "v"}', errors=None, model="m", input_file_id="f")
    )
    store.create_batch(batch_values("batch_2", errors=orjson.dumps(errors).decode()))
    batch = store.get_batch("batch_1")
    assert batch is not None
    assert (batch.id, batch.tenant, batch.surface, batch.endpoint) == (
        "batch_1",
        TENANT,
        "openai",
        CHAT,
    )
    assert (batch.status, batch.model, batch.input_file_id) == (BatchStatus.VALIDATING, "m", "f")
    assert batch.metadata == {"k": "v"} and batch.errors is None
    assert batch.expires_at > batch.created_at and batch.in_progress_at is None
    assert batch.counts.total == 0 and batch.usage.output_tokens == 0
    second = store.get_batch("batch_2", TENANT)
    assert second is not None and second.errors == errors and second.metadata is None


def test_a_batch_is_seen_only_by_its_tenant(store: Store) -> None:
    store.create_batch(batch_values("batch_mine"))
    assert store.get_batch("batch_mine", "someone-else") is None
    assert store.get_batch("batch_mine", TENANT) is not None
    assert store.get_batch("batch_nope") is None
    assert store.list_batches("someone-else", "openai", after=None, limit=10) == ([], False)
    assert store.list_batches(TENANT, "openai", after="batch_mine", limit=10) == ([], False)
    page, _ = store.list_batches("someone-else", "openai", after="batch_mine", limit=10)
    assert page == [], "another tenant's id is no cursor"


def test_batch_pages_go_both_ways_newest_first(store: Store) -> None:
    for i in range(5):
        store.create_batch(batch_values(f"batch_{i}"))
    store.create_batch(batch_values("msgbatch_x", surface="anthropic"))

    page, more = store.list_batches(TENANT, "openai", after=None, limit=2)
    assert (ids(page), more) == (["batch_4", "batch_3"], True)
    page, more = store.list_batches(TENANT, "openai", after="batch_3", limit=2)
    assert (ids(page), more) == (["batch_2", "batch_1"], True)
    page, more = store.list_batches(TENANT, "openai", after="batch_1", limit=2)
    assert (ids(page), more) == (["batch_0"], False)
    # Before a cursor: the page just newer than it, still newest first; has_more: newer exist.
    page, more = store.list_batches(TENANT, "openai", after=None, before="batch_0", limit=2)
    assert (ids(page), more) == (["batch_2", "batch_1"], True)
    page, more = store.list_batches(TENANT, "openai", after=None, before="batch_2", limit=2)
    assert (ids(page), more) == (["batch_4", "batch_3"], False)
    page, more = store.list_batches(TENANT, "openai", after=None, before="batch_4", limit=2)
    assert (ids(page), more) == ([], False)
    page, _ = store.list_batches(TENANT, "anthropic", after=None, limit=10)
    assert ids(page) == ["msgbatch_x"]


def test_transitions_name_their_from_states(store: Store) -> None:
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


def test_a_transition_stamps_its_time_and_writes_its_values(store: Store) -> None:
    store.create_batch(batch_values("batch_t"))
    assert store.transition(
        "batch_t", [BatchStatus.VALIDATING], BatchStatus.FAILED, errors='[{"code": "x"}]'
    )
    batch = store.get_batch("batch_t")
    assert batch is not None and batch.status == BatchStatus.FAILED
    assert batch.failed_at is not None and batch.failed_at >= batch.created_at
    assert batch.errors == [{"code": "x"}]
    assert not store.transition("batch_nope", [BatchStatus.VALIDATING], BatchStatus.FAILED)


def test_a_claimed_transition_needs_the_claim(store: Store) -> None:
    store.create_batch(batch_values("batch_c"))
    assert store.claim_validation("batch_c", "worker-1", 60)
    assert not store.transition(
        "batch_c", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS, claimed_by="worker-2"
    )
    assert store.transition(
        "batch_c", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS, claimed_by="worker-1"
    )


def test_finalize_registers_the_result_files_with_the_ending(store: Store) -> None:
    add_batch(store, "batch_f", 1)
    output = file_record("file-out", purpose="batch_output")
    assert not store.finalize(
        "batch_f", [BatchStatus.FINALIZING], BatchStatus.COMPLETED, [output], output.id, None
    ), "not finalizing: nothing written"
    assert store.get_file(TENANT, output.id) is None
    assert store.transition("batch_f", [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert store.finalize(
        "batch_f", [BatchStatus.FINALIZING], BatchStatus.COMPLETED, [output], output.id, None
    )
    assert store.get_file(TENANT, output.id) == output
    batch = store.get_batch("batch_f")
    assert batch is not None and batch.status == BatchStatus.COMPLETED
    assert (batch.output_file_id, batch.error_file_id) == (output.id, None)
    assert batch.completed_at is not None


def test_only_an_ended_batch_is_deleted_with_its_rows(store: Store) -> None:
    add_batch(store, "batch_d", 2)
    assert not store.delete_batch("batch_d", TENANT), "running: kept"
    assert store.transition("batch_d", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    assert store.end_pending("batch_d", RequestState.CANCELED) == 2
    assert store.finalize(
        "batch_d", [BatchStatus.CANCELLING], BatchStatus.CANCELLED, [], None, None
    )
    assert not store.delete_batch("batch_d", "someone-else")
    assert store.delete_batch("batch_d", TENANT)
    assert store.get_batch("batch_d") is None and store.counts("batch_d").total == 0
    assert not store.delete_batch("batch_d", TENANT)


def test_the_scheduler_s_batch_queries(store: Store) -> None:
    store.create_batch(batch_values("batch_new"))
    add_batch(store, "batch_run", 1)
    add_batch(store, "batch_overdue", 1, expires_in=-10)
    assert store.batch_ids_with_status(BatchStatus.VALIDATING) == ["batch_new"]
    assert store.batch_ids_with_status(BatchStatus.IN_PROGRESS, BatchStatus.VALIDATING) == [
        "batch_new",
        "batch_run",
        "batch_overdue",
    ]
    assert store.overdue_batch_ids(now()) == ["batch_overdue"]
    assert set(store.overdue_batch_ids(now() + 7200)) == {"batch_new", "batch_run", "batch_overdue"}
    assert store.transition("batch_overdue", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    assert store.overdue_batch_ids(now()) == [], "only validating or running batches expire"


def test_a_batch_being_validated_holds_its_input_file(store: Store) -> None:
    store.create_batch(batch_values("batch_v", input_file_id="file-in"))
    assert store.batch_validating_file(TENANT, "file-in") == "batch_v"
    assert store.batch_validating_file("someone-else", "file-in") is None
    store.insert_requests("batch_v", lines(1))
    assert store.transition("batch_v", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    assert store.batch_validating_file(TENANT, "file-in") is None


def test_one_finalizer_at_a_time_on_postgresql(store: Store) -> None:
    with store.finalize_lock("batch_z") as held:
        assert held
        with store.finalize_lock("batch_z") as again:
            # PostgreSQL: the second finalizer is refused; SQLite has a single worker.
            assert again is (store.engine.dialect.name == "sqlite")
        with store.finalize_lock("batch_other") as other:
            assert other
    with store.finalize_lock("batch_z") as after:
        assert after, "released when the first finalize ended"


def test_a_finalize_lock_is_let_go_when_the_finalize_fails(store: Store) -> None:
    with pytest.raises(RuntimeError), store.finalize_lock("batch_y") as held:
        assert held
        raise RuntimeError("finalize failed")
    with store.finalize_lock("batch_y") as again:
        assert again
