"""Generated streams as SSE bytes: OpenAI's chunk objects, the Responses API's and
Anthropic's named events.

Only for engines that generate here; an upstream's stream is relayed as it was sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from batchd import ids
from batchd.engines.base import Engine, GenerationRequest, StreamDelta
from batchd.errors import BatchdError, InvalidRequest
from batchd.protocol import anthropic as am
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai import responses as oa_responses
from batchd.protocol.openai import results as oa_results

CHAT_ENDPOINT = "/v1/chat/completions"


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def aclose(stream: AsyncIterator[Any]) -> None:
    """Close an engine's stream early, so the engine drops the sequence (see engines.base)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def openai_chunks(
    engine: Engine,
    endpoint: str,
    parsed: oa_bodies.ChatCompletionRequest | oa_bodies.CompletionRequest,
    generation: GenerationRequest,
    service_tier: str = "default",
) -> AsyncIterator[bytes]:
    """A chat.completion.chunk (or text_completion) stream, ending with ``[DONE]``."""
    chat = endpoint == CHAT_ENDPOINT
    response_id = ids.chat_completion_id() if chat else ids.completion_id()
    created = int(time.time())
    include_usage = bool((getattr(parsed, "stream_options", None) or {}).get("include_usage"))
    base = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": generation.model,  # the served id the body's model (or alias) resolved to
        "system_fingerprint": oa_bodies.SYSTEM_FINGERPRINT,
    }
    if chat:
        base["service_tier"] = service_tier

    def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta_text is not None:
                delta["content"] = delta_text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None}
        choice["finish_reason"] = finish
        return {**base, "choices": [choice]}

    if chat:
        yield _data(chunk(None, None, first=True))
    try:
        async for delta in engine.stream(generation):
            if delta.text:
                yield _data(chunk(delta.text, None))
            if delta.result is not None:
                yield _data(chunk(None if chat else "", delta.result.finish_reason))
                if include_usage:
                    yield _data(
                        {**base, "choices": [], "usage": oa_results.usage_dict(delta.result)}
                    )
    except InvalidRequest as exc:
        # The 200 has been sent: a refusal found while generating goes in the stream.
        yield _data(oa_results.error_body(exc.message, param=exc.param, code=exc.code))
    yield b"data: [DONE]\n\n"


def _message_start(message_id: str, model: str, service_tier: str) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The engine reports prompt tokens with the final result; message_delta
            # carries the real counts (the SDK takes them from there).
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 0,
                    "ephemeral_1h_input_tokens": 0,
                },
                "server_tool_use": None,
                "service_tier": service_tier,
            },
        },
    }


async def anthropic_events(
    model: str, service_tier: str, first: StreamDelta, rest: AsyncIterator[StreamDelta]
) -> AsyncIterator[bytes]:
    """A Messages event stream from the engine's first piece (already received) and the rest;
    closes ``rest`` however it ends."""
    yield _event("message_start", _message_start(ids.message_id(), model, service_tier))
    yield _event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    yield _event("ping", {"type": "ping"})
    delta: StreamDelta | None = first
    try:
        while delta is not None:
            if delta.text:
                yield _event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": delta.text},
                    },
                )
            if delta.result is not None:
                usage = am.usage_dict(delta.result, service_tier)
                yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield _event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": am.stop_reason(delta.result),
                            "stop_sequence": delta.result.stop_sequence,
                        },
                        "usage": {
                            "input_tokens": usage["input_tokens"],
                            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                            "cache_read_input_tokens": usage["cache_read_input_tokens"],
                            "output_tokens": usage["output_tokens"],
                        },
                    },
                )
                yield _event("message_stop", {"type": "message_stop"})
                return
            delta = await anext(rest, None)
    except BatchdError as exc:
        # The response has started; Anthropic reports a late failure as an error event.
        yield _event("error", am.error_body(exc.anthropic_type, exc.message, ids.request_id()))
    finally:
        await aclose(rest)


async def responses_events(
    parsed: oa_responses.ResponsesRequest,
    model: str,
    first: StreamDelta,
    rest: AsyncIterator[StreamDelta],
    service_tier: str = "default",
) -> AsyncIterator[bytes]:
    """A Responses API event stream (``response.created`` ... ``response.completed`` or
    ``response.incomplete``) from the engine's first piece (already received) and the rest;
    closes ``rest`` however it ends."""
    response_id, item_id = ids.response_id(), ids.response_item_id()
    created_at = int(time.time())
    sequence = 0

    def event(payload: dict[str, Any]) -> bytes:
        nonlocal sequence
        payload["sequence_number"] = sequence
        sequence += 1
        return _event(payload["type"], payload)

    def response(**kwargs: Any) -> dict[str, Any]:
        return oa_responses.response_object(
            parsed, model, response_id, created_at, service_tier=service_tier, **kwargs
        )

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event({"type": "response.created", "response": response()})
    yield event({"type": "response.in_progress", "response": response()})
    yield event(
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": oa_responses.output_message(item_id, "in_progress", None),
        }
    )
    yield event(
        {"type": "response.content_part.added", **where, "part": oa_responses.output_text("")}
    )
    pieces: list[str] = []
    delta: StreamDelta | None = first
    try:
        while delta is not None:
            if delta.text:
                pieces.append(delta.text)
                yield event(
                    {
                        "type": "response.output_text.delta",
                        **where,
                        "delta": delta.text,
                        "logprobs": [],
                    }
                )
            if delta.result is not None:
                text = "".join(pieces)
                result = delta.result
                status = "incomplete" if result.finish_reason == "length" else "completed"
                item = oa_responses.output_message(item_id, status, text)
                yield event(
                    {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
                )
                yield event(
                    {
                        "type": "response.content_part.done",
                        **where,
                        "part": oa_responses.output_text(text),
                    }
                )
                yield event({"type": "response.output_item.done", "output_index": 0, "item": item})
                yield event(
                    {
                        "type": f"response.{status}",
                        "response": response(output=[item], result=result),
                    }
                )
                return
            delta = await anext(rest, None)
    except BatchdError as exc:
        # The 200 has been sent: a failure while generating is an error event.
        yield event({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
    finally:
        await aclose(rest)
