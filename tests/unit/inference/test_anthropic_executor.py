"""The Anthropic batch executor on the fake engine (instant, no model) and on a stub upstream:
the stored message, and errors in Anthropic's shape and types."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from batchd.engines.base import GenerationResult, Priority, RetryLater
from batchd.engines.fake import FakeEngine
from batchd.errors import UpstreamError
from batchd.inference.executors.base import RunContext
from batchd.inference.executors.registry import execute
from batchd.protocol.anthropic import MESSAGES_ENDPOINT
from batchd.store.records import RequestOutcome, RequestState
from tests.unit.inference.stubs import UPSTREAM_MODEL, StubUpstream


def params(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "default",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "a b"}],
    }
    return {**body, **overrides}


def run(body: dict[str, Any], engine: Any = None, context: RunContext | None = None) -> Any:
    engine = engine if engine is not None else FakeEngine()
    return asyncio.run(execute(engine, MESSAGES_ENDPOINT, orjson.dumps(body), context))


def error_of(outcome: RequestOutcome) -> dict[str, Any]:
    assert outcome.state is RequestState.ERRORED
    body: dict[str, Any] = orjson.loads(outcome.result)
    assert body["type"] == "error" and body["request_id"] is None
    error: dict[str, Any] = body["error"]
    return error


def test_a_message_is_rendered_for_the_batch_tier() -> None:
    outcome = run(params(system="be brief"))
    assert (outcome.state, outcome.status_code) == (RequestState.SUCCEEDED, 200)
    message = orjson.loads(outcome.result)
    assert message["id"].startswith("msg_")
    assert {k: v for k, v in message.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "model": "fake-echo",  # the served id the alias "default" stands for
        "content": [{"type": "text", "text": "echo:a echo:b"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2,
            # The end-of-turn token counts as Anthropic counts it.
            "output_tokens": 3,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": None,
            "service_tier": "batch",
        },
    }
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.upstream_attempts) == (
        2,
        3,
        0,
    )


def test_max_tokens_reached_is_the_max_tokens_stop_reason() -> None:
    message = orjson.loads(run(params(max_tokens=1)).result)
    assert (message["stop_reason"], message["usage"]["output_tokens"]) == ("max_tokens", 1)


@pytest.mark.parametrize(
    ("body", "status", "type_", "message"),
    [
        (
            params(model="nope"),
            404,
            "not_found_error",
            "The model 'nope' does not exist or you do not have access to it.",
        ),
        (
            params(max_tokens=10**9),
            400,
            "invalid_request_error",
            "max_tokens is 1000000000, but this model's context is 4096 tokens in all"
            " (prompt and completion).",
        ),
        (
            params(stream=True),
            400,
            "invalid_request_error",
            "stream: streaming is not supported inside a batch.",
        ),
        (params(temperature=3), 400, "invalid_request_error", None),
    ],
)
def test_errors_are_anthropic_errors(
    body: dict[str, Any], status: int, type_: str, message: str | None
) -> None:
    outcome = run(body)
    error = error_of(outcome)
    assert (outcome.status_code, error["type"]) == (status, type_)
    if message is not None:
        assert error["message"] == message


def test_an_upstream_model_counts_its_attempts() -> None:
    result = GenerationResult("hi", "stop", prompt_tokens=4, completion_tokens=1, attempts=2)
    upstream = StubUpstream(answer=result)
    outcome = run(
        params(model="up"), engine=upstream, context=RunContext(deadline=7.0, prior_attempts=1)
    )
    (generated,) = upstream.generated
    assert (generated.model, generated.priority, generated.deadline) == (
        UPSTREAM_MODEL,
        Priority.BATCH,
        7.0,
    )
    assert (outcome.state, outcome.upstream_attempts) == (RequestState.SUCCEEDED, 3)


def test_an_upstream_final_error_keeps_its_status_and_attempts() -> None:
    body = b'{"error": {"message": "slow down", "type": "x"}}'
    upstream = StubUpstream(answer=UpstreamError(529, body, attempts=3))
    outcome = run(params(model="up"), engine=upstream, context=RunContext(prior_attempts=2))
    error = error_of(outcome)
    assert (outcome.status_code, outcome.upstream_attempts) == (529, 5)
    assert error == {
        "type": "overloaded_error",
        "message": "The upstream server answered 529: slow down",
    }


def test_retry_later_goes_through_with_every_attempt_counted() -> None:
    upstream = StubUpstream(answer=RetryLater(1, "unreachable"))
    with pytest.raises(RetryLater) as excinfo:
        run(params(model="up"), engine=upstream, context=RunContext(prior_attempts=4))
    assert excinfo.value.attempts == 5
