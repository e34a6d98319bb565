"""The OpenAI batch executor on the fake engine (instant, no model) and on a stub upstream:
wire shapes, errored outcomes, and what an upstream's answer becomes."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from batchd.engines.base import ForwardResponse, Priority, RetryLater
from batchd.engines.fake import FAKE_MODEL, FakeEngine
from batchd.inference.executors.base import RunContext
from batchd.inference.executors.registry import EXECUTORS, execute
from batchd.protocol import anthropic as am
from batchd.protocol.openai import bodies as oa_bodies
from batchd.store.records import RequestOutcome, RequestState
from tests.unit.inference.stubs import UPSTREAM_MODEL, StubUpstream

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def run(
    body: dict[str, Any],
    endpoint: str = CHAT,
    engine: Any = None,
    context: RunContext | None = None,
) -> RequestOutcome:
    engine = engine if engine is not None else FakeEngine()
    return asyncio.run(execute(engine, endpoint, orjson.dumps(body), context))


def error_of(outcome: RequestOutcome) -> dict[str, Any]:
    assert outcome.state is RequestState.ERRORED
    error: dict[str, Any] = orjson.loads(outcome.result)["error"]
    return error


def test_the_table_covers_every_batch_endpoint() -> None:
    assert set(EXECUTORS) == {*oa_bodies.SUPPORTED_BATCH_ENDPOINTS, am.MESSAGES_ENDPOINT}


def test_chat_completion_wire_shape() -> None:
    outcome = run({"model": "default", "messages": [{"role": "user", "content": "a b c"}]})
    assert (outcome.state, outcome.status_code) == (RequestState.SUCCEEDED, 200)
    body = orjson.loads(outcome.result)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-echo"  # the served id, not the alias asked for
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "echo:a echo:b echo:c",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == 6
    assert body["system_fingerprint"] == oa_bodies.SYSTEM_FINGERPRINT
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.upstream_attempts) == (
        3,
        3,
        0,
    )


def test_completion_wire_shape_and_length_finish() -> None:
    outcome = run({"model": FAKE_MODEL, "prompt": "one two three", "max_tokens": 2}, COMPLETIONS)
    body = orjson.loads(outcome.result)
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == FAKE_MODEL
    assert body["choices"] == [
        {"text": "echo:one echo:two", "index": 0, "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"]["completion_tokens"] == 2
    assert outcome.completion_tokens == 2


def test_unknown_model_is_a_404_outcome() -> None:
    outcome = run({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert outcome.status_code == 404
    assert error_of(outcome) == {
        "message": "The model 'nope' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_unknown_model_is_a_404_before_what_the_engine_would_refuse() -> None:
    outcome = run({"model": "nope", "input": "x"}, oa_bodies.EMBEDDINGS_ENDPOINT)
    assert (outcome.status_code, error_of(outcome)["code"]) == (404, "model_not_found")
    outcome = run({"model": "nope", "messages": [{"role": "user", "content": "x"}], "n": 2})
    assert (outcome.status_code, error_of(outcome)["code"]) == (404, "model_not_found")


def test_max_tokens_beyond_the_context_is_a_400_outcome() -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4096}
    outcome = run(body)
    assert outcome.status_code == 400
    error = error_of(outcome)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert "4096 tokens" in error["message"]


def test_embeddings_on_a_generating_engine_is_a_400_outcome() -> None:
    outcome = run({"model": "default", "input": "x"}, oa_bodies.EMBEDDINGS_ENDPOINT)
    assert (outcome.status_code, error_of(outcome)["code"]) == (400, "unsupported_endpoint")


def test_an_unsupported_endpoint_is_a_400_outcome() -> None:
    outcome = run({"model": "default"}, "/v1/moderations")
    assert outcome.status_code == 400
    assert error_of(outcome)["message"] == "Endpoint /v1/moderations is not supported."


def test_an_errored_outcome_keeps_the_attempts_of_earlier_leases() -> None:
    outcome = run({"model": "nope", "messages": []}, context=RunContext(prior_attempts=2))
    assert (outcome.status_code, outcome.upstream_attempts) == (400, 2)


# ------------------------------------------------------------------ upstream


def test_an_upstream_gets_the_body_verbatim_and_its_answer_is_the_outcome() -> None:
    answer = b'{"id": "x",\n "usage": {}}'
    upstream = StubUpstream(answer=ForwardResponse(200, answer, 2, prompt_tokens=5))
    body = {"model": "up", "messages": [{"role": "user", "content": "x"}], "n": 3}
    outcome = run(body, engine=upstream, context=RunContext(deadline=99.0, prior_attempts=1))
    (forwarded,) = upstream.forwarded
    assert (forwarded.model, forwarded.endpoint, forwarded.body) == (UPSTREAM_MODEL, CHAT, body)
    assert (forwarded.priority, forwarded.deadline) == (Priority.BATCH, 99.0)
    assert outcome.state is RequestState.SUCCEEDED
    assert outcome.result == b'{"id":"x","usage":{}}'  # one JSONL-safe line
    assert (outcome.prompt_tokens, outcome.upstream_attempts) == (5, 3)


def test_an_upstream_error_answer_is_an_errored_outcome_without_tokens() -> None:
    upstream = StubUpstream(answer=ForwardResponse(503, b"<html>down</html>", 4, prompt_tokens=5))
    outcome = run({"model": "up", "input": "x"}, oa_bodies.EMBEDDINGS_ENDPOINT, engine=upstream)
    assert (outcome.status_code, outcome.prompt_tokens, outcome.upstream_attempts) == (503, 0, 4)
    error = error_of(outcome)
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    assert error["message"].endswith("with a body that is not JSON: <html>down</html>")


def test_retry_later_goes_through_with_every_attempt_counted() -> None:
    upstream = StubUpstream(answer=RetryLater(2, "upstream 503"))
    body = {"model": "up", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(RetryLater) as excinfo:
        run(body, engine=upstream, context=RunContext(prior_attempts=3))
    assert excinfo.value.attempts == 5
