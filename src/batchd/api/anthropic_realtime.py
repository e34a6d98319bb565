"""Realtime Anthropic Messages on the same engine: POST /v1/messages, plain or streamed (SSE).

Realtime requests carry ``Priority.REALTIME`` so the engine admits them ahead of batch work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batchd import ids
from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep
from batchd.api.json_body import read_json
from batchd.engines.base import Priority, StreamDelta
from batchd.errors import BatchdError
from batchd.protocol import anthropic as am
from batchd.scheduler.execute import resolve
from batchd.service.core import note_realtime

router = APIRouter()

MAX_MESSAGES_BODY_BYTES = 32 * 1024 * 1024  # Anthropic's Messages API limit
SERVICE_TIER = "standard"


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


async def _aclose(stream: AsyncIterator[StreamDelta]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def _events(
    model: str, first: StreamDelta, rest: AsyncIterator[StreamDelta]
) -> AsyncIterator[bytes]:
    message_id = ids.message_id()
    yield _event(
        "message_start",
        {
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
                    "service_tier": SERVICE_TIER,
                },
            },
        },
    )
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
                usage = am.usage_dict(delta.result, SERVICE_TIER)
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
        await _aclose(rest)


@router.post("/v1/messages", openapi_extra=openapi_schemas.CREATE_MESSAGE)
async def create_message(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    note_realtime(services)
    body = await read_json(request, MAX_MESSAGES_BODY_BYTES)
    params = am.parse_params(body, in_batch=False)
    engine = services.engine
    generation = resolve(engine, params.to_generation(Priority.REALTIME))
    if not params.stream:
        result = await engine.generate(generation)
        return am.message_body(params.model, result, service_tier=SERVICE_TIER)
    stream = engine.stream(generation)
    try:
        # Wait for the first piece before answering 200, so a request the engine refuses
        # (context too long, say) still gets a proper HTTP error rather than an error event.
        first = await anext(stream)
    except BaseException:
        await _aclose(stream)
        raise
    return StreamingResponse(
        _events(params.model, first, stream),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )
