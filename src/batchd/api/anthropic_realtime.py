"""Realtime Anthropic Messages on the same engine: POST /v1/messages, plain or streamed (SSE).

The route reads the body and wraps what ``batchd.inference.dispatch`` answers in an HTTP
response; the dispatch runs it exactly as a batch's message but at ``Priority.REALTIME``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep
from batchd.api.json_body import read_json
from batchd.inference.dispatch import Rendered, answer_realtime_message
from batchd.service.services import note_realtime

router = APIRouter()

MAX_MESSAGES_BODY_BYTES = 32 * 1024 * 1024  # Anthropic's Messages API limit


@router.post("/v1/messages", openapi_extra=openapi_schemas.CREATE_MESSAGE)
async def create_message(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    note_realtime(services)
    body = await read_json(request, MAX_MESSAGES_BODY_BYTES)
    answer = await answer_realtime_message(
        services.engine,
        body,
        services.settings.realtime_max_tokens,
        services.settings.realtime_max_context_tokens,
    )
    if isinstance(answer, Rendered):
        return answer.body  # serialized by FastAPI, as every other route's dict
    return StreamingResponse(answer.chunks, media_type="text/event-stream", headers=answer.headers)
