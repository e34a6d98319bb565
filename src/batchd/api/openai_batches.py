"""OpenAI Batch API: /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, read
from batchd.api.json_body import read_json
from batchd.api.responses import JSONResponse
from batchd.protocol import openai as oa
from batchd.service import core as service
from batchd.service import idempotency

router = APIRouter()

MAX_CREATE_BODY_BYTES = 1024 * 1024


async def _json_body(request: Request) -> Any:
    return await read_json(request, MAX_CREATE_BODY_BYTES)


@router.post("/v1/batches", openapi_extra=openapi_schemas.CREATE_BATCH)
async def create_batch(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)
    body = await _json_body(request)
    record = idempotency.create_once(
        services.store,
        tenant=tenant,
        scope=idempotency.SCOPE_BATCHES,
        key=key,
        fingerprint=idempotency.fingerprint_json(body),
        create=lambda idempotency_key: service.create_openai_batch(
            services, tenant, body, idempotency_key
        ),
        fetch=lambda batch_id: service.get_batch(services, tenant, batch_id, "openai"),
    )
    return oa.batch_object(record)


# The polling routes: async, their store read through deps.read, and the body rendered by
# orjson straight from the dict (response_model keeps the OpenAPI schema what it was, without
# FastAPI validating and re-serializing a plain dict on every poll).
@router.get("/v1/batches", response_model=dict[str, Any])
async def list_batches(
    tenant: Tenant,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JSONResponse:
    records, has_more = await read(
        services,
        services.store.list_batches,
        tenant,
        "openai",
        after=after,
        limit=limit,
        stats_max_age=services.settings.batch_counts_max_age_seconds,
    )
    return JSONResponse(oa.list_object([oa.batch_object(r) for r in records], has_more))


@router.get("/v1/batches/{batch_id}", response_model=dict[str, Any])
async def retrieve_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> JSONResponse:
    record = await read(
        services, service.get_batch, services, tenant, batch_id, "openai", for_poller=True
    )
    return JSONResponse(oa.batch_object(record))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.batch_object(service.cancel_batch(services, tenant, batch_id, "openai"))
