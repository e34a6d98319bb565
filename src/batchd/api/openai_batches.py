"""OpenAI Batch API: /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request

from batchd import service
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep
from batchd.errors import InvalidRequest
from batchd.protocol import openai as oa

router = APIRouter()

MAX_CREATE_BODY_BYTES = 1024 * 1024


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_CREATE_BODY_BYTES:
        raise InvalidRequest("The request body is too large.", param="body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", param="body") from None


@router.post("/v1/batches")
async def create_batch(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    body = await _json_body(request)
    return oa.batch_object(service.create_openai_batch(services, tenant, body))


@router.get("/v1/batches")
def list_batches(
    tenant: Tenant,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    records, has_more = services.store.list_batches(tenant, "openai", after=after, limit=limit)
    return oa.list_object([oa.batch_object(r) for r in records], has_more)


@router.get("/v1/batches/{batch_id}")
def retrieve_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.batch_object(service.get_batch(services, tenant, batch_id, "openai"))


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.batch_object(service.cancel_batch(services, tenant, batch_id, "openai"))
