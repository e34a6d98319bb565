"""Retention on a real store and data dir, with the clock moved forward instead of waiting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchd import ids
from batchd.blobs.local import DirectoryBlobStore
from batchd.clock import now
from batchd.config import Settings
from batchd.errors import IdempotencyKeyTaken, NotFound
from batchd.protocol import anthropic as am
from batchd.protocol.batch_file import RequestLine
from batchd.scheduler.finalize import finalize_batch
from batchd.service import message_batches, retention
from batchd.service.services import Services
from batchd.store import database
from batchd.store.records import (
    BatchStatus,
    FileRecord,
    IdempotencyKey,
    RequestOutcome,
    RequestState,
)
from batchd.store.store import Store

DAY = 24 * 3600


@pytest.fixture()
def services(tmp_path: Path) -> Services:
    engine = database.open_sqlite(tmp_path / "db.sqlite3")
    database.upgrade(engine)
    settings = Settings(data_dir=tmp_path)
    # Retention needs only the settings, the store and the blobs.
    return Services(settings, Store(engine), DirectoryBlobStore(tmp_path / "files"), None, None)  # type: ignore[arg-type]


def add_file(services: Services, file_id: str, expires_at: int | None) -> FileRecord:
    with services.blobs.new_writer() as writer:
        writer.write(b'{"x": 1}\n')
        blob = writer.commit()
    record = FileRecord(file_id, "t", "in.jsonl", "batch", 9, now(), expires_at, blob)
    services.store.create_file(record)
    return record


def add_batch(services: Services, batch_id: str, surface: str, input_file_id: str | None) -> None:
    store = services.store
    store.insert_requests(batch_id, [RequestLine(1, "only", b'{"secret": "prompt"}', "m", "k")])
    store.create_batch(
        {
            "id": batch_id,
            "tenant": "t",
            "surface": surface,
            "endpoint": "/v1/messages" if surface == "anthropic" else "/v1/chat/completions",
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": BatchStatus.IN_PROGRESS.value,
            "created_at": now(),
            "in_progress_at": now(),
            "expires_at": now() + DAY,
        }
    )


def finish(services: Services, batch_id: str) -> None:
    store = services.store
    for item in store.lease("me", 10, 60):
        assert item.batch_id == batch_id
        store.complete(item, "me", RequestOutcome(RequestState.SUCCEEDED, 200, b'{"answer": 1}'))
    assert finalize_batch(store, services.blobs, batch_id) == BatchStatus.COMPLETED


def test_expired_files_go_but_a_running_batch_keeps_its_input(services: Services) -> None:
    store, blobs = services.store, services.blobs
    in_use = add_file(services, "file-in-use", expires_at=now() - 1)
    stale = add_file(services, "file-stale", expires_at=now() - 1)
    fresh = add_file(services, "file-fresh", expires_at=now() + DAY)
    forever = add_file(services, "file-forever", expires_at=None)
    add_batch(services, "batch_running", "openai", in_use.id)

    report = retention.purge(store, blobs, services.settings)
    assert report.files_deleted == 1
    assert store.get_file("t", stale.id) is None and not blobs.path(stale.blob).exists()
    for kept in (in_use, fresh, forever):
        assert store.get_file("t", kept.id) is not None and blobs.path(kept.blob).exists()
    assert report.batches_archived == 0  # running: never touched

    finish(services, "batch_running")
    assert retention.purge(store, blobs, services.settings).files_deleted == 1  # now it can go
    assert store.get_file("t", in_use.id) is None


def test_ended_batches_are_archived_when_their_time_is_up(services: Services) -> None:
    store, blobs, settings = services.store, services.blobs, services.settings
    add_batch(services, "batch_done", "openai", None)
    finish(services, "batch_done")
    add_batch(services, "msgbatch_done", "anthropic", None)
    finish(services, "msgbatch_done")
    add_batch(services, "batch_running", "openai", None)

    assert retention.purge(store, blobs, settings).batches_archived == 0  # too early
    later = now() + 31 * DAY
    assert retention.purge(store, blobs, settings, at=later).batches_archived == 2
    assert retention.purge(store, blobs, settings, at=later).batches_archived == 0  # once

    for batch_id in ("batch_done", "msgbatch_done"):
        record = store.get_batch(batch_id, "t")
        assert record is not None and record.archived_at == later
        assert record.counts.succeeded == 1 and record.counts.total == 1  # counts survive
        rows = list(store.iter_finished(batch_id))
        assert [row.result for row in rows] == [None]  # results dropped
    running = store.get_batch("batch_running", "t")
    assert running is not None and running.archived_at is None
    assert running.status == BatchStatus.IN_PROGRESS

    archived = store.get_batch("msgbatch_done", "t")
    wire = am.message_batch_object(archived, "http://h:1")
    assert wire["archived_at"] is not None and wire["results_url"] is None
    with pytest.raises(NotFound) as excinfo:
        message_batches.results_batch(services, "t", "msgbatch_done")
    assert "archived" in excinfo.value.message


def test_anthropic_results_live_29_days_from_creation(services: Services) -> None:
    add_batch(services, "msgbatch_a", "anthropic", None)
    finish(services, "msgbatch_a")
    store, blobs, settings = services.store, services.blobs, services.settings
    assert retention.purge(store, blobs, settings, at=now() + 28 * DAY).batches_archived == 0
    assert retention.purge(store, blobs, settings, at=now() + 29 * DAY + 5).batches_archived == 1


def keyed_file(services: Services, file_id: str, key: IdempotencyKey) -> None:
    record = FileRecord(file_id, key.tenant, "in.jsonl", "batch", 9, now(), None, "blob")
    services.store.create_file(record, key)


def test_idempotency_keys_are_forgotten_after_a_day(services: Services) -> None:
    store = services.store
    assert store.find_idempotency_key("t", "files", "k1", DAY) is None
    keyed_file(services, "file-1", IdempotencyKey("t", "files", "k1", "fp", DAY))
    again = store.find_idempotency_key("t", "files", "k1", DAY)
    assert again is not None and again.object_id == "file-1" and again.fingerprint == "fp"
    assert store.find_idempotency_key("other", "files", "k1", DAY) is None  # per tenant
    keyed_file(services, "file-2", IdempotencyKey("other", "files", "k1", "fp", DAY))
    report = retention.purge(store, services.blobs, services.settings, at=now() + DAY + 5)
    assert report.idempotency_keys_forgotten == 2
    assert store.find_idempotency_key("t", "files", "k1", DAY) is None


def test_a_key_is_recorded_with_its_object_or_not_at_all(services: Services) -> None:
    store = services.store
    key = IdempotencyKey("t", "files", "k", "fp", DAY)
    keyed_file(services, "file-first", key)
    # A second create with the same key writes nothing: not its key, not its object.
    with pytest.raises(IdempotencyKeyTaken):
        keyed_file(services, "file-second", key)
    assert store.get_file("t", "file-second") is None
    earlier = store.find_idempotency_key("t", "files", "k", DAY)
    assert earlier is not None and earlier.object_id == "file-first"


def test_a_failed_create_leaves_its_key_free(services: Services) -> None:
    store = services.store
    key = IdempotencyKey("t", "batches", "k", "fp", DAY)
    refused = store.create_batch_within_limits(
        {"id": "batch_x", "tenant": "t"},
        adding_requests=1,
        max_active=0,
        max_queued=10,
        idempotency=key,
    )
    assert refused == (0, 0)  # over the limit: nothing written
    assert store.find_idempotency_key("t", "batches", "k", DAY) is None


def test_rows_no_batch_owns_go_after_an_hour(services: Services) -> None:
    store = services.store
    old = "msgbatch_" + ids._base62((now() - 2 * 3600) * 1000, 8) + "x" * 17
    young = ids.message_batch_id()
    for batch_id in (old, young):  # a create killed between its rows and its batch row
        store.insert_requests(batch_id, [RequestLine(1, "only", b"{}", "m", "k")])
    add_batch(services, "msgbatch_owned", "anthropic", None)
    assert retention.purge(store, services.blobs, services.settings).orphan_batches_dropped == 1
    assert set(store.orphan_request_batch_ids()) == {young}
    assert store.counts("msgbatch_owned").total == 1


def test_message_batch_ids_tell_their_creation_time() -> None:
    before = now() * 1000
    created = ids.message_batch_created_ms(ids.message_batch_id())
    assert created is not None and before <= created <= now() * 1000 + 1000
    assert ids.message_batch_created_ms(ids.batch_id()) is None
    assert ids.message_batch_created_ms("msgbatch_!!") is None


def test_orphan_blobs_go_after_a_day_and_young_ones_stay(services: Services) -> None:
    kept = add_file(services, "file-kept", None)
    writer = services.blobs.new_writer()
    writer.write(b"left behind by a finalizer killed before its commit")
    old_orphan = writer.commit()
    writer = services.blobs.new_writer()
    writer.write(b"a write whose row is about to be committed")
    young_orphan = writer.commit()
    two_days_ago = now() - 2 * DAY
    os.utime(services.blobs.path(old_orphan), (two_days_ago, two_days_ago))
    report = retention.purge(services.store, services.blobs, services.settings)
    assert report.orphan_blobs_removed == 1
    assert not services.blobs.path(old_orphan).exists()
    assert services.blobs.path(young_orphan).exists()
    assert services.blobs.path(kept.blob).exists()
