"""Idempotent creates: one key, one object, whatever retries and races happen around it."""

from __future__ import annotations

import pytest

from batchd.errors import IdempotencyConflict, InvalidRequest, LimitExceeded
from batchd.service import batches, idempotency, message_batches
from batchd.service.services import Services
from batchd.store.records import BatchRecord, BatchStatus, IdempotencyKey
from tests.unit.service.conftest import (
    OTHER,
    TENANT,
    MakeServices,
    batch_body,
    blob_names,
    end_batch,
    message_body,
    upload,
)


def test_the_same_key_returns_the_first_object(services: Services) -> None:
    body = batch_body(upload(services).id)
    first = batches.create_openai_batch(services, TENANT, body, "k1")
    again = batches.create_openai_batch(services, TENANT, dict(reversed(body.items())), "k1")
    assert again.id == first.id  # key order is no difference
    assert services.store.tenant_load(TENANT) == (1, 0)
    # Keys belong to their tenant and their kind of object.
    other_file = upload(services, tenant=OTHER)
    theirs = batches.create_openai_batch(services, OTHER, batch_body(other_file.id), "k1")
    assert theirs.id != first.id
    made = message_batches.create_message_batch(services, TENANT, message_body("a"), "k1")
    assert made.id != first.id
    assert message_batches.create_message_batch(services, TENANT, message_body("a"), "k1") == (made)


def test_the_same_key_with_another_request_is_a_409(services: Services) -> None:
    file = upload(services)
    batches.create_openai_batch(services, TENANT, batch_body(file.id), "k1")
    with pytest.raises(IdempotencyConflict) as refused:
        batches.create_openai_batch(services, TENANT, batch_body(file.id, metadata={}), "k1")
    assert (refused.value.status_code, refused.value.param) == (409, "Idempotency-Key")
    assert services.store.tenant_load(TENANT) == (1, 0)


def test_an_upload_repeated_with_its_key_keeps_one_copy(services: Services) -> None:
    first = upload(services, key="up")
    again = upload(services, key="up")
    assert again == first and blob_names(services) == [first.blob]
    with pytest.raises(IdempotencyConflict):
        upload(services, b'{"other": 1}\n', key="up")
    assert blob_names(services) == [first.blob]  # the refused copy was dropped


def test_a_failed_create_leaves_the_key_free(make_services: MakeServices) -> None:
    services = make_services(max_active_batches_per_tenant=1)
    with pytest.raises(InvalidRequest):
        batches.create_openai_batch(services, TENANT, batch_body("file-nope"), "k1")
    file = upload(services)
    made = batches.create_openai_batch(services, TENANT, batch_body(file.id), "k1")
    # Refused for a limit, then retried once there is room: the retry creates.
    body = message_body("a")
    with pytest.raises(LimitExceeded):
        message_batches.create_message_batch(services, TENANT, body, "k2")
    end_batch(services, made.id, BatchStatus.COMPLETED)
    created = message_batches.create_message_batch(services, TENANT, message_body("a"), "k2")
    assert created.status == BatchStatus.IN_PROGRESS


def test_a_racing_create_that_loses_answers_with_the_winners_object(services: Services) -> None:
    """Both creates did their work; the store let the winner's commit, and the loser, whose
    key insert failed (IdempotencyKeyTaken), answers with the winner's batch."""
    file = upload(services)
    body = batch_body(file.id)
    fingerprint = idempotency.fingerprint_json(body)
    winner: list[BatchRecord] = []

    def create_losing_the_race(key: IdempotencyKey | None) -> BatchRecord:
        # The other request with this key commits first, while this one is mid-way.
        winner.append(batches.create_openai_batch(services, TENANT, body, "k1"))
        return batches._create_openai_batch(services, TENANT, body, key)

    answer = idempotency.create_once(
        services.store,
        tenant=TENANT,
        scope=idempotency.SCOPE_BATCHES,
        key="k1",
        fingerprint=fingerprint,
        create=create_losing_the_race,
        fetch=lambda batch_id: batches.get_batch(services, TENANT, batch_id, "openai"),
    )
    assert answer.id == winner[0].id
    assert services.store.tenant_load(TENANT) == (1, 0)  # the loser wrote nothing


def test_a_create_failing_while_another_with_its_key_succeeded(services: Services) -> None:
    """A create refused (say, for a limit) after another with the same key committed answers
    as a retry arriving now would be answered: with that object."""
    body = batch_body(upload(services).id)
    winner: list[BatchRecord] = []

    def refused_after_the_other_won(key: IdempotencyKey | None) -> BatchRecord:
        winner.append(batches.create_openai_batch(services, TENANT, body, "k1"))
        raise InvalidRequest("refused")

    answer = idempotency.create_once(
        services.store,
        tenant=TENANT,
        scope=idempotency.SCOPE_BATCHES,
        key="k1",
        fingerprint=idempotency.fingerprint_json(body),
        create=refused_after_the_other_won,
        fetch=lambda batch_id: batches.get_batch(services, TENANT, batch_id, "openai"),
    )
    assert answer.id == winner[0].id


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        idempotency.key_of({"idempotency-key": key})
    assert refused.value.param == "Idempotency-Key"
    assert idempotency.key_of({}) is None
    assert idempotency.key_of({"idempotency-key": "ok-1"}) == "ok-1"
