"""OpenAI Batch API: /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, run_blocking
from batchd.api.json_body import read_json
from batchd.api.responses import JSONResponse
from batchd.protocol.openai import objects as oa_objects
from batchd.service import batches, idempotency
from batchd.service.services import wake_scheduler

router = APIRouter()

MAX_CREATE_BODY_BYTES = 1024 * 1024
SURFACE = batches.SURFACE


async def _json_body(request: Request) -> Any:
    return await read_json(request, MAX_CREATE_BODY_BYTES)


@router.post("/v1/batches", openapi_extra=openapi_schemas.CREATE_BATCH)
async def create_batch(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)
    body = await _json_body(request)
    record = await run_blocking(
        services, lambda: batches.create_openai_batch(services, tenant, body, key)
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return oa_objects.batch_object(record)


# The polling routes (api/poll_fast_path.py calls them too): their read through run_blocking
# as a poll read, and the body rendered by orjson straight from the dict (response_model keeps
# the OpenAPI schema what it was, without FastAPI validating and re-serializing a plain dict on
# every poll).
@router.get("/v1/batches", response_model=dict[str, Any])
async def list_batches(
    tenant: Tenant,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JSONResponse:
    records, has_more = await run_blocking(
        services,
        lambda: batches.list_batches(services, tenant, SURFACE, after=after, limit=limit),
        poll_read=True,
    )
    return JSONResponse(
        oa_objects.list_object([oa_objects.batch_object(r) for r in records], has_more)
    )


@router.get("/v1/batches/{batch_id}", response_model=dict[str, Any])
async def retrieve_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> JSONResponse:
    record = await run_blocking(
        services,
        lambda: batches.get_batch(services, tenant, batch_id, SURFACE, for_poller=True),
        poll_read=True,
    )
    return JSONResponse(oa_objects.batch_object(record))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    record = await run_blocking(
        services, lambda: batches.cancel_batch(services, tenant, batch_id, SURFACE)
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return oa_objects.batch_object(record)
