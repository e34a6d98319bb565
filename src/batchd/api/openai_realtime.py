"""Realtime OpenAI endpoints on the same engine: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/models.

Realtime requests carry ``Priority.REALTIME`` so the engine admits them ahead of batch work.
A model served by an upstream (``openai-http``) engine is reverse-proxied: the body goes up
unchanged but for ``model``, under the same limits as batch work, and the upstream's status,
body or SSE stream come back as they were sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from batchd import ids
from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep
from batchd.api.json_body import read_json
from batchd.engines.base import (
    Engine,
    ForwardRequest,
    GenerationRequest,
    PassthroughEngine,
    Priority,
    passthrough_engine,
)
from batchd.errors import InvalidRequest, ModelNotFound
from batchd.protocol import openai as oa
from batchd.scheduler.execute import resolve
from batchd.service.core import note_realtime

router = APIRouter()

MAX_REALTIME_BODY_BYTES = 32 * 1024 * 1024


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


async def _proxy(
    upstream: PassthroughEngine, served: str, endpoint: str, body: dict[str, Any]
) -> Response:
    forwarded = ForwardRequest(served, endpoint, body, Priority.REALTIME)
    if body.get("stream") is True:
        answer = await upstream.forward_stream(forwarded)
        if answer.status_code != 200:
            content = b"".join([chunk async for chunk in answer.chunks])
            return Response(content, answer.status_code, media_type="application/json")
        return StreamingResponse(
            answer.chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
    response = await upstream.forward(forwarded)
    return Response(response.body, response.status_code, media_type="application/json")


async def _handle(request: Request, endpoint: str, engine: Engine) -> Any:
    body = await read_json(request, MAX_REALTIME_BODY_BYTES)
    checked = oa.check_body(endpoint, body)
    served = engine.resolve_model(checked.model)
    upstream = passthrough_engine(engine, served) if served is not None else None
    if served is not None and upstream is not None:
        return await _proxy(upstream, served, endpoint, body)
    if served is None:
        raise ModelNotFound(checked.model)
    parsed = oa.parse_body(endpoint, body)
    generation = resolve(engine, parsed.to_generation(Priority.REALTIME))
    if parsed.stream:
        return StreamingResponse(
            _stream(endpoint, parsed, generation, engine), media_type="text/event-stream"
        )
    result = await engine.generate(generation)
    return oa.response_body(endpoint, parsed.model, result)


@router.post("/v1/chat/completions", openapi_extra=openapi_schemas.CHAT_COMPLETION)
async def chat_completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    note_realtime(services)
    return await _handle(request, "/v1/chat/completions", services.engine)


@router.post("/v1/completions", openapi_extra=openapi_schemas.COMPLETION)
async def completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    note_realtime(services)
    return await _handle(request, "/v1/completions", services.engine)


_EMBEDDINGS_BODY = openapi_schemas.json_body(
    {
        "type": "object",
        "properties": {
            "model": {"type": "string", "examples": ["default"]},
            "input": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
            },
            "encoding_format": {"enum": ["float", "base64"]},
            "dimensions": {"type": "integer", "minimum": 1},
        },
        "required": ["model", "input"],
    },
    "An OpenAI embeddings request (served by upstream models only).",
)


@router.post("/v1/embeddings", openapi_extra=_EMBEDDINGS_BODY)
async def embeddings(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    note_realtime(services)
    return await _handle(request, oa.EMBEDDINGS_ENDPOINT, services.engine)


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
                    "engine": info.kind or services.engine.kind,  # batchd extension
                    "context_length": info.context_length,  # batchd extension
                }
            )
    return {"object": "list", "data": data}
