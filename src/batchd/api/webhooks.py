"""Webhook endpoints, per tenant: /v1/webhook_endpoints. OpenAI-shaped (errors too); the
events they receive cover both surfaces' batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, run_blocking
from batchd.api.json_body import read_json
from batchd.service import webhooks

router = APIRouter()

MAX_BODY_BYTES = 64 * 1024


@router.post("/v1/webhook_endpoints")
async def create_endpoint(request: Request, tenant: Tenant, services: ServicesDep) -> Any:
    body = await read_json(request, MAX_BODY_BYTES)
    return await run_blocking(services, lambda: webhooks.create_endpoint(services, tenant, body))


@router.get("/v1/webhook_endpoints")
async def list_endpoints(
    tenant: Tenant,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    return await run_blocking(
        services, lambda: webhooks.list_endpoints(services, tenant, after, limit)
    )


@router.get("/v1/webhook_endpoints/{endpoint_id}")
async def retrieve_endpoint(
    endpoint_id: str, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    row = await run_blocking(services, lambda: webhooks.get_endpoint(services, tenant, endpoint_id))
    return webhooks.endpoint_object(row)  # the secret is shown at creation only


@router.post("/v1/webhook_endpoints/{endpoint_id}")
async def update_endpoint(
    endpoint_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    body = await read_json(request, MAX_BODY_BYTES)
    return await run_blocking(
        services, lambda: webhooks.update_endpoint(services, tenant, endpoint_id, body)
    )


@router.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret")
async def rotate_secret(endpoint_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return await run_blocking(
        services, lambda: webhooks.rotate_secret(services, tenant, endpoint_id)
    )


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
async def delete_endpoint(
    endpoint_id: str, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    return await run_blocking(
        services, lambda: webhooks.delete_endpoint(services, tenant, endpoint_id)
    )


@router.post("/v1/webhook_endpoints/{endpoint_id}/test")
async def test_endpoint(
    endpoint_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    body = await read_json(request, MAX_BODY_BYTES) if await request.body() else {}
    return await webhooks.send_test(services, tenant, endpoint_id, body)


@router.get("/v1/webhook_endpoints/{endpoint_id}/deliveries")
async def endpoint_deliveries(
    endpoint_id: str, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    return await run_blocking(
        services, lambda: webhooks.list_deliveries(services, tenant, endpoint_id)
    )
