"""Per-tenant admission: the 429s name the tenant's figures and the limit, and the binding
check is made with the insert of the batch row, so racing creates cannot share the last room."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from batchd import ids
from batchd.clock import now
from batchd.errors import LimitExceeded
from batchd.service import admission, batches, message_batches
from batchd.store.records import BatchStatus
from tests.unit.service.conftest import (
    OTHER,
    TENANT,
    MakeServices,
    batch_body,
    end_batch,
    message_body,
    upload,
)


def batch_row(tenant: str = TENANT) -> dict[str, Any]:
    created = now()
    return {
        "id": ids.batch_id(),
        "tenant": tenant,
        "surface": "openai",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-x",
        "completion_window": "24h",
        "status": BatchStatus.VALIDATING.value,
        "created_at": created,
        "expires_at": created + 3600,
    }


def test_too_many_active_batches_names_the_count_and_the_limit(
    make_services: MakeServices,
) -> None:
    services = make_services(max_active_batches_per_tenant=2)
    file = upload(services)
    made = [batches.create_openai_batch(services, TENANT, batch_body(file.id)) for _ in range(2)]
    with pytest.raises(LimitExceeded) as refused:
        batches.create_openai_batch(services, TENANT, batch_body(file.id))
    error = refused.value
    assert (error.status_code, error.retry_after) == (429, 60)
    assert error.param == "max_active_batches_per_tenant"
    assert error.message == (
        "Too many batches in progress: this key has 2 batches that have not ended; the limit "
        "is 2. Retry once some have ended."
    )
    # Another tenant has room of its own; and an ended batch frees its tenant's.
    other_file = upload(services, tenant=OTHER)
    batches.create_openai_batch(services, OTHER, batch_body(other_file.id))
    end_batch(services, made[0].id, BatchStatus.COMPLETED)
    batches.create_openai_batch(services, TENANT, batch_body(file.id))


def test_too_many_queued_requests_names_what_the_batch_adds(make_services: MakeServices) -> None:
    services = make_services(max_queued_requests_per_tenant=3)
    message_batches.create_message_batch(services, TENANT, message_body("a", "b"))
    with pytest.raises(LimitExceeded) as refused:
        message_batches.create_message_batch(services, TENANT, message_body("c", "d"))
    assert refused.value.param == "max_queued_requests_per_tenant"
    assert refused.value.message == (
        "Too many queued requests: this key has 2 requests waiting or running and this batch "
        "adds 2; the limit is 3."
    )
    # A batch of unknown size (an OpenAI batch before validation) needs room for one.
    error = admission.capacity_error(services.settings, 1, 3, 0)
    assert error is not None and error.message == (
        "Too many queued requests: this key has 3 requests waiting or running; the limit is 3."
    )
    assert admission.capacity_error(services.settings, 1, 2, 0) is None


def test_a_refused_message_batch_leaves_no_rows(make_services: MakeServices) -> None:
    services = make_services(max_active_batches_per_tenant=1)
    made = message_batches.create_message_batch(services, TENANT, message_body("a"))
    with pytest.raises(LimitExceeded):
        message_batches.create_message_batch(services, TENANT, message_body("b", "c"))
    counts = services.store.request_state_counts()
    assert counts["pending"] == sum(counts.values()) == 1  # the refused batch's rows are gone
    assert services.store.orphan_request_batch_ids() == []
    listed, _ = services.store.list_batches(TENANT, "anthropic", after=None, limit=9)
    assert [b.id for b in listed] == [made.id]


def test_the_binding_check_is_made_with_the_insert(make_services: MakeServices) -> None:
    """The early check passed long ago; the insert still refuses once the room is gone."""
    services = make_services(max_active_batches_per_tenant=1)
    admission.check_tenant_capacity(services, TENANT)  # room for one
    admission.create_batch_admitted(services, batch_row())
    with pytest.raises(LimitExceeded):
        admission.check_tenant_capacity(services, TENANT)
    late = batch_row()
    with pytest.raises(LimitExceeded):
        admission.create_batch_admitted(services, late)
    assert services.store.get_batch(late["id"]) is None  # refused: nothing written


def test_racing_creates_share_no_room(make_services: MakeServices) -> None:
    services = make_services(max_active_batches_per_tenant=1)
    racers = 6
    start = threading.Barrier(racers)
    outcomes: list[str] = []

    def race() -> None:
        start.wait()
        try:
            admission.create_batch_admitted(services, batch_row())
            outcomes.append("admitted")
        except LimitExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["admitted"] + ["refused"] * (racers - 1)
    assert services.store.tenant_load(TENANT) == (1, 0)
