"""OpenAI batch use cases: what a create refuses, and cancelling (idempotent, surface-bound)."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.service import batches, message_batches
from batchd.service.services import Services
from batchd.store.records import BatchStatus
from tests.unit.service.conftest import OTHER, TENANT, batch_body, end_batch, message_body, upload


def refusal(services: Services, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        batches.create_openai_batch(services, TENANT, body)
    return refused.value


def test_create_opens_a_validating_batch(services: Services) -> None:
    file = upload(services)
    body = batch_body(file.id, completion_window="2h", metadata={"run": "7"})
    record = batches.create_openai_batch(services, TENANT, body)
    assert (record.status, record.surface, record.input_file_id) == (
        BatchStatus.VALIDATING,
        "openai",
        file.id,
    )
    assert record.expires_at - record.created_at == 2 * 3600
    assert batches.get_batch(services, TENANT, record.id, "openai") == record
    assert batches.list_batches(services, TENANT, "openai", after=None, limit=5) == (
        [record],
        False,
    )


def test_create_refuses_unknown_and_unsupported_endpoints(services: Services) -> None:
    file = upload(services)
    unknown = refusal(services, batch_body(file.id, endpoint="/v1/nope"))
    assert (unknown.param, unknown.code) == ("endpoint", "invalid_value")
    # The fake engine, like the embedded one, generates text only.
    assert unknown.message == (
        "Invalid endpoint '/v1/nope': expected one of /v1/chat/completions, /v1/completions,"
        " /v1/responses."
    )
    embeddings = refusal(services, batch_body(file.id, endpoint="/v1/embeddings"))
    assert (embeddings.param, embeddings.code) == ("endpoint", "unsupported_endpoint")
    assert embeddings.message.startswith("The endpoint /v1/embeddings is not supported")


@pytest.mark.parametrize("window", ["48", "0h", "8d", "1w", 24])
def test_create_refuses_a_completion_window_out_of_range(services: Services, window: Any) -> None:
    file = upload(services)
    error = refusal(services, batch_body(file.id, completion_window=window))
    assert error.param == "completion_window"


def test_create_refuses_a_missing_file_or_one_of_another_purpose(services: Services) -> None:
    missing = refusal(services, batch_body("file-nope"))
    assert (missing.message, missing.param, missing.code) == (
        "No such File object: file-nope",
        "input_file_id",
        "invalid_request",
    )
    # Another tenant's file is as missing as a file that never was.
    theirs = upload(services, tenant=OTHER)
    assert refusal(services, batch_body(theirs.id)).message == f"No such File object: {theirs.id}"
    vision = upload(services, purpose="vision", filename="x.png")
    wrong = refusal(services, batch_body(vision.id))
    assert wrong.message == (
        f"File {vision.id} has purpose 'vision'; a batch needs purpose 'batch'."
    )
    assert services.store.tenant_load(TENANT) == (0, 0)  # nothing was created


def test_create_refuses_a_body_without_its_required_parameters(services: Services) -> None:
    assert refusal(services, []).message == "The request body must be a JSON object."
    for key in ("input_file_id", "endpoint", "completion_window"):
        body = {**batch_body("file-x"), key: ""}
        error = refusal(services, body)
        assert (error.param, error.code) == (key, "missing_required_parameter")
    not_a_string = {**batch_body("x"), "input_file_id": 7}
    assert refusal(services, not_a_string).message == "input_file_id must be a string."


def test_cancel_is_idempotent(services: Services) -> None:
    record = batches.create_openai_batch(services, TENANT, batch_body(upload(services).id))
    first = batches.cancel_batch(services, TENANT, record.id, "openai")
    again = batches.cancel_batch(services, TENANT, record.id, "openai")
    assert first.status == again.status == BatchStatus.CANCELLING
    end_batch(services, record.id, BatchStatus.CANCELLED)
    assert batches.cancel_batch(services, TENANT, record.id, "openai").status == (
        BatchStatus.CANCELLED
    )


def test_cancel_refuses_an_ended_batch_and_another_surface(services: Services) -> None:
    record = batches.create_openai_batch(services, TENANT, batch_body(upload(services).id))
    with pytest.raises(NotFound):
        batches.cancel_batch(services, TENANT, record.id, "anthropic")
    with pytest.raises(NotFound):
        batches.cancel_batch(services, OTHER, record.id, "openai")
    end_batch(services, record.id, BatchStatus.COMPLETED)
    with pytest.raises(Conflict) as refused:
        batches.cancel_batch(services, TENANT, record.id, "openai")
    assert refused.value.message == "Cannot cancel a batch with status 'completed'."


def test_message_batch_cancel_is_idempotent_until_it_ends(services: Services) -> None:
    made = message_batches.create_message_batch(services, TENANT, message_body("a"))
    first = message_batches.cancel_message_batch(services, TENANT, made.id)
    again = message_batches.cancel_message_batch(services, TENANT, made.id)
    assert first.status == again.status == BatchStatus.CANCELLING
    end_batch(services, made.id, BatchStatus.CANCELLED)
    with pytest.raises(Conflict) as refused:
        message_batches.cancel_message_batch(services, TENANT, made.id)
    assert refused.value.message == (
        f"Message batch {made.id} has already ended; it cannot be canceled."
    )


def test_create_keeps_output_expires_after_for_the_result_files(services: Services) -> None:
    file = upload(services)
    policy = {"anchor": "created_at", "seconds": 7200}
    batch = batches.create_openai_batch(
        services, TENANT, batch_body(file.id, output_expires_after=policy)
    )
    assert batch.output_expires_after == 7200
    plain = batches.create_openai_batch(services, TENANT, batch_body(upload(services).id))
    assert plain.output_expires_after is None


@pytest.mark.parametrize(
    ("policy", "param"),
    [
        ({"anchor": "created_at", "seconds": 60}, "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 2_592_001}, "output_expires_after.seconds"),
        ({"anchor": "now", "seconds": 7200}, "output_expires_after.anchor"),
        ("30d", "output_expires_after"),
    ],
)
def test_create_refuses_an_output_expires_after_out_of_range_or_malformed(
    services: Services, policy: Any, param: str
) -> None:
    file = upload(services)
    error = refusal(services, batch_body(file.id, output_expires_after=policy))
    assert error.param == param
    assert services.store.list_batches(TENANT, "openai", after=None, limit=10)[0] == []
