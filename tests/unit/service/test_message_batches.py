"""Message batch creation checks only the envelope (Anthropic validates ``params`` while
running them): every refusal names the request and field, and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.errors import InvalidRequest
from batchd.service import message_batches
from batchd.service.services import Services
from batchd.store.records import BatchStatus
from tests.unit.service.conftest import TENANT, MakeServices, message_body, message_request

ENVELOPE_REFUSALS: list[tuple[Any, str, str]] = [
    ([], "The request body must be a JSON object.", ""),
    ({}, "requests: Field required", "requests"),
    ({"requests": {}}, "requests: Input should be a valid list", "requests"),
    ({"requests": []}, "requests: List should have at least 1 item", "requests"),
    ({"requests": ["x"]}, "requests.0: Input should be an object", "requests.0"),
    ({"requests": [{"custom_id": "a"}]}, "requests.0.params: Field required", "requests.0.params"),
    (
        {"requests": [{"params": {}}]},
        "requests.0.custom_id: Field required",
        "requests.0.custom_id",
    ),
    (
        {"requests": [{**message_request("a"), "extra": 1}]},
        "requests.0.extra: Extra inputs are not permitted",
        "requests.0",
    ),
    (
        {"requests": [{"custom_id": "a", "params": []}]},
        "requests.0.params: Input should be an object",
        "requests.0.params",
    ),
    (
        {"requests": [message_request("x" * 65)]},
        "requests.0.custom_id: must be 1 to 64 characters from [a-zA-Z0-9_-]",
        "requests.0.custom_id",
    ),
    (
        message_body("a", "b", "a"),
        "requests.2.custom_id: duplicate custom_id 'a' (first used by requests.0)",
        "requests.2.custom_id",
    ),
]


@pytest.mark.parametrize(("body", "starts", "param"), ENVELOPE_REFUSALS)
def test_envelope_refusals_name_the_field(
    services: Services, body: Any, starts: str, param: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        message_batches.create_message_batch(services, TENANT, body)
    assert refused.value.message.startswith(starts)
    assert refused.value.param == (param or None)
    assert services.store.tenant_load(TENANT) == (0, 0)
    assert sum(services.store.request_state_counts().values()) == 0


def test_too_many_requests_for_one_batch(make_services: MakeServices) -> None:
    services = make_services(anthropic_max_batch_requests=2)
    with pytest.raises(InvalidRequest) as refused:
        message_batches.create_message_batch(services, TENANT, message_body("a", "b", "c"))
    assert refused.value.message == (
        "requests: the batch has 3 requests; the limit is 2 requests per batch "
        "(anthropic_max_batch_requests)."
    )


def test_params_are_not_checked_at_create(services: Services) -> None:
    """A bad ``params`` is an ``errored`` result later, not a refusal now."""
    body = {"requests": [{"custom_id": "a", "params": {"model": 7}}, message_request("b")]}
    record = message_batches.create_message_batch(services, TENANT, body)
    assert record.status == BatchStatus.IN_PROGRESS and record.counts.pending == 2
    assert record.model == "m"  # the models named, as far as they are strings
