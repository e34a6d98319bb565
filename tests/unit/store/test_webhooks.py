"""The webhook outbox and the one-sender lease, on both databases."""

from __future__ import annotations

import time

from batchd.store.records import BatchStatus
from batchd.store.store import Store
from tests.unit.store.builders import TENANT, add_batch, batch_values, finish_all


def _endpoint(store: Store, endpoint_id: str, events: str, tenant: str = TENANT) -> None:
    at = int(time.time())
    store.create_webhook_endpoint(
        {
            "id": endpoint_id,
            "tenant": tenant,
            "name": endpoint_id,
            "url": f"https://hooks.example.com/{endpoint_id}",
            "events": events,
            "secret": "whsec_AAAA",
            "created_at": at,
            "updated_at": at,
        }
    )


def test_the_transaction_that_ends_a_batch_writes_one_delivery_per_wanting_endpoint(
    store: Store,
) -> None:
    _endpoint(store, "we_a", '["batch.completed", "batch.cancelled"]')
    _endpoint(store, "we_b", '["batch.failed"]')
    _endpoint(store, "we_c", '["batch.completed"]', tenant="someone-else")
    add_batch(store, "b1", 2)
    finish_all(store)
    assert store.finalize("b1", [BatchStatus.IN_PROGRESS], BatchStatus.COMPLETED, [], None, None)
    store.create_batch(batch_values("b2", surface="anthropic"))
    assert store.transition("b2", [BatchStatus.VALIDATING], BatchStatus.FAILED)  # no endpoint
    due = store.due_webhook_deliveries(time.time() + 1, 10)
    assert [(d["endpoint_id"], d["url"]) for d in due] == [
        ("we_a", "https://hooks.example.com/we_a")
    ]
    seq = int(due[0]["seq"])
    store.record_webhook_attempt(
        seq, at=time.time(), delivered=False, status=500, error="HTTP 500", retry_at=1e12
    )
    assert store.due_webhook_deliveries(time.time() + 1, 10) == []  # not due again yet
    [listed] = store.webhook_deliveries(TENANT, "we_a", 10)
    assert (listed["state"], listed["attempts"], listed["last_status"]) == ("pending", 1, 500)
    store.record_webhook_attempt(
        seq, at=time.time(), delivered=True, status=200, error=None, retry_at=None
    )
    [listed] = store.webhook_deliveries(TENANT, "we_a", 10)
    assert (listed["state"], listed["attempts"]) == ("delivered", 2)
    assert store.delete_webhook_endpoint(TENANT, "we_a")
    assert store.webhook_deliveries(TENANT, "we_a", 10) == []


def test_one_holder_of_a_singleton_lease_until_it_runs_out(store: Store) -> None:
    assert store.hold_singleton("sender", "p1", 0.5)
    assert not store.hold_singleton("sender", "p2", 0.5)
    assert store.hold_singleton("sender", "p1", 0.5)
    time.sleep(0.7)
    assert store.hold_singleton("sender", "p2", 0.5)
    assert not store.hold_singleton("sender", "p1", 0.5)
