"""Realtime OpenAI endpoints on the same engine: /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/responses, /v1/models.

The routes read the body and wrap what ``batchd.inference.dispatch`` answers in an HTTP
response; the dispatch does the rest (model, limits, upstream or engine, wire shape), exactly
as for batch rows but at ``Priority.REALTIME``. A model served by an upstream (``openai-http``)
engine is reverse-proxied: its status, body or SSE stream come back as they were sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant, authenticate
from batchd.api.deps import ServicesDep
from batchd.api.json_body import read_json
from batchd.api.keyring import KeyRing
from batchd.inference.dispatch import Relayed, Rendered, Streamed, answer_realtime_openai
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai import responses as oa_responses
from batchd.service.services import Services, note_realtime

router = APIRouter()

MAX_REALTIME_BODY_BYTES = 32 * 1024 * 1024


def _response(answer: Rendered | Relayed | Streamed) -> Any:
    if isinstance(answer, Rendered):
        return answer.body  # serialized by FastAPI, as every other route's dict
    if isinstance(answer, Relayed):
        upstream = answer.response
        return Response(upstream.body, upstream.status_code, media_type="application/json")
    return StreamingResponse(
        answer.chunks, media_type="text/event-stream", headers=answer.headers or None
    )


async def _handle(request: Request, endpoint: str, services: Services) -> Any:
    """A realtime request: noted first (the loop stops pacing at once), then answered at the
    service tier it asks for and its tenant may have."""
    note_realtime(services)
    body = await read_json(request, MAX_REALTIME_BODY_BYTES)
    keyring: KeyRing = request.app.state.keyring
    answer = await answer_realtime_openai(
        services.engine,
        endpoint,
        body,
        priority_allowed=keyring.priority_allowed(await authenticate(request)),
        flex_timeout=services.settings.flex_timeout_seconds,
        max_output_tokens=services.settings.realtime_max_tokens,
        max_context=services.settings.realtime_max_context_tokens,
    )
    return _response(answer)


@router.post("/v1/chat/completions", openapi_extra=openapi_schemas.CHAT_COMPLETION)
async def chat_completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, "/v1/chat/completions", services)


@router.post("/v1/completions", openapi_extra=openapi_schemas.COMPLETION)
async def completions(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, "/v1/completions", services)


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
    "An OpenAI embeddings request (the bundled all-minilm-l6-v2, or an upstream model).",
)


@router.post("/v1/embeddings", openapi_extra=_EMBEDDINGS_BODY)
async def embeddings(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, oa_bodies.EMBEDDINGS_ENDPOINT, services)


_RESPONSES_BODY = openapi_schemas.json_body(
    {
        "type": "object",
        "properties": {
            "model": {"type": "string", "examples": ["default"]},
            "input": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]
            },
            "instructions": {"type": "string"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "stream": {"type": "boolean"},
        },
        "required": ["model", "input"],
    },
    "An OpenAI Responses API request (text in, text out; nothing stored).",
)


@router.post("/v1/responses", openapi_extra=_RESPONSES_BODY)
async def responses(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    return await _handle(request, oa_responses.RESPONSES_ENDPOINT, services)


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
