"""OpenAI Batch API: /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from batchd import idempotency, service
from batchd.api import openapi_bodies
from batchd.api.auth import Tenant
from batchd.api.bodies import read_json
from batchd.api.deps import ServicesDep
from batchd.protocol import openai as oa

router = APIRouter()

MAX_CREATE_BODY_BYTES = 1024 * 1024


async def _json_body(request: Request) -> Any:
    return await read_json(request, MAX_CREATE_BODY_BYTES)


@router.post("/v1/batches", openapi_extra=openapi_bodies.CREATE_BATCH)
async def create_batch(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request)
    body = await _json_body(request)
    record = idempotency.create_once(
        services.store,
        tenant=tenant,
        scope=idempotency.SCOPE_BATCHES,
        key=key,
        fingerprint=idempotency.fingerprint_json(body),
        create=lambda: service.create_openai_batch(services, tenant, body),
        fetch=lambda batch_id: service.get_batch(services, tenant, batch_id, "openai"),
        object_id=lambda made: made.id,
    )
    return oa.batch_object(record)


@router.get("/v1/batches")
def list_batches(
    tenant: Tenant,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    records, has_more = services.store.list_batches(
        tenant,
        "openai",
        after=after,
        limit=limit,
        stats_max_age=services.settings.batch_counts_max_age_seconds,
    )
    return oa.list_object([oa.batch_object(r) for r in records], has_more)


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.batch_object(service.get_batch(services, tenant, batch_id, "openai", for_poller=True))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.batch_object(service.cancel_batch(services, tenant, batch_id, "openai"))
