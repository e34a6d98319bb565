"""Validation: an uploaded batch file becomes request rows, or fails the batch saying why.

Tests of scheduling logic on the fake engine (here not even run): a temporary SQLite store and
the directory blob store, calling ``validate_batch`` as the scheduler's background thread does.
"""

from __future__ import annotations

import orjson

from batchd.engines.fake import FakeEngine
from batchd.protocol.batch_file import prefix_key
from batchd.scheduler.validation import batch_model, validate_batch
from batchd.store.records import BatchStatus, RequestState
from tests.unit.scheduler.conftest import TENANT, Harness, chat_body, chat_line, chat_row


def test_a_batch_file_becomes_one_pending_row_per_request_line(harness: Harness) -> None:
    file_id = harness.upload(
        [
            chat_line("a", "first", system="house rules"),
            b"",  # a blank line carries no request but still counts as a line
            chat_line("b", "second", system="other rules"),
            chat_line("c", "third", system="house rules"),
        ]
    )
    batch_id = harness.openai_batch(file_id)

    status = validate_batch(harness.store, harness.blobs, harness.settings, batch_id, "worker-1")

    assert status == BatchStatus.IN_PROGRESS
    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.IN_PROGRESS
    assert batch.model == "fake-echo"
    assert (batch.counts.total, batch.counts.pending) == (3, 3)
    rows = harness.rows(batch_id)
    assert [(r.line_no, r.custom_id) for r in rows] == [(1, "a"), (3, "b"), (4, "c")]
    assert all(r.state == RequestState.PENDING.value and r.model == "fake-echo" for r in rows)
    # The stored body is the line's body, compact.
    assert rows[1].body == orjson.dumps(chat_body("second", system="other rules"))
    # Lines sharing everything but their last turn share a prefix key; the others do not.
    keys = [r.prefix_key for r in rows]
    assert keys[0] == keys[2] != keys[1]
    assert keys[0] == prefix_key("fake-echo", chat_body("first", system="house rules"))


def test_a_bad_line_fails_the_batch_naming_the_line_and_inserts_no_rows(
    harness: Harness,
) -> None:
    file_id = harness.upload([chat_line("a", "fine"), b"{not json", chat_line("c", "fine too")])
    batch_id = harness.openai_batch(file_id)

    status = validate_batch(harness.store, harness.blobs, harness.settings, batch_id, "worker-1")

    assert status == BatchStatus.FAILED
    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.FAILED
    assert batch.failed_at is not None
    assert batch.errors is not None and len(batch.errors) == 1
    (error,) = batch.errors
    assert (error["code"], error["line"], error["param"]) == ("invalid_json_line", 2, None)
    assert error["message"].startswith("This line is not parseable as valid JSON")
    assert harness.rows(batch_id) == []


def test_a_file_over_max_batch_lines_fails_naming_both_counts(harness: Harness) -> None:
    harness.settings.max_batch_lines = 2
    file_id = harness.upload([chat_line(f"c{i}", "hello") for i in range(3)])
    batch_id = harness.openai_batch(file_id)

    status = validate_batch(harness.store, harness.blobs, harness.settings, batch_id, "worker-1")

    assert status == BatchStatus.FAILED
    errors = harness.batch(batch_id).errors
    assert errors is not None
    assert errors[0]["code"] == "too_many_tasks"
    assert errors[0]["line"] is None
    assert "has 3 requests" in errors[0]["message"]
    assert "the limit is 2 requests per batch" in errors[0]["message"]
    assert harness.rows(batch_id) == []


def test_the_queued_request_limit_is_checked_at_validation(harness: Harness) -> None:
    """A batch's size is unknown at create; validation counts the tenant's other queued rows
    (not another tenant's) plus this batch's and refuses to go past the limit."""
    harness.settings.max_queued_requests_per_tenant = 3
    harness.open_batch([chat_row(1, "q1", "x"), chat_row(2, "q2", "x")])  # 2 queued already
    harness.open_batch([chat_row(i, f"o{i}", "x") for i in range(1, 6)], tenant="tenant-b")
    over = harness.openai_batch(harness.upload([chat_line("a", "x"), chat_line("b", "x")]))

    status = validate_batch(harness.store, harness.blobs, harness.settings, over, "worker-1")

    assert status == BatchStatus.FAILED
    errors = harness.batch(over).errors
    assert errors is not None
    (error,) = errors
    assert error["code"] == "queued_request_limit_exceeded"
    assert error["param"] == "max_queued_requests_per_tenant"
    message = error["message"]
    assert "this batch has 2 requests" in message
    assert "already has 2 requests waiting or running, 4 in all" in message
    assert "the limit is 3 queued requests per key" in message
    assert harness.rows(over) == []

    # Exactly at the limit is allowed.
    fits = harness.openai_batch(harness.upload([chat_line("a", "x")], tenant=TENANT))
    assert (
        validate_batch(harness.store, harness.blobs, harness.settings, fits, "worker-1")
        == BatchStatus.IN_PROGRESS
    )


def test_a_lapsed_validation_claim_is_taken_over_and_its_partial_rows_replaced(
    harness: Harness,
) -> None:
    file_id = harness.upload([chat_line("a", "one"), chat_line("b", "two")])
    batch_id = harness.openai_batch(file_id)
    # A worker claimed the batch, inserted a partial first chunk, and died; its claim lapsed.
    assert harness.store.claim_validation(batch_id, "dead-worker", -5)
    assert harness.store.insert_requests(batch_id, [chat_row(1, "a", "one")])

    status = validate_batch(harness.store, harness.blobs, harness.settings, batch_id, "worker-2")

    assert status == BatchStatus.IN_PROGRESS
    assert [(r.line_no, r.custom_id) for r in harness.rows(batch_id)] == [(1, "a"), (2, "b")]


def test_a_live_validation_claim_is_left_to_its_holder(harness: Harness) -> None:
    file_id = harness.upload([chat_line("a", "one")])
    batch_id = harness.openai_batch(file_id)
    assert harness.store.claim_validation(batch_id, "busy-worker", 60)

    status = validate_batch(harness.store, harness.blobs, harness.settings, batch_id, "worker-2")

    assert status == BatchStatus.VALIDATING
    assert harness.batch(batch_id).status == BatchStatus.VALIDATING
    assert harness.rows(batch_id) == []


def test_the_batch_model_is_the_served_id_its_lines_name(harness: Harness) -> None:
    file_id = harness.upload([chat_line("a", "x", model="default"), chat_line("b", "y")])
    batch_id = harness.openai_batch(file_id)
    validate_batch(
        harness.store,
        harness.blobs,
        harness.settings,
        batch_id,
        "worker-1",
        FakeEngine().resolve_model,
    )
    assert harness.batch(batch_id).model == "fake-echo", "the alias resolved, named once"


def test_a_file_naming_several_models_names_their_served_ids_in_first_use_order() -> None:
    served = {"default": "alpha", "alpha": "alpha", "beta": "beta"}
    assert batch_model(["beta", "default", "alpha"], served.get) == "beta,alpha"
    assert batch_model(["nobody"], served.get) == "nobody", "kept as written: its lines 404"
    assert batch_model(["m1", "m2"]) == "m1,m2"
    assert batch_model([f"m{i}" for i in range(10)]).count(",") == 7  # at most 8
    assert batch_model([]) is None
