"""Idempotency keys: recorded in the same transaction as the object they name, so a create
either leaves both or neither; a taken key rolls the whole create back; an expired key is
replaced; keys are per tenant and per kind of create."""

from __future__ import annotations

import pytest

from batchd import failpoints
from batchd.clock import now
from batchd.errors import IdempotencyKeyTaken
from batchd.store import idempotency
from batchd.store.records import IdempotencyKey
from batchd.store.store import Store
from tests.unit.store.builders import DAY, TENANT, batch_values, file_record, key


def create_batch(store: Store, batch_id: str, idem: IdempotencyKey) -> tuple[int, int] | None:
    return store.create_batch_within_limits(
        batch_values(batch_id), adding_requests=1, max_active=10, max_queued=10, idempotency=idem
    )


def test_a_key_is_recorded_with_its_object(store: Store) -> None:
    assert store.find_idempotency_key(TENANT, "files", "k", DAY) is None
    store.create_file(file_record("file-1"), key("k"))
    earlier = store.find_idempotency_key(TENANT, "files", "k", DAY)
    assert earlier is not None
    assert (earlier.object_id, earlier.fingerprint) == ("file-1", "fp")
    assert abs(earlier.created_at - now()) <= 2
    assert create_batch(store, "batch_1", key("k", scope="batches")) is None
    batch_key = store.find_idempotency_key(TENANT, "batches", "k", DAY)
    assert batch_key is not None and batch_key.object_id == "batch_1", "one key per kind"


def test_a_taken_key_rolls_the_whole_create_back(store: Store) -> None:
    store.create_file(file_record("file-first"), key("k"))
    with pytest.raises(IdempotencyKeyTaken):
        store.create_file(file_record("file-second"), key("k"))
    assert store.get_file(TENANT, "file-second") is None

    assert create_batch(store, "batch_first", key("b", scope="batches")) is None
    with pytest.raises(IdempotencyKeyTaken):
        create_batch(store, "batch_second", key("b", scope="batches"))
    assert store.get_batch("batch_second") is None
    earlier = store.find_idempotency_key(TENANT, "batches", "b", DAY)
    assert earlier is not None and earlier.object_id == "batch_first"


def test_a_create_that_fails_before_its_commit_leaves_no_key(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(name: str) -> None:
        raise RuntimeError(f"killed at {name}")

    monkeypatch.setattr(failpoints, "hit", crash)
    with pytest.raises(RuntimeError, match=r"create_file\.before_commit"):
        store.create_file(file_record("file-1"), key("k"))
    with pytest.raises(RuntimeError, match=r"create_batch\.before_commit"):
        create_batch(store, "batch_1", key("k", scope="batches"))
    assert store.get_file(TENANT, "file-1") is None and store.get_batch("batch_1") is None
    assert store.find_idempotency_key(TENANT, "files", "k", DAY) is None
    assert store.find_idempotency_key(TENANT, "batches", "k", DAY) is None


def test_a_refused_create_leaves_its_key_free(store: Store) -> None:
    refused = store.create_batch_within_limits(
        batch_values("batch_x"),
        adding_requests=1,
        max_active=0,
        max_queued=10,
        idempotency=key("k", scope="batches"),
    )
    assert refused == (0, 0)
    assert store.find_idempotency_key(TENANT, "batches", "k", DAY) is None


def test_an_expired_key_is_forgotten_and_replaced(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_days_ago = now() - 2 * DAY
    monkeypatch.setattr(idempotency, "now", lambda: two_days_ago)
    store.create_file(file_record("file-old"), key("k"))
    monkeypatch.undo()
    assert store.find_idempotency_key(TENANT, "files", "k", DAY) is None, "past its TTL"
    old = store.find_idempotency_key(TENANT, "files", "k", 3 * DAY)
    assert old is not None and old.object_id == "file-old"
    store.create_file(file_record("file-new"), key("k"))  # not taken: replaced
    again = store.find_idempotency_key(TENANT, "files", "k", DAY)
    assert again is not None and again.object_id == "file-new"


def test_keys_are_per_tenant(store: Store) -> None:
    store.create_file(file_record("file-mine"), key("k"))
    assert store.find_idempotency_key("other", "files", "k", DAY) is None
    store.create_file(file_record("file-theirs", tenant="other"), key("k", tenant="other"))
    mine = store.find_idempotency_key(TENANT, "files", "k", DAY)
    theirs = store.find_idempotency_key("other", "files", "k", DAY)
    assert mine is not None and mine.object_id == "file-mine"
    assert theirs is not None and theirs.object_id == "file-theirs"
