"""Realtime OpenAI endpoints on the same engine: /v1/chat/completions, /v1/completions.

Realtime requests carry ``Priority.REALTIME`` so the engine admits them ahead of batch work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batchd import ids
from batchd.api import openapi_bodies
from batchd.api.auth import Tenant
from batchd.api.bodies import check_depth, depth_limit
from batchd.api.deps import ServicesDep
from batchd.engines.base import Engine, GenerationRequest, Priority
from batchd.errors import InvalidRequest
from batchd.protocol import openai as oa
from batchd.scheduler.execute import resolve

router = APIRouter()

MAX_REALTIME_BODY_BYTES = 32 * 1024 * 1024


async def _parse(request: Request, endpoint: str, engine: Engine) -> tuple[Any, GenerationRequest]:
    raw = await request.body()
    if len(raw) > MAX_REALTIME_BODY_BYTES:
        raise InvalidRequest("The request body is too large.", param="body")
    try:
        body = check_depth(orjson.loads(raw), depth_limit(request))
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", param="body") from None
    parsed = oa.parse_body(endpoint, body)
    generation = parsed.to_generation(Priority.REALTIME)
    return parsed, resolve(engine, generation)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    endpoint: str, parsed: Any, generation: GenerationRequest, engine: Engine
) -> AsyncIterator[bytes]:
    chat = endpoint == "/v1/chat/completions"
    response_id = ids.chat_completion_id() if chat else ids.completion_id()
    created = int(time.time())
    include_usage = bool((getattr(parsed, "stream_options", None) or {}).get("include_usage"))
    base = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": parsed.model,
        "system_fingerprint": oa.SYSTEM_FINGERPRINT,
    }

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
        yield _sse(chunk(None, None, first=True))
    try:
        async for delta in engine.stream(generation):
            if delta.text:
                yield _sse(chunk(delta.text, None))
            if delta.result is not None:
                yield _sse(chunk(None if chat else "", delta.result.finish_reason))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": oa.usage_dict(delta.result)})
    except InvalidRequest as exc:
        yield _sse(oa.error_body(exc.message, param=exc.param, code=exc.code))
    yield b"data: [DONE]\n\n"


async def _handle(request: Request, endpoint: str, engine: Engine) -> Any:
    parsed, generation = await _parse(request, endpoint, engine)
    if parsed.stream:
        return StreamingResponse(
            _stream(endpoint, parsed, generation, engine), media_type="text/event-stream"
        )
    result = await engine.generate(generation)
    return oa.response_body(endpoint, parsed.model, result)


@router.post("/v1/chat/completions", openapi_extra=openapi_bodies.CHAT_COMPLETION)
async def chat_completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, "/v1/chat/completions", services.engine)


@router.post("/v1/completions", openapi_extra=openapi_bodies.COMPLETION)
async def completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, "/v1/completions", services.engine)


@router.get("/v1/models")
def list_models(tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    data = []
    for info in services.engine.models():
        for name in (info.id, *info.aliases):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "batchd",
                    "engine": services.engine.kind,  # batchd extension
                    "context_length": info.context_length,  # batchd extension
                }
            )
    return {"object": "list", "data": data}
