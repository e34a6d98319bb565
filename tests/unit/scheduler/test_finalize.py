"""Finalizing: a finished batch's output and error files (OpenAI) or its end alone (Anthropic,
whose results are read from the rows), written exactly once, with counts and usage that match.

Tests of scheduling logic on the fake engine: the fake engine (echoing each word of the last
message as ``echo:<word>``, one token per word) runs the rows under a ``Scheduler``, or rows
are ended directly in a temporary SQLite store; ``finalize_batch`` writes to the directory blob
store. The wire shapes asserted here are the ones tests/e2e check through the official SDKs.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchd import failpoints
from batchd.protocol import anthropic as am
from batchd.scheduler.finalize import finalize_batch
from batchd.store import schema
from batchd.store.records import BatchStatus, RequestState
from tests.unit.scheduler.conftest import (
    TENANT,
    Harness,
    RecordingEngine,
    chat_line,
    chat_row,
    message_row,
    run_to_drained,
)

UNKNOWN_MODEL = {
    "message": "The model 'no-such-model' does not exist or you do not have access to it.",
    "type": "invalid_request_error",
    "param": "model",
    "code": "model_not_found",
}


def _mixed_batch(harness: Harness) -> str:
    """A validated and executed batch: lines 1, 3, 4 succeed, line 2 names no served model."""
    file_id = harness.upload(
        [
            chat_line("a", "one two three"),
            chat_line("b", "unanswerable", model="no-such-model"),
            chat_line("c", "four five"),
            chat_line("d", "six"),
        ]
    )
    batch_id = harness.openai_batch(file_id)
    run_to_drained(harness.scheduler(RecordingEngine()))
    return batch_id


def _finish(harness: Harness, batch_id: str) -> None:
    """Every row of the batch succeeded elsewhere."""
    harness.finish_elsewhere(batch_id, len(harness.rows(batch_id)), b'{"ok":true}')


# ------------------------------------------------------------------------------ OpenAI


def test_output_and_error_files_hold_one_line_per_request_in_line_order(
    harness: Harness,
) -> None:
    batch_id = _mixed_batch(harness)

    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.COMPLETED
    output = harness.read_jsonl(batch.output_file_id)
    errors = harness.read_jsonl(batch.error_file_id)
    assert [line["custom_id"] for line in output] == ["a", "c", "d"]
    assert [line["custom_id"] for line in errors] == ["b"]
    for line in output + errors:
        assert list(line) == ["id", "custom_id", "response", "error"]
        assert line["id"].startswith("batch_req_")
        assert list(line["response"]) == ["status_code", "request_id", "body"]
        assert line["response"]["request_id"].startswith("req_")
        assert line["error"] is None
    first = output[0]["response"]
    assert first["status_code"] == 200
    assert first["body"]["object"] == "chat.completion"
    assert first["body"]["model"] == "fake-echo"
    assert first["body"]["choices"][0]["message"]["content"] == "echo:one echo:two echo:three"
    assert first["body"]["choices"][0]["finish_reason"] == "stop"
    assert errors[0]["response"] == {
        "status_code": 404,
        "request_id": errors[0]["response"]["request_id"],
        "body": {"error": UNKNOWN_MODEL},
    }


def test_result_files_are_registered_as_batch_output_files(harness: Harness) -> None:
    batch_id = _mixed_batch(harness)

    batch = harness.batch(batch_id)
    records = {f.id: f for f in harness.output_file_rows()}
    assert set(records) == {batch.output_file_id, batch.error_file_id}
    for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
        record = records[file_id]
        assert (record.tenant, record.filename) == (TENANT, f"{batch_id}_{kind}.jsonl")
        assert record.bytes == harness.blobs.path(record.blob).stat().st_size
        assert record.expires_at - record.created_at == harness.settings.file_retention_seconds


def test_result_files_expire_as_the_batch_s_output_expires_after_says(harness: Harness) -> None:
    file_id = harness.upload([chat_line("a", "one"), chat_line("b", "x", model="no-such-model")])
    batch_id = harness.openai_batch(file_id)
    with harness.store.engine.begin() as conn:
        conn.execute(
            schema.batches.update()
            .where(schema.batches.c.id == batch_id)
            .values(output_expires_after=7200)
        )
    run_to_drained(harness.scheduler(RecordingEngine()))

    batch = harness.batch(batch_id)
    assert batch.output_file_id and batch.error_file_id
    for record in harness.output_file_rows():
        assert record.expires_at - record.created_at == 7200


def test_request_counts_and_usage_match_the_rows(harness: Harness) -> None:
    batch_id = _mixed_batch(harness)

    batch = harness.batch(batch_id)
    counts = batch.counts
    assert (counts.total, counts.succeeded, counts.errored) == (4, 3, 1)
    assert (counts.unfinished, counts.canceled, counts.expired) == (0, 0, 0)
    # One token per word, prompt and echo alike; an errored row uses none.
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (6, 6)
    assert batch.usage.cached_tokens == 0
    bodies = [line["response"]["body"] for line in harness.read_jsonl(batch.output_file_id)]
    assert sum(b["usage"]["prompt_tokens"] for b in bodies) == batch.usage.input_tokens
    assert sum(b["usage"]["completion_tokens"] for b in bodies) == batch.usage.output_tokens


@pytest.mark.parametrize(
    ("state", "final", "code", "message"),
    [
        (
            RequestState.CANCELED,
            BatchStatus.CANCELLED,
            "batch_cancelled",
            "This request was not executed because the batch was cancelled.",
        ),
        (
            RequestState.EXPIRED,
            BatchStatus.EXPIRED,
            "batch_expired",
            "This request could not be executed before the completion window expired.",
        ),
    ],
)
def test_rows_never_run_go_to_the_error_file_saying_why(
    harness: Harness, state: RequestState, final: BatchStatus, code: str, message: str
) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 4)])
    harness.finish_elsewhere(batch_id, 1, b'{"kept":true}')
    if state == RequestState.CANCELED:
        assert harness.store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    harness.store.end_pending(batch_id, state)

    assert finalize_batch(harness.store, harness.blobs, batch_id) == final

    batch = harness.batch(batch_id)
    assert batch.status == final
    output = harness.read_jsonl(batch.output_file_id)
    assert [(line["custom_id"], line["response"]["body"]) for line in output] == [
        ("c1", {"kept": True})
    ]
    errors = harness.read_jsonl(batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["c2", "c3"]
    for line in errors:
        assert list(line) == ["id", "custom_id", "response", "error"]
        assert line["response"] is None
        assert line["error"] == {"code": code, "message": message}


def test_a_batch_with_no_errors_has_no_error_file(harness: Harness) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 3)])
    _finish(harness, batch_id)

    assert finalize_batch(harness.store, harness.blobs, batch_id) == BatchStatus.COMPLETED

    batch = harness.batch(batch_id)
    assert batch.error_file_id is None
    assert len(harness.read_jsonl(batch.output_file_id)) == 2
    assert [f.id for f in harness.output_file_rows()] == [batch.output_file_id]


def test_finalize_leaves_a_batch_with_unfinished_rows_alone(harness: Harness) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 3)])
    harness.finish_elsewhere(batch_id, 1, b'{"ok":true}')

    assert finalize_batch(harness.store, harness.blobs, batch_id) is None

    assert harness.batch(batch_id).status == BatchStatus.IN_PROGRESS
    assert harness.output_file_rows() == []
    assert list(harness.blobs.root.iterdir()) == []


def test_finalizing_twice_ends_the_batch_once_and_registers_its_files_once(
    harness: Harness,
) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 4)])
    _finish(harness, batch_id)

    assert finalize_batch(harness.store, harness.blobs, batch_id) == BatchStatus.COMPLETED
    first = harness.batch(batch_id)
    assert finalize_batch(harness.store, harness.blobs, batch_id) is None

    again = harness.batch(batch_id)
    assert (again.status, again.output_file_id, again.completed_at) == (
        BatchStatus.COMPLETED,
        first.output_file_id,
        first.completed_at,
    )
    files = harness.output_file_rows()
    assert [f.id for f in files] == [first.output_file_id]
    assert {p.name for p in harness.blobs.root.iterdir()} == {files[0].blob}


def test_a_finalizer_that_loses_the_race_commits_nothing_and_deletes_its_blobs(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two finalizers of one batch both write result files; only the first commit ends the
    batch. The second's files are never registered and its blobs are removed."""
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 3)])
    _finish(harness, batch_id)
    hit = failpoints.hit
    winner: list[BatchStatus | None] = []

    def another_finalizer_commits_first(name: str) -> None:
        if name == "finalize.before_commit" and not winner:
            winner.append(None)  # (re-entered below: let that one through)
            winner[0] = finalize_batch(harness.store, harness.blobs, batch_id)
        hit(name)

    monkeypatch.setattr(failpoints, "hit", another_finalizer_commits_first)

    assert finalize_batch(harness.store, harness.blobs, batch_id) is None

    assert winner == [BatchStatus.COMPLETED]
    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.COMPLETED
    files = harness.output_file_rows()
    assert [f.id for f in files] == [batch.output_file_id]
    assert {p.name for p in harness.blobs.root.iterdir()} == {files[0].blob}
    assert len(harness.read_jsonl(batch.output_file_id)) == 2


# --------------------------------------------------------------------------- Anthropic


def _results(harness: Harness, batch_id: str) -> list[dict[str, Any]]:
    """The batch's results file as the results endpoint streams it: one line per row."""
    return [
        orjson.loads(am.result_line(row.custom_id, row.state.value, row.result))
        for row in harness.store.iter_finished(batch_id)
    ]


def test_an_anthropic_batch_ends_without_files_and_its_results_follow_the_rows(
    harness: Harness,
) -> None:
    batch_id = harness.open_batch(
        [
            message_row(1, "r1", "hi there"),
            message_row(2, "r2", "nobody serves this", model="no-such-model"),
            message_row(3, "r3", "bye"),
        ],
        surface="anthropic",
    )

    run_to_drained(harness.scheduler(RecordingEngine()))

    batch = harness.batch(batch_id)
    assert batch.status == BatchStatus.COMPLETED
    assert (batch.output_file_id, batch.error_file_id) == (None, None)
    assert harness.output_file_rows() == []
    assert finalize_batch(harness.store, harness.blobs, batch_id) is None  # ends once
    results = _results(harness, batch_id)
    assert [r["custom_id"] for r in results] == ["r1", "r2", "r3"]
    assert [r["result"]["type"] for r in results] == ["succeeded", "errored", "succeeded"]
    message = results[0]["result"]["message"]
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "fake-echo",
    )
    assert message["content"] == [{"type": "text", "text": "echo:hi echo:there"}]
    assert message["stop_reason"] == "end_turn"
    # Anthropic counts the end-of-turn token as output: one more than the words echoed.
    assert (message["usage"]["input_tokens"], message["usage"]["output_tokens"]) == (2, 3)
    error = results[1]["result"]["error"]
    assert error["type"] == "error"
    assert error["error"] == {
        "type": "not_found_error",
        "message": "The model 'no-such-model' does not exist or you do not have access to it.",
    }
    assert (batch.counts.succeeded, batch.counts.errored) == (2, 1)
    # The batch's usage sums what each message reported (2 + 1 in, 3 + 2 out).
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (3, 5)


@pytest.mark.parametrize(
    ("state", "final"),
    [(RequestState.CANCELED, BatchStatus.CANCELLED), (RequestState.EXPIRED, BatchStatus.EXPIRED)],
)
def test_anthropic_rows_never_run_end_as_their_state_in_the_results(
    harness: Harness, state: RequestState, final: BatchStatus
) -> None:
    batch_id = harness.open_batch(
        [message_row(n, f"r{n}", f"q{n}") for n in range(1, 3)], surface="anthropic"
    )
    harness.finish_elsewhere(batch_id, 1, b'{"type":"message"}')
    if state == RequestState.CANCELED:
        assert harness.store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    harness.store.end_pending(batch_id, state)

    assert finalize_batch(harness.store, harness.blobs, batch_id) == final
    assert finalize_batch(harness.store, harness.blobs, batch_id) is None

    assert harness.batch(batch_id).status == final
    assert _results(harness, batch_id) == [
        {"custom_id": "r1", "result": {"type": "succeeded", "message": {"type": "message"}}},
        {"custom_id": "r2", "result": {"type": state.value}},
    ]
