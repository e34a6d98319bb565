"""Anthropic Message Batches API: /v1/messages/batches.

Errors on these paths take Anthropic's shape (``api/errors.py`` keys on the path). The same
API keys and tenant isolation as the OpenAI surface apply; ``anthropic-version`` and
``anthropic-beta`` are accepted and need no handling.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, run_blocking
from batchd.api.json_body import read_json
from batchd.api.responses import JSONResponse
from batchd.errors import InvalidRequest
from batchd.protocol import anthropic as am
from batchd.service import batches, idempotency, message_batches
from batchd.service.services import Services, wake_scheduler

router = APIRouter()

SURFACE = message_batches.SURFACE


def _base_url(request: Request, services: Services) -> str:
    return services.settings.public_url or str(request.base_url)


@router.post("/v1/messages/batches", openapi_extra=openapi_schemas.CREATE_MESSAGE_BATCH)
async def create_message_batch(
    request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)
    body = await read_json(request, services.settings.anthropic_max_body_bytes)
    record = await run_blocking(
        services, lambda: message_batches.create_message_batch(services, tenant, body, key)
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return am.message_batch_object(record, _base_url(request, services))


# The polling routes: as in openai_batches (poll reads, orjson, the schema kept).
@router.get("/v1/messages/batches", response_model=dict[str, Any])
async def list_message_batches(
    request: Request,
    tenant: Tenant,
    services: ServicesDep,
    before_id: str | None = None,
    after_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> JSONResponse:
    if before_id and after_id:
        raise InvalidRequest("Only one of before_id and after_id may be given.", param="before_id")
    records, has_more = await run_blocking(
        services,
        lambda: batches.list_batches(
            services, tenant, SURFACE, after=after_id, before=before_id, limit=limit
        ),
        poll_read=True,
    )
    base_url = _base_url(request, services)
    return JSONResponse(
        am.list_object([am.message_batch_object(r, base_url) for r in records], has_more)
    )


@router.get("/v1/messages/batches/{message_batch_id}", response_model=dict[str, Any])
async def retrieve_message_batch(
    message_batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> JSONResponse:
    record = await run_blocking(
        services,
        lambda: batches.get_batch(services, tenant, message_batch_id, SURFACE, for_poller=True),
        poll_read=True,
    )
    return JSONResponse(am.message_batch_object(record, _base_url(request, services)))


@router.post("/v1/messages/batches/{message_batch_id}/cancel")
async def cancel_message_batch(
    message_batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    record = await run_blocking(
        services, lambda: message_batches.cancel_message_batch(services, tenant, message_batch_id)
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return am.message_batch_object(record, _base_url(request, services))


@router.delete("/v1/messages/batches/{message_batch_id}")
async def delete_message_batch(
    message_batch_id: str, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    await run_blocking(
        services, lambda: message_batches.delete_message_batch(services, tenant, message_batch_id)
    )
    return am.deleted_object(message_batch_id)


@router.get("/v1/messages/batches/{message_batch_id}/results")
async def message_batch_results(
    message_batch_id: str, tenant: Tenant, services: ServicesDep
) -> StreamingResponse:
    record = await run_blocking(
        services, lambda: message_batches.results_batch(services, tenant, message_batch_id)
    )
    # Starlette reads a plain iterator in its thread pool, chunk by chunk.
    return StreamingResponse(
        message_batches.iter_results(services, record.id),
        media_type="application/x-jsonl",
        headers={"content-disposition": f'attachment; filename="{record.id}_results.jsonl"'},
    )
