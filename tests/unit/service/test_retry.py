"""Retrying a batch's failed requests: the new batch holds exactly the original lines (OpenAI)
or stored params (Anthropic) of the requests that errored, expired or were cancelled, in input
order, with ``retry_of`` in its metadata; what cannot be retried is a 400 naming the batch."""

from __future__ import annotations

import orjson
import pytest

from batchd.errors import InvalidRequest, LimitExceeded, NotFound
from batchd.scheduler.validation import validate_batch
from batchd.service import batches, files, message_batches, retry
from batchd.service.services import Services
from batchd.store.records import BatchRecord, BatchStatus, RequestOutcome, RequestState
from tests.unit.service.conftest import (
    OTHER,
    TENANT,
    MakeServices,
    batch_body,
    end_batch,
    message_body,
    upload,
)

OWNER = "worker-1"


def line(custom_id: str, *, spacing: str = " ") -> bytes:
    """A chat line written unusually (spacing, key order), so a copy is told from a
    re-serialization."""
    return (
        f'{{"method":"POST",{spacing}"custom_id": "{custom_id}", "url": "/v1/chat/completions",'
        f'{spacing}"body": {{"model": "m", "messages": [{{"role": "user", "content": "q"}}],'
        f' "max_tokens": 4}}}}'
    ).encode()


# The validator's numbering: a BOM before line 1, CRLF ends, blank lines counted, no final
# newline. Requests sit on lines 1, 3, 4, 6 and 7.
A, B, C, D, E = line("a"), line("b", spacing="  "), line("c"), line("d"), line("e", spacing="")
INPUT = b"\xef\xbb\xbf" + A + b"\r\n\n" + B + b"\r\n" + C + b"\n   \n" + D + b"\n" + E
OK = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4)


def outcome(state: RequestState) -> RequestOutcome:
    if state == RequestState.SUCCEEDED:
        return OK
    return RequestOutcome(state, 500 if state == RequestState.ERRORED else None, b'{"e":1}')


def run_rows(services: Services, batch_id: str, states: dict[str, RequestState]) -> None:
    """Lease the batch's rows and end each in the state its custom_id is given."""
    leased = services.store.lease(OWNER, 100, lease_seconds=30)
    assert sorted(item.custom_id for item in leased) == sorted(states)
    for item in leased:
        assert services.store.complete(item, OWNER, outcome(states[item.custom_id]))


def ended_batch(
    services: Services,
    states: dict[str, RequestState],
    *,
    data: bytes = INPUT,
    status: BatchStatus = BatchStatus.COMPLETED,
    **body: object,
) -> BatchRecord:
    """An OpenAI batch over ``data``, validated into rows, its rows and itself ended."""
    created = batches.create_openai_batch(
        services, TENANT, batch_body(upload(services, data).id, **body)
    )
    assert validate_batch(services.store, services.blobs, services.settings, created.id, OWNER) == (
        BatchStatus.IN_PROGRESS
    )
    run_rows(services, created.id, states)
    end_batch(services, created.id, status)
    return batches.get_batch(services, TENANT, created.id, "openai")


def file_bytes(services: Services, file_id: str | None) -> bytes:
    record = services.store.get_file(TENANT, file_id or "")
    assert record is not None
    with services.blobs.open(record.blob) as stream:
        return stream.read()


def refusal(services: Services, batch_id: str, tenant: str = TENANT) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as refused:
        retry.retry_batch(services, tenant, batch_id)
    return refused.value


S, X, CA, EX = (
    RequestState.SUCCEEDED,
    RequestState.ERRORED,
    RequestState.CANCELED,
    RequestState.EXPIRED,
)


def test_retry_takes_the_failed_lines_as_they_were_in_order(services: Services) -> None:
    original = ended_batch(
        services,
        {"a": X, "b": S, "c": CA, "d": S, "e": EX},
        status=BatchStatus.CANCELLED,
        completion_window="2h",
        metadata={"team": "x"},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    made = retry.retry_batch(services, TENANT, original.id)

    assert made.status == BatchStatus.VALIDATING and made.id != original.id
    assert (made.endpoint, made.completion_window) == (original.endpoint, "2h")
    assert made.expires_at - made.created_at == 2 * 3600
    assert made.output_expires_after == 7200
    assert made.metadata == {"team": "x", "retry_of": original.id}
    # The lines themselves, BOM and CRLF aside, in input order: not re-serialized bodies.
    assert file_bytes(services, made.input_file_id) == A + b"\n" + C + b"\n" + E + b"\n"
    retry_file = files.get_file(services, TENANT, made.input_file_id or "")
    assert (retry_file.filename, retry_file.purpose) == (f"retry-of-{original.id}.jsonl", "batch")
    # And it validates into exactly those requests.
    assert validate_batch(services.store, services.blobs, services.settings, made.id, OWNER) == (
        BatchStatus.IN_PROGRESS
    )
    leased = services.store.lease(OWNER, 100, lease_seconds=30)
    assert sorted((item.custom_id, item.line_no) for item in leased) == [
        ("a", 1),
        ("c", 2),
        ("e", 3),
    ]


def test_a_retry_of_a_retry_names_its_own_source(services: Services) -> None:
    first = ended_batch(services, {"a": X, "b": X, "c": S, "d": S, "e": S})
    second = retry.retry_batch(services, TENANT, first.id)
    validate_batch(services.store, services.blobs, services.settings, second.id, OWNER)
    run_rows(services, second.id, {"a": S, "b": X})
    end_batch(services, second.id, BatchStatus.COMPLETED)
    third = retry.retry_batch(services, TENANT, second.id)
    assert third.metadata == {"retry_of": second.id}
    assert file_bytes(services, third.input_file_id) == B + b"\n"


def test_retry_metadata_keeps_retry_of_within_the_key_limit() -> None:
    full = {f"k{i}": str(i) for i in range(16)}
    kept = retry.retry_metadata(full, "batch_x")
    assert len(kept) == 16 and kept["retry_of"] == "batch_x"
    assert list(kept)[:15] == [f"k{i}" for i in range(15)]  # the last original key gave way
    assert retry.retry_metadata(None, "batch_y") == {"retry_of": "batch_y"}
    assert retry.retry_metadata({"retry_of": "old", "a": "1"}, "new") == {
        "a": "1",
        "retry_of": "new",
    }


def test_nothing_to_retry_is_a_400(services: Services) -> None:
    done = ended_batch(services, {c: S for c in "abcde"})
    error = refusal(services, done.id)
    assert (error.message, error.param, error.code) == (
        f"Batch {done.id} has no failed, expired or cancelled requests to retry.",
        "batch_id",
        "invalid_value",
    )
    # A batch that failed validation has no requests at all.
    bad = batches.create_openai_batch(services, TENANT, batch_body(upload(services, b"nope\n").id))
    assert validate_batch(services.store, services.blobs, services.settings, bad.id) == (
        BatchStatus.FAILED
    )
    assert refusal(services, bad.id).message == (
        f"Batch {bad.id} has no failed, expired or cancelled requests to retry."
    )
    assert services.store.tenant_load(TENANT) == (0, 0)  # nothing was created


def test_a_batch_that_has_not_ended_is_a_400(services: Services) -> None:
    created = batches.create_openai_batch(services, TENANT, batch_body(upload(services, INPUT).id))
    error = refusal(services, created.id)
    assert error.message == (
        f"Batch {created.id} is still validating; only a batch that has ended (completed,"
        " expired or cancelled) can be retried."
    )
    assert error.param == "batch_id"
    validate_batch(services.store, services.blobs, services.settings, created.id, OWNER)
    assert "is still in_progress;" in refusal(services, created.id).message
    batches.cancel_batch(services, TENANT, created.id, "openai")
    assert "is still cancelling;" in refusal(services, created.id).message


def test_an_input_file_no_longer_there_is_a_400(services: Services) -> None:
    original = ended_batch(services, {"a": X, "b": S, "c": S, "d": S, "e": S})
    files.delete_file(services, TENANT, original.input_file_id or "")
    error = refusal(services, original.id)
    assert error.message == (
        f"The input file {original.input_file_id} of batch {original.id} no longer exists"
        " (deleted, or past its retention); its requests cannot be read to retry them."
    )
    assert error.param == "batch_id"


def test_only_the_tenants_own_openai_batch_is_found(services: Services) -> None:
    original = ended_batch(services, {"a": X, "b": S, "c": S, "d": S, "e": S})
    for tenant, batch_id in ((OTHER, original.id), (TENANT, "batch_nope")):
        with pytest.raises(NotFound) as missing:
            retry.retry_batch(services, tenant, batch_id)
        assert missing.value.param == "batch_id"
    message_batch = message_batches.create_message_batch(services, TENANT, message_body("a"))
    with pytest.raises(NotFound):
        retry.retry_batch(services, TENANT, message_batch.id)
    with pytest.raises(NotFound):
        retry.retry_message_batch(services, TENANT, original.id)


def test_an_idempotency_key_makes_one_retry(services: Services) -> None:
    original = ended_batch(services, {"a": X, "b": S, "c": S, "d": S, "e": S})
    first = retry.retry_batch(services, TENANT, original.id, "key-1")
    again = retry.retry_batch(services, TENANT, original.id, "key-1")
    assert again.id == first.id and again.input_file_id == first.input_file_id
    listed, _ = files.list_files(services, TENANT, purpose=None, after=None, limit=10, order="asc")
    assert len(listed) == 2  # the input and one retry file: the repeat kept no copy
    other = retry.retry_batch(services, TENANT, original.id)  # no key: another retry
    assert other.id != first.id


def test_a_refused_create_leaves_no_file_behind(make_services: MakeServices) -> None:
    services = make_services(max_active_batches_per_tenant=1)
    original = ended_batch(services, {"a": X, "b": S, "c": S, "d": S, "e": S})
    batches.create_openai_batch(services, TENANT, batch_body(upload(services).id))  # the room
    with pytest.raises(LimitExceeded):
        retry.retry_batch(services, TENANT, original.id)
    listed, _ = files.list_files(services, TENANT, purpose=None, after=None, limit=10, order="asc")
    assert [f.filename for f in listed] == ["in.jsonl", "in.jsonl"]


# ------------------------------------------------------------------------------ Anthropic


def ended_message_batch(
    services: Services, states: dict[str, RequestState], status: BatchStatus
) -> BatchRecord:
    body = message_body(*states)
    body["requests"][1]["params"]["system"] = "Be brief."  # bodies differ: each must be its own
    made = message_batches.create_message_batch(services, TENANT, body)
    run_rows(services, made.id, states)
    end_batch(services, made.id, status)
    return batches.get_batch(services, TENANT, made.id, "anthropic")


def test_message_batch_retry_takes_the_failed_requests_params(services: Services) -> None:
    states = {"m0": S, "m1": X, "m2": CA, "m3": EX, "m4": S}
    original = ended_message_batch(services, states, BatchStatus.CANCELLED)
    made = retry.retry_message_batch(services, TENANT, original.id)

    assert made.surface == "anthropic" and made.status == BatchStatus.IN_PROGRESS
    assert made.metadata == {"retry_of": original.id}
    assert batches.get_batch(services, TENANT, made.id, "anthropic").metadata == {
        "retry_of": original.id
    }
    wanted = message_body("m0", "m1", "m2", "m3", "m4")["requests"]
    wanted[1]["params"]["system"] = "Be brief."
    leased = services.store.lease(OWNER, 100, lease_seconds=30)
    got = sorted((item.line_no, item.custom_id, orjson.loads(item.body)) for item in leased)
    assert got == [(i + 1, r["custom_id"], r["params"]) for i, r in enumerate(wanted[1:4])]


def test_message_batch_retry_refusals(services: Services) -> None:
    done = ended_message_batch(services, {"s0": S, "s1": S}, BatchStatus.COMPLETED)
    with pytest.raises(InvalidRequest) as refused:
        retry.retry_message_batch(services, TENANT, done.id)
    assert refused.value.message == (
        f"Message batch {done.id} has no errored, expired or canceled requests to retry."
    )

    archived = ended_message_batch(services, {"x0": X, "x1": S}, BatchStatus.COMPLETED)
    assert services.store.archive_batch(archived.id, at=archived.created_at + 1)
    with pytest.raises(InvalidRequest) as refused:
        retry.retry_message_batch(services, TENANT, archived.id)
    assert refused.value.message.startswith(
        f"Message batch {archived.id} was archived: its requests' inputs are no longer kept"
    )

    running = message_batches.create_message_batch(services, TENANT, message_body("a"))
    with pytest.raises(InvalidRequest) as refused:
        retry.retry_message_batch(services, TENANT, running.id)
    assert refused.value.message == (
        f"Message batch {running.id} is still in_progress; only a batch that has ended can be"
        " retried."
    )
    assert refused.value.param == "message_batch_id"


def test_message_batch_retry_with_a_key_happens_once(services: Services) -> None:
    original = ended_message_batch(services, {"k0": X, "k1": S}, BatchStatus.COMPLETED)
    first = retry.retry_message_batch(services, TENANT, original.id, "key-m")
    again = retry.retry_message_batch(services, TENANT, original.id, "key-m")
    assert again.id == first.id and again.metadata == {"retry_of": original.id}
