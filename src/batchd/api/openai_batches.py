"""OpenAI Batch API: /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, run_blocking
from batchd.api.json_body import read_bytes, read_json
from batchd.api.responses import JSONResponse
from batchd.errors import InvalidRequest
from batchd.protocol.openai import objects as oa_objects
from batchd.service import batches, costs, estimates, idempotency, retry
from batchd.service.services import Services, wake_scheduler
from batchd.store.records import BatchRecord

router = APIRouter()

MAX_CREATE_BODY_BYTES = 1024 * 1024
SURFACE = batches.SURFACE


async def _json_body(request: Request) -> Any:
    return await read_json(request, MAX_CREATE_BODY_BYTES)


def _object(services: Services, record: BatchRecord) -> dict[str, Any]:
    """The batch object, with the ``batchd`` extension (cost and saving) the SDKs tolerate.
    Called inside ``run_blocking``: a batch of several models reads its usage per model."""
    body = oa_objects.batch_object(record)
    body["batchd"] = costs.batch_extension(services, record)
    return body


@router.post("/v1/batches", openapi_extra=openapi_schemas.CREATE_BATCH)
async def create_batch(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)
    body = await _json_body(request)
    answer = await run_blocking(
        services,
        lambda: _object(services, batches.create_openai_batch(services, tenant, body, key)),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer


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
    def read() -> dict[str, Any]:
        records, has_more = batches.list_batches(
            services, tenant, SURFACE, after=after, limit=limit
        )
        return oa_objects.list_object([_object(services, r) for r in records], has_more)

    return JSONResponse(await run_blocking(services, read, poll_read=True))


@router.get("/v1/batches/{batch_id}", response_model=dict[str, Any])
async def retrieve_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> JSONResponse:
    answer = await run_blocking(
        services,
        lambda: _object(
            services, batches.get_batch(services, tenant, batch_id, SURFACE, for_poller=True)
        ),
        poll_read=True,
    )
    return JSONResponse(answer)


_JSONL_TYPES = ("application/jsonl", "application/x-jsonl", "application/x-ndjson", "text/plain")


@router.post("/v1/batches/estimate", response_model=dict[str, Any])
async def estimate_batch(
    request: Request,
    tenant: Tenant,
    services: ServicesDep,
    endpoint: str = "/v1/chat/completions",
) -> JSONResponse:
    """batchd extension: what a batch file will cost and take, before it is submitted. The
    body is either the file's lines themselves (``content-type: application/jsonl``, the
    endpoint in the query) or JSON ``{"input_file_id", "endpoint"}`` naming an upload."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in _JSONL_TYPES:
        data = bytes(await read_bytes(request, services.settings.max_upload_bytes))
        answer = await run_blocking(services, lambda: estimates.estimate(services, data, endpoint))
        return JSONResponse(answer)
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
        raise InvalidRequest(
            "Send the batch file's lines (content-type: application/jsonl) or a JSON object"
            " with input_file_id.",
            param="input_file_id",
        )
    file_id = body["input_file_id"]
    chosen = body.get("endpoint", endpoint)
    if not isinstance(chosen, str):
        raise InvalidRequest("endpoint must be a string.", param="endpoint")
    answer = await run_blocking(
        services, lambda: estimates.estimate_file(services, tenant, file_id, chosen)
    )
    return JSONResponse(answer)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    answer = await run_blocking(
        services,
        lambda: _object(services, batches.cancel_batch(services, tenant, batch_id, SURFACE)),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer


@router.post("/v1/batches/{batch_id}/retry")
async def retry_batch(
    batch_id: str, request: Request, tenant: Tenant, services: ServicesDep
) -> dict[str, Any]:
    """batchd extension: a new batch of this ended batch's failed, expired and cancelled
    requests (their original input lines), its metadata naming it as ``retry_of``."""
    key = idempotency.key_of(request.headers)
    answer = await run_blocking(
        services,
        lambda: _object(services, retry.retry_batch(services, tenant, batch_id, key)),
    )
    wake_scheduler(services)  # on the loop: the wake-up is not thread-safe
    return answer
