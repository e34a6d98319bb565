"""The Responses API on a real server (real engine, bundled model), through the official SDK:
realtime (whole and streamed) and as a batch endpoint."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest
from openai.types.responses import Response

from tests.support.helpers import assert_responses_stream_order, read_jsonl, upload, wait_for

ENDPOINT = "/v1/responses"


def response_line(
    custom_id: str, text: str, *, max_output_tokens: int = 8, **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {
            "model": "default",
            "input": text,
            "max_output_tokens": max_output_tokens,
            "temperature": 0,
            **body,
        },
    }


def test_create_returns_a_response_the_sdk_parses(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="default",
        instructions="You are terse.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        max_output_tokens=6,
        temperature=0,
        top_p=0.9,
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.instructions == "You are terse." and response.top_p == 0.9
    usage = response.usage
    assert usage is not None and 1 <= usage.output_tokens <= 6
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_a_response_cut_short_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="default", input="Write a long poem about the sea.", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 2


def test_streaming_gives_the_sdks_events_and_the_same_text(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": "default",
        "input": "Count to five.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    assert_responses_stream_order([event.type for event in events])
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output_text == whole.output_text
    assert final.response.usage is not None and whole.usage is not None
    assert final.response.usage.output_tokens == whole.usage.output_tokens

    # The SDK's stream helper accumulates the same text (this tiny model never stops within 8
    # tokens, so the stream ends with response.incomplete; the fake engine's unit test covers
    # response.completed through the helper's state).
    with client.responses.stream(**args) as stream:
        helper_events = list(stream)
    snapshots = [e.snapshot for e in helper_events if e.type == "response.output_text.delta"]
    assert snapshots[-1] == whole.output_text
    assert helper_events[-1].type == final.type


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.responses.create(model="default", input="x", max_output_tokens=2, **extra)
    assert excinfo.value.body["param"] == param


def test_unknown_models_and_overlong_answers_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.responses.create(model="nope", input="x")
    assert excinfo.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.responses.create(model="default", input="x", max_output_tokens=10**9, stream=True)
    assert excinfo.value.body["code"] == "context_length_exceeded"


def test_a_responses_batch_has_response_bodies_and_per_line_errors(client: openai.OpenAI) -> None:
    lines = [
        response_line("q-0", "Name a color."),
        response_line("q-1", "Name a fruit.", instructions="Answer in one word."),
        response_line(
            "items", "", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
        ),
        response_line("tools", "hi", tools=[{"type": "function", "name": "f"}]),
        response_line("unknown-model", "hi", model="no-such-model"),
        response_line("too-long", "hi", max_output_tokens=1_000_000),
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint=ENDPOINT, completion_window="24h"
    )
    assert batch.endpoint == ENDPOINT
    batch = wait_for(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 3)
    output = {row["custom_id"]: row for row in read_jsonl(client, batch.output_file_id)}
    errors = {row["custom_id"]: row for row in read_jsonl(client, batch.error_file_id)}
    assert set(output) == {"q-0", "q-1", "items"}
    input_total = output_total = 0
    for row in output.values():
        assert row["response"]["status_code"] == 200 and row["error"] is None
        response = Response.model_validate(row["response"]["body"])
        assert response.id.startswith("resp_") and response.output_text.strip()
        assert response.usage is not None and response.usage.output_tokens <= 8
        input_total += response.usage.input_tokens
        output_total += response.usage.output_tokens
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens) == (input_total, output_total)
    assert errors["tools"]["response"]["status_code"] == 400
    assert errors["tools"]["response"]["body"]["error"]["param"] == "tools"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    too_long = errors["too-long"]["response"]["body"]["error"]
    assert too_long["code"] == "context_length_exceeded"


def test_realtime_responses_are_served_while_a_responses_batch_runs_and_cancel_works(
    client: openai.OpenAI,
) -> None:
    lines = [
        response_line(f"bg-{i}", f"Write an essay about river {i}.", max_output_tokens=64)
        for i in range(40)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint=ENDPOINT, completion_window="24h"
    )
    wait_for(client, batch.id, ("in_progress",), timeout=60)
    answers: list[str] = []

    def ask() -> None:
        answers.append(
            client.responses.create(model="default", input="Hi.", max_output_tokens=4).output_text
        )

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join(timeout=60)
    assert answers, "the realtime response did not finish while the batch ran"
    assert client.batches.retrieve(batch.id).status == "in_progress", "realtime waited"
    client.batches.cancel(batch.id)
    batch = wait_for(client, batch.id, timeout=60)
    assert batch.status == "cancelled"
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    seen = sorted(row["custom_id"] for row in output + errors)
    assert seen == sorted(line["custom_id"] for line in lines)  # each exactly once
    assert errors and {row["error"]["code"] for row in errors} == {"batch_cancelled"}
    for row in output:
        assert row["response"]["body"]["object"] == "response"
