"""Responses API requests through the one inference path, on the fake engine and a stub
upstream: realtime and batch give the same ``response``; the stream's events are the SDK's,
in order; an upstream model gets the request as a generation (sent on as a chat completion)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from batchd.engines.base import ForwardResponse, GenerationResult, Priority
from batchd.engines.fake import FakeEngine
from batchd.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from batchd.inference import dispatch
from batchd.inference.dispatch import Rendered, Streamed
from batchd.inference.executors.base import RunContext
from batchd.inference.executors.registry import execute
from batchd.store.records import RequestState
from tests.support.helpers import assert_responses_stream_order
from tests.unit.inference.stubs import UPSTREAM_MODEL, StubUpstream
from tests.unit.inference.test_dispatch import collect, sse_data, without

RESPONSES = "/v1/responses"
BODY: dict[str, Any] = {"model": "default", "input": "one two three", "max_output_tokens": 8}
EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def test_realtime_and_batch_give_the_same_response() -> None:
    engine = FakeEngine()
    realtime = asyncio.run(dispatch.answer_realtime_openai(engine, RESPONSES, BODY))
    assert isinstance(realtime, Rendered)
    outcome = asyncio.run(execute(engine, RESPONSES, orjson.dumps(BODY)))
    assert outcome.state is RequestState.SUCCEEDED and outcome.status_code == 200
    stored = orjson.loads(outcome.result)
    assert realtime.body["id"] != stored["id"]
    volatile = ("id", "created_at", "completed_at", "output")
    assert without(realtime.body, *volatile) == without(stored, *volatile)
    response = Response.model_validate(stored)
    assert response.output_text == "echo:one echo:two echo:three"
    assert response.status == "completed"
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (
        stored["usage"]["input_tokens"],
        stored["usage"]["output_tokens"],
    )


def test_a_response_cut_by_max_output_tokens_is_incomplete() -> None:
    body = {**BODY, "max_output_tokens": 2}
    answer = asyncio.run(dispatch.answer_realtime_openai(FakeEngine(), RESPONSES, body))
    assert isinstance(answer, Rendered)
    assert answer.body["status"] == "incomplete"
    assert answer.body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert answer.body["output"][0]["status"] == "incomplete"


def test_refusals_are_raised_realtime_and_errored_lines_in_a_batch() -> None:
    engine = FakeEngine()
    with pytest.raises(ModelNotFound):
        asyncio.run(dispatch.answer_realtime_openai(engine, RESPONSES, {**BODY, "model": "x"}))
    with pytest.raises(ContextLengthExceeded):
        body = {**BODY, "max_output_tokens": 10**9}
        asyncio.run(dispatch.answer_realtime_openai(engine, RESPONSES, body))
    with pytest.raises(InvalidRequest) as excinfo:
        asyncio.run(dispatch.answer_realtime_openai(engine, RESPONSES, {**BODY, "tools": [{}]}))
    assert excinfo.value.param == "tools"
    outcome = asyncio.run(
        execute(engine, RESPONSES, orjson.dumps({**BODY, "previous_response_id": "resp_1"}))
    )
    assert (outcome.state, outcome.status_code) == (RequestState.ERRORED, 400)
    assert orjson.loads(outcome.result)["error"]["param"] == "previous_response_id"


def test_a_realtime_response_has_realtime_priority() -> None:
    plan = dispatch.plan_openai(FakeEngine(), RESPONSES, BODY, Priority.REALTIME)
    assert isinstance(plan, dispatch.Generate)
    assert (plan.request.priority, plan.request.model) == (Priority.REALTIME, "fake-echo")
    batch = dispatch.plan_openai(FakeEngine(), RESPONSES, BODY, Priority.BATCH, 123.0)
    assert (batch.request.priority, batch.request.deadline) == (Priority.BATCH, 123.0)


def test_the_stream_is_the_sdks_events_in_order() -> None:
    engine = FakeEngine()

    async def answer_and_read() -> tuple[Streamed, list[bytes]]:
        answer = await dispatch.answer_realtime_openai(engine, RESPONSES, {**BODY, "stream": True})
        assert isinstance(answer, Streamed)
        return answer, await collect(answer.chunks)

    answer, chunks = asyncio.run(answer_and_read())
    assert answer.headers == {"cache-control": "no-cache"}
    events = [EVENTS.validate_python(e) for e in sse_data(chunks)]
    names = [chunk.split(b"\n")[0].removeprefix(b"event: ").decode() for chunk in chunks]
    assert names == [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert_responses_stream_order(types)
    assert types[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1]
    assert final.type == "response.completed"
    assert "".join(deltas) == final.response.output_text == "echo:one echo:two echo:three"
    lifecycle = ("response.created", "response.in_progress", "response.completed")
    assert {e.response.id for e in events if e.type in lifecycle} == {final.response.id}
    assert final.response.usage is not None and final.response.usage.output_tokens == 3


def test_a_stream_cut_short_ends_incomplete() -> None:
    async def read() -> list[bytes]:
        body = {**BODY, "stream": True, "max_output_tokens": 1}
        answer = await dispatch.answer_realtime_openai(FakeEngine(), RESPONSES, body)
        assert isinstance(answer, Streamed)
        return await collect(answer.chunks)

    last = sse_data(asyncio.run(read()))[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_an_upstream_model_gets_a_generation_not_the_responses_body() -> None:
    result = GenerationResult("hello", "stop", prompt_tokens=3, completion_tokens=1, attempts=2)
    upstream = StubUpstream(answer=result)
    body = {"model": "up", "input": "hi", "instructions": "Be brief."}
    outcome = asyncio.run(
        execute(upstream, RESPONSES, orjson.dumps(body), RunContext(prior_attempts=1))
    )
    assert outcome.state is RequestState.SUCCEEDED and upstream.forwarded == []
    (generated,) = upstream.generated
    assert generated.model == UPSTREAM_MODEL
    assert [(m.role, m.content) for m in generated.messages or ()] == [
        ("system", "Be brief."),
        ("user", "hi"),
    ]
    assert Response.model_validate(orjson.loads(outcome.result)).output_text == "hello"
    assert outcome.upstream_attempts == 3


def test_the_sdks_stream_helper_accumulates_the_final_response() -> None:
    async def read() -> list[bytes]:
        answer = await dispatch.answer_realtime_openai(
            FakeEngine(), RESPONSES, {**BODY, "stream": True}
        )
        assert isinstance(answer, Streamed)
        return await collect(answer.chunks)

    state: ResponseStreamState[object] = ResponseStreamState(input_tools=omit, text_format=omit)
    handled = [
        h
        for e in sse_data(asyncio.run(read()))
        for h in state.handle_event(EVENTS.validate_python(e))
    ]
    snapshots = [h.snapshot for h in handled if h.type == "response.output_text.delta"]
    assert snapshots[-1] == "echo:one echo:two echo:three"
    completed = handled[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "echo:one echo:two echo:three"


def test_an_upstream_with_native_responses_gets_the_body_as_it_is() -> None:
    upstream_body = {
        "id": "resp_up",
        "object": "response",
        "model": UPSTREAM_MODEL,
        "usage": {
            "input_tokens": 7,
            "output_tokens": 3,
            "input_tokens_details": {"cached_tokens": 2},
        },
    }
    answer = ForwardResponse(200, orjson.dumps(upstream_body), 2, 7, 3, 2)
    upstream = StubUpstream(answer=answer, native_responses=True)
    # Fields our own Responses rules refuse are the upstream's to judge.
    body = {"model": "up", "input": "hi", "tools": [{"type": "web_search"}]}
    outcome = asyncio.run(execute(upstream, RESPONSES, orjson.dumps(body), RunContext()))
    assert upstream.generated == []
    (forwarded,) = upstream.forwarded
    assert (forwarded.endpoint, forwarded.model, forwarded.body) == (
        RESPONSES,
        UPSTREAM_MODEL,
        body,
    )
    assert outcome.state is RequestState.SUCCEEDED
    assert orjson.loads(outcome.result) == upstream_body
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens) == (7, 3, 2)
    assert outcome.upstream_attempts == 2
    # Types are still ours to check, and a realtime stream is relayed.
    with pytest.raises(InvalidRequest) as excinfo:
        dispatch.plan_openai(upstream, RESPONSES, {**body, "max_output_tokens": 0}, Priority.BATCH)
    assert excinfo.value.param == "max_output_tokens"
    plan = dispatch.plan_openai(upstream, RESPONSES, {**body, "stream": True}, Priority.REALTIME)
    assert isinstance(plan, dispatch.Forward) and plan.stream
