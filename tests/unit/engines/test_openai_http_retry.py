"""The openai-http engine's retry loop against ``httpx.MockTransport``: no model, no real
upstream, and a fake clock whose sleep advances time at once, so backoff and Retry-After are
measured exactly and without waiting. tests/e2e/test_upstream.py checks the same rules end
to end against a real upstream behind a fault proxy."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from batchd.engines.base import (
    ChatMessage,
    ForwardRequest,
    GenerationRequest,
    Priority,
    RetryLater,
    SamplingParams,
)
from batchd.engines.openai_http.engine import OpenAIHttpEngine
from batchd.engines.openai_http.retry import RetryPolicy
from batchd.engines.openai_http.timing import Clock
from batchd.engines.registry import OpenAIHttpModel
from batchd.errors import UpstreamError

T = TypeVar("T")
MODEL = "up"
BASE_URL = "http://upstream.test/v1"
CHAT = "/v1/chat/completions"
POLICY = RetryPolicy(batch_hold_seconds=15.0, realtime_retry_seconds=20.0)


class FakeClock:
    """Wall and monotonic time in one fake second count; ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def clock(self) -> Clock:
        return Clock(wall=self.time, monotonic=self.time, sleep=self.sleep)


Reply = httpx.Response | Exception


@dataclass
class Upstream:
    """Answers each request with the next reply of ``script`` (the last one repeats) and
    notes when, by the fake clock, each request arrived."""

    clock: FakeClock
    script: list[Reply]
    arrivals: list[float] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.arrivals.append(self.clock.now)
        reply = self.script[min(len(self.arrivals), len(self.script)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.arrivals)]


def completion(text: str = "hello", usage: tuple[int, int] = (5, 1)) -> httpx.Response:
    body = {
        "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
    }
    return httpx.Response(200, content=orjson.dumps(body))


def error(status: int, message: str, **headers: str) -> httpx.Response:
    body = orjson.dumps({"error": {"message": message, "type": "test", "param": None}})
    return httpx.Response(status, content=body, headers=headers)


def engine_for(
    upstream: Upstream | None, *, base_url: str = BASE_URL, **config: Any
) -> OpenAIHttpEngine:
    model = OpenAIHttpModel(engine="openai-http", base_url=base_url, **config)
    clock = upstream.clock if upstream is not None else FakeClock()
    transport = httpx.MockTransport(upstream.handle) if upstream is not None else None
    return OpenAIHttpEngine(
        MODEL, model, api_key=None, policy=POLICY, clock=clock.clock(), transport=transport
    )


def run(engine: OpenAIHttpEngine, work: Callable[[], Awaitable[T]]) -> T:
    async def scenario() -> T:
        await engine.start()
        try:
            return await work()
        finally:
            await engine.close()

    return asyncio.run(scenario())


def chat(priority: Priority = Priority.REALTIME) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        params=SamplingParams(max_tokens=4),
        messages=(ChatMessage("user", "Say hi."),),
        priority=priority,
    )


def forward(body: dict[str, Any], priority: Priority = Priority.REALTIME) -> ForwardRequest:
    return ForwardRequest(MODEL, CHAT, body, priority)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()


def test_a_429_then_a_200_succeeds_after_one_retry(clock: FakeClock) -> None:
    upstream = Upstream(clock, [error(429, "slow down"), completion("hi there")])
    engine = engine_for(upstream)
    result = run(engine, lambda: engine.generate(chat()))
    assert result.text == "hi there" and result.attempts == 2
    assert len(upstream.arrivals) == 2
    # Jittered exponential backoff after the first failure: 1 s plus up to 1 s.
    assert 1.0 <= upstream.gaps()[0] <= 2.0


@pytest.mark.parametrize("seconds", [1, 7])
def test_retry_after_spaces_the_next_attempt(clock: FakeClock, seconds: int) -> None:
    # 7 s is beyond what the first backoff could be (at most 2 s): the header decides.
    upstream = Upstream(clock, [error(429, "later", **{"retry-after": str(seconds)}), completion()])
    engine = engine_for(upstream)
    result = run(engine, lambda: engine.generate(chat(Priority.BATCH)))
    assert result.attempts == 2
    assert upstream.gaps()[0] == pytest.approx(seconds)


def test_5xx_backs_off_then_gives_up_with_the_last_status_and_body(clock: FakeClock) -> None:
    upstream = Upstream(clock, [error(500, f"failure {i}") for i in range(1, 50)])
    engine = engine_for(upstream)
    with pytest.raises(UpstreamError) as excinfo:
        run(engine, lambda: engine.generate(chat()))
    calls = len(upstream.arrivals)
    assert excinfo.value.status_code == 500
    assert excinfo.value.attempts == calls
    assert excinfo.value.body == error(500, f"failure {calls}").content  # the last answer
    assert f"failure {calls}" in excinfo.value.message
    # Exponential: about 1-2 s, 2-3 s, 4-5 s, ...; all within the realtime window.
    gaps = upstream.gaps()
    assert calls >= 4, gaps
    assert 1.0 <= gaps[0] <= 2.0 and gaps[1] >= 2.0 and gaps[2] >= 4.0, gaps
    assert upstream.arrivals[-1] - upstream.arrivals[0] <= POLICY.realtime_retry_seconds
    # Pass-through: the same verdict, as the upstream sent it, not raised.
    upstream.arrivals.clear()
    engine = engine_for(upstream)
    answer = run(engine, lambda: engine.forward(forward({"messages": []})))
    assert answer.status_code == 500 and answer.attempts == len(upstream.arrivals) >= 4
    assert answer.body == error(500, f"failure {len(upstream.arrivals)}").content


def test_5xx_for_batch_work_yields_its_slot_after_the_hold(clock: FakeClock) -> None:
    upstream = Upstream(clock, [error(503, "busy")])
    engine = engine_for(upstream)
    started = clock.now
    with pytest.raises(RetryLater) as excinfo:
        run(engine, lambda: engine.generate(chat(Priority.BATCH)))
    assert excinfo.value.attempts == len(upstream.arrivals) >= 3
    assert clock.now - started <= POLICY.batch_hold_seconds + 0.01
    assert engine.pool.slots.free == 16 and engine.retries.outstanding == 0


@pytest.mark.parametrize("status", [400, 404, 408, 409])
def test_other_4xx_are_final_after_one_attempt(clock: FakeClock, status: int) -> None:
    # A retry would reach the completion after the two refusals.
    refusal = error(status, "your request")
    upstream = Upstream(clock, [refusal, refusal, completion()])
    engine = engine_for(upstream)
    with pytest.raises(UpstreamError) as excinfo:
        run(engine, lambda: engine.generate(chat(Priority.BATCH)))
    assert excinfo.value.status_code == status and excinfo.value.attempts == 1
    assert excinfo.value.body == refusal.content
    assert len(upstream.arrivals) == 1 and clock.slept == []
    engine = engine_for(upstream)
    answer = run(engine, lambda: engine.forward(forward({"messages": []})))
    assert answer.status_code == status and answer.attempts == 1
    assert answer.body == refusal.content
    assert len(upstream.arrivals) == 2  # one more request, never retried


def test_a_transport_error_is_retried(clock: FakeClock) -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    upstream = Upstream(clock, [refused, completion("made it")])
    engine = engine_for(upstream)
    result = run(engine, lambda: engine.generate(chat()))
    assert result.text == "made it" and result.attempts == 2


def test_an_upstream_refusing_connections_is_retried_until_the_window_ends() -> None:
    # A real socket: a port nobody listens on refuses at once; the fake clock skips the waits.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    engine = engine_for(None, base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamError) as excinfo:
        run(engine, lambda: engine.generate(chat()))
    assert excinfo.value.status_code == 502 and excinfo.value.code == "upstream_unavailable"
    assert "could not be reached" in excinfo.value.message


def sse(*events: dict[str, Any]) -> bytes:
    lines = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("reported", [True, False])
def test_a_streams_reported_usage_settles_the_token_budget(
    clock: FakeClock, reported: bool
) -> None:
    chunk = {"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 700, "completion_tokens": 100}}
    body = sse(chunk, usage) if reported else sse(chunk)
    upstream = Upstream(clock, [httpx.Response(200, content=body)])
    engine = engine_for(upstream, tokens_per_minute=1000)
    bucket = engine.pool.urls[0].tokens
    assert bucket is not None

    async def stream_all() -> tuple[bytes, bool]:
        answer = await engine.forward_stream(
            forward({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        )
        relayed = b"".join([piece async for piece in answer.chunks])
        return relayed, bucket.has_capacity(300)  # read on the loop the bucket runs on

    relayed, room_for_300 = run(engine, stream_all)
    assert relayed == body
    # Charged a small estimate (characters / 4 + max_tokens) before sending; settled to the
    # 800 tokens the stream reported, which leaves less than 300 of the minute's 1000.
    assert room_for_300 is not reported
    assert engine.pool.slots.free == 16  # the stream gave its slot back when it ended
