"""Batches for ``/v1/responses`` take the same path as chat ones: validation, per-line errors,
output files of ``response`` bodies, expiry and crash recovery (each line answered once).

On the fake engine and a temporary SQLite store, as the other scheduler tests."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from openai.types.responses import Response

from batchd import ids
from batchd.clock import now
from batchd.engines.fake import FAKE_MODEL
from batchd.protocol.batch_file import prefix_key
from batchd.store.records import BatchStatus, RequestLine
from tests.unit.scheduler.conftest import TENANT, Harness, run_to_drained

RESPONSES = "/v1/responses"


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": FAKE_MODEL, "input": text, "max_output_tokens": 8, **extra}


def line(custom_id: str, text: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": body(text, **extra)}
    )


def row(line_no: int, text: str) -> RequestLine:
    b = body(text)
    return RequestLine(
        line_no, f"c{line_no}", orjson.dumps(b), FAKE_MODEL, prefix_key(FAKE_MODEL, b)
    )


def create(harness: Harness, *, file_id: str = "file-unused", status: BatchStatus) -> str:
    batch_id = ids.batch_id()
    created = now()
    harness.store.create_batch(
        {
            "id": batch_id,
            "tenant": TENANT,
            "surface": "openai",
            "endpoint": RESPONSES,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": status.value,
            "created_at": created,
            "expires_at": created + 3600,
        }
    )
    return batch_id


def open_batch(harness: Harness, count: int) -> str:
    batch_id = create(harness, status=BatchStatus.VALIDATING)
    assert harness.store.insert_requests(batch_id, [row(n, f"q{n}") for n in range(1, count + 1)])
    assert harness.store.transition(batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    return batch_id


def test_a_responses_file_is_validated_run_and_finalized(harness: Harness) -> None:
    file_id = harness.upload(
        [
            line("a", "one two"),
            line("tools", "x", tools=[{"type": "function", "name": "f"}]),
            line("b", "three", instructions="Be brief."),
        ]
    )
    batch_id = create(harness, file_id=file_id, status=BatchStatus.VALIDATING)

    run_to_drained(harness.scheduler())

    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.COMPLETED
    output = harness.read_jsonl(batch.output_file_id)
    assert [o["custom_id"] for o in output] == ["a", "b"]
    texts = [Response.model_validate(o["response"]["body"]).output_text for o in output]
    assert texts == ["echo:one echo:two", "echo:three"]
    (error,) = harness.read_jsonl(batch.error_file_id)
    assert error["custom_id"] == "tools" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "tools"


def test_rows_of_a_dead_worker_are_run_again_and_answered_once(harness: Harness) -> None:
    batch_id = open_batch(harness, 3)
    assert len(harness.store.lease("dead-worker", 2, 60)) == 2
    scheduler = harness.scheduler()
    asyncio.run(scheduler.recover())

    run_to_drained(scheduler)

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == ["succeeded"] * 3
    assert [r.attempts for r in rows] == [2, 2, 1]
    output = harness.read_jsonl(harness.batch(batch_id).output_file_id)
    assert [o["custom_id"] for o in output] == ["c1", "c2", "c3"]
    assert {o["response"]["body"]["object"] for o in output} == {"response"}


def test_an_overdue_responses_batch_expires_its_unfinished_lines(harness: Harness) -> None:
    batch_id = open_batch(harness, 2)
    harness.set_deadline(batch_id, now() - 1)

    run_to_drained(harness.scheduler())

    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.EXPIRED
    assert [r.state for r in harness.rows(batch_id)] == ["expired", "expired"]
    errors = harness.read_jsonl(batch.error_file_id)
    assert [e["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]
