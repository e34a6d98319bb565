"""Webhook rules: the signature the SDK verifies, the URLs refused, the backoff and its
window, the outbox written by the transaction that ends a batch, and one sender at a time."""

from __future__ import annotations

import time

import openai
import pytest

from batchd import ids
from batchd.errors import InvalidRequest
from batchd.service import webhooks
from batchd.service.services import Services
from batchd.service.webhook_sender import check_url, next_attempt, resolve_checked, sign
from batchd.store.records import BatchStatus
from tests.unit.service.conftest import MakeServices
from tests.unit.store.builders import add_batch, batch_values, finish_all


def test_the_signature_is_the_one_the_openai_sdk_verifies() -> None:
    secret = ids.webhook_secret()
    body = b'{"id":"evt_1","object":"event","type":"batch.completed"}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, "evt_1", timestamp, body),
    }
    openai.OpenAI(api_key="x", webhook_secret=secret).webhooks.verify_signature(body, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x", webhook_secret=ids.webhook_secret()).webhooks.verify_signature(
            body, headers
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # not https
        "https://10.0.0.5/hook",  # private
        "https://169.254.169.254/latest",  # link-local (cloud metadata)
        "https://127.0.0.1/hook",  # loopback, not allowed here
        "https://user:pw@example.com/hook",  # credentials
        "ftp://example.com/hook",
        "https://[::1/hook",  # not parseable
        "https://example.com:99999/hook",  # port out of range
    ],
)
def test_unsafe_urls_are_refused_naming_url(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_url(url, allow_hosts=[])
    assert refused.value.param == "url"


def test_allowed_hosts_may_be_plain_http_and_private() -> None:
    assert check_url("http://127.0.0.1:9/x", allow_hosts=["127.0.0.1"])
    assert check_url("https://hooks.example.com/x", allow_hosts=[])
    resolve_checked("127.0.0.1", 80, ["127.0.0.1"])  # allowed: no refusal
    with pytest.raises(ConnectionRefusedError, match="not public"):
        resolve_checked("localhost", 80, [])


def test_backoff_doubles_and_stops_after_the_window(services: Services) -> None:
    settings = services.settings.model_copy(
        update={"webhook_retry_base_seconds": 10.0, "webhook_retry_window_seconds": 100}
    )
    first = next_attempt(0.0, 1, 0.0, settings)
    third = next_attempt(0.0, 3, 0.0, settings)
    assert first is not None and 10 <= first <= 11
    assert third is not None and 40 <= third <= 44
    assert next_attempt(0.0, 5, 0.0, settings) is None  # 160 s: past the window


def test_ending_a_batch_writes_its_event_for_the_endpoints_that_want_it(
    services: Services,
) -> None:
    store = services.store
    webhooks.create_endpoint(
        services, "t", {"url": "https://hooks.example.com/a", "events": ["batch.completed"]}
    )
    webhooks.create_endpoint(
        services, "t", {"url": "https://hooks.example.com/b", "event_types": ["batch.failed"]}
    )
    webhooks.create_endpoint(services, "other", {"url": "https://hooks.example.com/c"})
    add_batch(store, "b1", 1, tenant="t")
    finish_all(store)
    assert store.finalize("b1", [BatchStatus.IN_PROGRESS], BatchStatus.COMPLETED, [], None, None)
    store.create_batch(batch_values("b2", tenant="t"))
    assert store.transition("b2", [BatchStatus.VALIDATING], BatchStatus.FAILED)
    due = store.due_webhook_deliveries(time.time() + 1, 10)
    assert sorted(d["url"] for d in due) == [
        "https://hooks.example.com/a",
        "https://hooks.example.com/b",
    ]
    # Neither a transition that ends nothing nor one from an end to an end writes an event.
    add_batch(store, "b3", 1, tenant="t")
    assert store.transition("b2", [BatchStatus.FAILED], BatchStatus.FAILED)
    assert len(store.due_webhook_deliveries(time.time() + 1, 10)) == 2


def test_one_sender_at_a_time_and_a_dead_ones_lease_runs_out(make_services: MakeServices) -> None:
    store = make_services().store
    assert store.hold_singleton("job", "a", 0.5)
    assert not store.hold_singleton("job", "b", 0.5)
    assert store.hold_singleton("job", "a", 0.5)  # renewed by its holder
    time.sleep(0.6)
    assert store.hold_singleton("job", "b", 0.5)


def test_event_types_batchd_does_not_send_are_refused(services: Services) -> None:
    with pytest.raises(InvalidRequest, match=r"response\.completed"):
        webhooks.create_endpoint(
            services,
            "t",
            {"url": "https://hooks.example.com/a", "event_types": ["response.completed"]},
        )
