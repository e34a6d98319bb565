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
from batchd.service import batches, costs, idempotency, message_batches, retry
from batchd.service.services import Services, wake_scheduler
from batchd.store.records import BatchRecord

router = APIRouter()

SURFACE = message_batches.SURFACE


def _base_url(request: Request, services: Services) -> str:
    return services.settings.public_url or str(request.base_url)


def _object(services: Services, record: BatchRecord, base_url: str) -> dict[str, Any]:
    """The message batch object, with the ``batchd`` extension (usage, cost and saving) the
    SDKs tolerate. Called inside ``run_blocking``: a batch of several models reads its usage
    per model."""
    body = am.message_batch_object(record, base_url)
    body["batchd"] = costs.batch_extension(services, record)
    return body


@router.post("/v1/messages/batches", openapi_extra=openapi_schemas.CREATE_MESSAGE_BATCH)
async def create_message_batch(
    request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)
    body = await read_json(request, services.settings.anthropic_max_body_bytes)
    base_url = _base_url(request, services)
    answer = await run_blocking(
        services,
        lambda: _object(
            services, message_batches.create_message_batch(services, tenant, body, key), base_url
        ),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer


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
    base_url = _base_url(request, services)

    def read() -> dict[str, Any]:
        records, has_more = batches.list_batches(
            services, tenant, SURFACE, after=after_id, before=before_id, limit=limit
        )
        return am.list_object([_object(services, r, base_url) for r in records], has_more)

    return JSONResponse(await run_blocking(services, read, poll_read=True))


@router.get("/v1/messages/batches/{message_batch_id}", response_model=dict[str, Any])
async def retrieve_message_batch(
    message_batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> JSONResponse:
    base_url = _base_url(request, services)
    answer = await run_blocking(
        services,
        lambda: _object(
            services,
            batches.get_batch(services, tenant, message_batch_id, SURFACE, for_poller=True),
            base_url,
        ),
        poll_read=True,
    )
    return JSONResponse(answer)


@router.post("/v1/messages/batches/{message_batch_id}/cancel")
async def cancel_message_batch(
    message_batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    base_url = _base_url(request, services)
    answer = await run_blocking(
        services,
        lambda: _object(
            services,
            message_batches.cancel_message_batch(services, tenant, message_batch_id),
            base_url,
        ),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer


@router.post("/v1/messages/batches/{message_batch_id}/retry")
async def retry_message_batch(
    message_batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    """batchd extension: a new message batch of this ended batch's errored, expired and
    canceled requests (their stored params)."""
    key = idempotency.key_of(request.headers)
    base_url = _base_url(request, services)
    answer = await run_blocking(
        services,
        lambda: _object(
            services,
            retry.retry_message_batch(services, tenant, message_batch_id, key),
            base_url,
        ),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer


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
