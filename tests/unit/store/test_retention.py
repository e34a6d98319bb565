"""Retention's queries: expired files (never a running batch's input), ended batches due for
archiving (and archiving only those), rows no batch owns, and old idempotency keys."""

from __future__ import annotations

from sqlalchemy import select

from batchd.clock import now
from batchd.store import schema
from batchd.store.records import BatchStatus
from batchd.store.store import Store
from tests.unit.store.builders import (
    DAY,
    TENANT,
    add_batch,
    batch_values,
    file_record,
    finish_all,
    key,
    lines,
)


def end(store: Store, batch_id: str) -> None:
    finish_all(store)
    assert store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert store.finalize(batch_id, [BatchStatus.FINALIZING], BatchStatus.COMPLETED, [], None, None)


def test_expired_files_except_a_running_batch_s_input(store: Store) -> None:
    for record in (
        file_record("file-in-use", expires_at=now() - 1),
        file_record("file-validating", expires_at=now() - 1),
        file_record("file-stale", expires_at=now() - 1),
        file_record("file-fresh", expires_at=now() + DAY),
        file_record("file-forever", expires_at=None),
    ):
        store.create_file(record)
    add_batch(store, "batch_running", 1, input_file_id="file-in-use")
    store.create_batch(batch_values("batch_validating", input_file_id="file-validating"))

    assert [f.id for f in store.expired_files(now())] == ["file-stale"]
    end(store, "batch_running")
    assert [f.id for f in store.expired_files(now())] == ["file-in-use", "file-stale"]
    assert [f.id for f in store.expired_files(now(), limit=1)] == ["file-in-use"]
    assert [f.id for f in store.expired_files(now() + 2 * DAY)] == [
        "file-in-use",
        "file-stale",
        "file-fresh",
    ]
    assert store.remove_file("file-stale")
    assert store.get_file(TENANT, "file-stale") is None


def test_a_file_a_batch_took_up_since_it_was_found_expired_is_not_removed(store: Store) -> None:
    store.create_file(file_record("file-taken", expires_at=now() - 1))
    assert [f.id for f in store.expired_files(now())] == ["file-taken"]
    store.create_batch(batch_values("batch_new", input_file_id="file-taken"))
    assert not store.remove_file("file-taken"), "a running batch's input is never purged"
    assert store.get_file(TENANT, "file-taken") is not None


def test_only_ended_batches_are_archived_when_their_time_is_up(store: Store) -> None:
    add_batch(store, "batch_done", 1)
    end(store, "batch_done")
    add_batch(store, "msgbatch_done", 1, surface="anthropic")
    end(store, "msgbatch_done")
    add_batch(store, "batch_running", 1)

    def due(at: int) -> list[str]:
        return store.batches_to_archive(at, openai_after_end=30 * DAY, anthropic_after_creation=DAY)

    assert due(now()) == []
    assert due(now() + DAY + 5) == ["msgbatch_done"], "Anthropic's: a while after creation"
    assert due(now() + 31 * DAY) == ["batch_done", "msgbatch_done"]

    later = now() + 31 * DAY
    assert not store.archive_batch("batch_running", later), "running: never touched"
    assert store.archive_batch("batch_done", later)
    assert not store.archive_batch("batch_done", later), "archived once"
    assert due(later) == ["msgbatch_done"]

    archived = store.get_batch("batch_done")
    assert archived is not None and archived.archived_at == later
    assert archived.counts.succeeded == 1 and archived.counts.total == 1  # counts survive
    assert [row.result for row in store.iter_finished("batch_done")] == [None]
    with store.engine.connect() as conn:
        bodies = conn.execute(
            select(schema.requests.c.batch_id, schema.requests.c.body).order_by(
                schema.requests.c.batch_id
            )
        ).all()
    assert [(b, bytes(body)) for b, body in bodies] == [
        ("batch_done", b""),
        ("batch_running", b"{}"),
        ("msgbatch_done", b"{}"),
    ]
    running = store.get_batch("batch_running")
    assert running is not None and running.archived_at is None


def test_rows_no_batch_owns_are_found(store: Store) -> None:
    store.insert_requests("msgbatch_orphan", lines(2))
    add_batch(store, "msgbatch_owned", 1, surface="anthropic")
    assert store.orphan_request_batch_ids() == ["msgbatch_orphan"]
    store.delete_requests("msgbatch_orphan")
    assert store.orphan_request_batch_ids() == []


def test_old_idempotency_keys_are_purged(store: Store) -> None:
    store.create_file(file_record("file-1"), key("k1"))
    store.create_file(file_record("file-2"), key("k2", tenant="other"))
    assert store.purge_idempotency_keys(older_than=now() - 5) == 0
    assert store.purge_idempotency_keys(older_than=now() + 5) == 2
    assert store.find_idempotency_key(TENANT, "files", "k1", DAY) is None
    assert store.get_file(TENANT, "file-1") is not None, "the object stays"
