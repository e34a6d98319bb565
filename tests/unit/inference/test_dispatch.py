"""The dispatch the realtime routes call, on the fake engine (instant, no model) and a stub
upstream: the same body as a batch row gets, and the SSE bytes of streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from batchd.engines.base import ForwardResponse, GenerationResult, Priority
from batchd.engines.fake import FakeEngine
from batchd.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from batchd.inference import dispatch
from batchd.inference.dispatch import Relayed, Rendered, Streamed
from batchd.inference.executors.registry import execute
from batchd.protocol.anthropic import MESSAGES_ENDPOINT
from tests.unit.inference.stubs import StubUpstream

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CHAT_BODY = {"model": "default", "messages": [{"role": "user", "content": "one two three"}]}
COMPLETION_BODY = {"model": "default", "prompt": "one two three", "max_tokens": 2}
MESSAGE_BODY = {
    "model": "default",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "one two three"}],
}


def without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in chunks]


def sse_data(chunks: list[bytes]) -> list[Any]:
    lines = [line for chunk in chunks for line in chunk.split(b"\n") if line.startswith(b"data:")]
    return [line[6:] if line[6:] == b"[DONE]" else orjson.loads(line[6:]) for line in lines]


@pytest.mark.parametrize(("endpoint", "body"), [(CHAT, CHAT_BODY), (COMPLETIONS, COMPLETION_BODY)])
def test_realtime_and_batch_give_the_same_openai_body(endpoint: str, body: dict[str, Any]) -> None:
    engine = FakeEngine()
    realtime = asyncio.run(dispatch.answer_realtime_openai(engine, endpoint, body))
    assert isinstance(realtime, Rendered)
    batch = asyncio.run(execute(engine, endpoint, orjson.dumps(body)))
    stored = orjson.loads(batch.result)
    assert realtime.body["id"] != stored["id"]
    assert without(realtime.body, "id", "created") == without(stored, "id", "created")


def test_realtime_and_batch_give_the_same_message_but_for_the_tier() -> None:
    engine = FakeEngine()
    realtime = asyncio.run(dispatch.answer_realtime_message(engine, MESSAGE_BODY))
    assert isinstance(realtime, Rendered)
    batch = asyncio.run(execute(engine, MESSAGES_ENDPOINT, orjson.dumps(MESSAGE_BODY)))
    stored = orjson.loads(batch.result)
    assert realtime.body["usage"].pop("service_tier") == "standard"
    assert stored["usage"].pop("service_tier") == "batch"
    assert without(realtime.body, "id") == without(stored, "id")


def test_realtime_refusals_are_raised_for_the_api_to_render() -> None:
    engine = FakeEngine()
    with pytest.raises(ModelNotFound):
        asyncio.run(dispatch.answer_realtime_openai(engine, CHAT, {**CHAT_BODY, "model": "x"}))
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(
            dispatch.answer_realtime_openai(engine, CHAT, {**CHAT_BODY, "max_tokens": 10**9})
        )
    with pytest.raises(InvalidRequest):
        asyncio.run(dispatch.answer_realtime_message(engine, {**MESSAGE_BODY, "top_k": "1"}))


def test_a_realtime_plan_has_realtime_priority_and_no_deadline() -> None:
    plan = dispatch.plan_openai(FakeEngine(), CHAT, CHAT_BODY, Priority.REALTIME)
    assert isinstance(plan, dispatch.Generate)
    assert (plan.request.model, plan.request.priority, plan.request.deadline) == (
        "fake-echo",
        Priority.REALTIME,
        None,
    )
    message = dispatch.plan_message(FakeEngine(), MESSAGE_BODY, Priority.REALTIME)
    assert (message.request.priority, message.service_tier) == (Priority.REALTIME, "standard")


def test_a_chat_stream_matches_the_whole_answer() -> None:
    engine = FakeEngine()
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    answer = asyncio.run(dispatch.answer_realtime_openai(engine, CHAT, body))
    assert isinstance(answer, Streamed) and answer.headers == {}
    events = sse_data(asyncio.run(collect(answer.chunks)))
    assert events[-1] == b"[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = asyncio.run(dispatch.answer_realtime_openai(engine, CHAT, CHAT_BODY))
    assert isinstance(whole, Rendered)
    assert text == whole.body["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.body["usage"]


def test_a_completion_stream_ends_with_its_finish_reason() -> None:
    engine = FakeEngine()
    answer = asyncio.run(
        dispatch.answer_realtime_openai(engine, COMPLETIONS, {**COMPLETION_BODY, "stream": True})
    )
    assert isinstance(answer, Streamed)
    events = sse_data(asyncio.run(collect(answer.chunks)))
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "echo:one echo:two"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in events[-2]


def test_a_message_stream_carries_the_message_and_its_usage() -> None:
    engine = FakeEngine()

    async def answer_and_read() -> tuple[Streamed, list[bytes]]:
        # In one event loop, as a server runs it: the first piece is read before the answer.
        answer = await dispatch.answer_realtime_message(engine, {**MESSAGE_BODY, "stream": True})
        assert isinstance(answer, Streamed)
        return answer, await collect(answer.chunks)

    answer, chunks = asyncio.run(answer_and_read())
    assert answer.headers == {"cache-control": "no-cache"}
    names = [chunk.split(b"\n")[0] for chunk in chunks]
    assert names[:3] == [b"event: message_start", b"event: content_block_start", b"event: ping"]
    assert names[-3:] == [
        b"event: content_block_stop",
        b"event: message_delta",
        b"event: message_stop",
    ]
    events = sse_data(chunks)
    assert events[0]["message"]["usage"]["service_tier"] == "standard"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "echo:one echo:two echo:three"
    assert events[-2]["usage"]["output_tokens"] == 4
    assert events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_an_upstream_stream_is_relayed_as_sent() -> None:
    pieces = [b"data: {}\n\n", b"data: [DONE]\n\n"]
    upstream = StubUpstream(answer=ForwardResponse(200, b"", 1), stream_pieces=pieces)
    body = {"model": "up", "messages": [{"role": "user", "content": "x"}], "stream": True}
    answer = asyncio.run(dispatch.answer_realtime_openai(upstream, CHAT, body))
    assert isinstance(answer, Streamed)
    assert answer.headers == {"cache-control": "no-cache"}
    assert asyncio.run(collect(answer.chunks)) == pieces
    (forwarded,) = upstream.forwarded
    assert (forwarded.body, forwarded.priority, forwarded.deadline) == (
        body,
        Priority.REALTIME,
        None,
    )


def test_an_upstream_refusing_a_stream_is_a_plain_answer() -> None:
    pieces = [b'{"error": ', b'{"message": "no"}}']
    upstream = StubUpstream(answer=ForwardResponse(400, b"", 1), stream_pieces=pieces)
    body = {"model": "up", "prompt": "x", "stream": True}
    answer = asyncio.run(dispatch.answer_realtime_openai(upstream, COMPLETIONS, body))
    assert isinstance(answer, Relayed)
    assert (answer.response.status_code, answer.response.body) == (400, b"".join(pieces))


def test_an_upstream_answer_is_relayed_byte_for_byte() -> None:
    sent = b'{"object": "list",\n "data": []}'
    upstream = StubUpstream(answer=ForwardResponse(200, sent, 1))
    answer = asyncio.run(
        dispatch.answer_realtime_openai(upstream, "/v1/embeddings", {"model": "up", "input": "x"})
    )
    assert isinstance(answer, Relayed) and answer.response.body == sent


def test_an_anthropic_stream_refused_at_once_is_raised_before_any_byte() -> None:
    # The stub's stream raises on its first piece: the route can still answer with an error.
    upstream = StubUpstream(answer=ContextLengthExceeded("too long"))
    body = {**MESSAGE_BODY, "model": "up", "stream": True}
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(dispatch.answer_realtime_message(upstream, body))


def test_the_generated_result_is_kept_beside_the_body() -> None:
    answer = asyncio.run(dispatch.answer_realtime_openai(FakeEngine(), CHAT, CHAT_BODY))
    assert isinstance(answer, Rendered) and isinstance(answer.result, GenerationResult)
    assert answer.result.completion_tokens == answer.body["usage"]["completion_tokens"]
