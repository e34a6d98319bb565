"""OpenAI Files API: /v1/files."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep, run_blocking
from batchd.api.multipart_upload import parse_upload
from batchd.protocol.openai import expiry
from batchd.protocol.openai import objects as oa_objects
from batchd.service import files, idempotency

router = APIRouter()


@router.post("/v1/files", openapi_extra=openapi_schemas.upload_body(files.UPLOAD_PURPOSES))
async def upload_file(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)  # a bad header is refused before the upload is read
    upload = await parse_upload(request, services.blobs, services.settings.max_upload_bytes)
    try:
        record = await run_blocking(
            services,
            lambda: files.store_upload(
                services,
                tenant,
                purpose=upload.fields.get("purpose"),
                filename=upload.filename,
                writer=upload.blob,
                idempotency_key=key,
                expires_after=expiry.form_expires_after(upload.fields),
            ),
        )
    except BaseException:
        # Cancelled before a thread took the upload on: its bytes must not stay behind.
        # (Once store_upload has run, it has dropped them itself; aborting twice is a no-op.)
        upload.abort()
        raise
    return oa_objects.file_object(record)


@router.get("/v1/files")
async def list_files(
    tenant: Tenant,
    services: ServicesDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    records, has_more = await run_blocking(
        services,
        lambda: files.list_files(
            services, tenant, purpose=purpose, after=after, limit=limit, order=order
        ),
    )
    return oa_objects.list_object([oa_objects.file_object(r) for r in records], has_more)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    record = await run_blocking(services, lambda: files.get_file(services, tenant, file_id))
    return oa_objects.file_object(record)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, tenant: Tenant, services: ServicesDep) -> StreamingResponse:
    record, chunks = await run_blocking(
        services, lambda: files.open_content(services, tenant, file_id)
    )
    # Starlette reads a plain iterator in its thread pool, chunk by chunk.
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": f'attachment; filename="{record.id}.jsonl"',
        },
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    record = await run_blocking(services, lambda: files.delete_file(services, tenant, file_id))
    return {"id": record.id, "object": "file", "deleted": True}
