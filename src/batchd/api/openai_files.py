"""OpenAI Files API: /v1/files."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from batchd import failpoints
from batchd.api import openapi_schemas
from batchd.api.auth import Tenant
from batchd.api.deps import ServicesDep
from batchd.api.multipart_upload import parse_upload
from batchd.errors import InvalidRequest
from batchd.protocol import openai as oa
from batchd.service import core as service
from batchd.service import idempotency

router = APIRouter()

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


@router.post("/v1/files", openapi_extra=openapi_schemas.upload_body(UPLOAD_PURPOSES))
async def upload_file(request: Request, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    key = idempotency.key_of(request.headers)  # a bad header is refused before the upload is read
    upload = await parse_upload(request, services.blobs, services.settings.max_upload_bytes)
    try:
        purpose = upload.fields.get("purpose")
        if not purpose:
            raise InvalidRequest(
                "Missing required parameter: 'purpose'.",
                param="purpose",
                code="missing_required_parameter",
            )
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"Invalid purpose {purpose[:64]!r}: expected one of {', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
            )
        if upload.blob is None:
            raise InvalidRequest(
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        filename = upload.filename or "upload.jsonl"
        if purpose == "batch" and not filename.lower().endswith(".jsonl"):
            raise InvalidRequest("Invalid file format for Batch API. Must be .jsonl", param="file")
        if upload.blob.size == 0:
            raise InvalidRequest("The uploaded file is empty.", param="file", code="empty_file")
        size = upload.blob.size
        digest = upload.blob.sha256.hexdigest()
        # Off the event loop: an fsync, or an upload to object storage.
        blob = await asyncio.to_thread(upload.blob.commit)
        failpoints.hit("upload.blob_committed")  # the bytes are stored, no row names them yet
    except BaseException:
        upload.abort()
        raise
    # Only the last path component of the client's name is kept, and only as metadata.
    # Control characters (NUL, newlines) go too: the name is echoed in headers and listings.
    base_name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    display_name = "".join(c for c in base_name if c.isprintable())[:255] or "upload.jsonl"
    try:
        record = idempotency.create_once(
            services.store,
            tenant=tenant,
            scope=idempotency.SCOPE_FILES,
            key=key,
            fingerprint=idempotency.fingerprint_upload(purpose, display_name, digest),
            create=lambda idempotency_key: service.register_upload(
                services,
                tenant,
                filename=display_name,
                purpose=purpose,
                blob=blob,
                size=size,
                idempotency=idempotency_key,
            ),
            fetch=lambda file_id: service.get_file(services, tenant, file_id),
        )
    except BaseException:
        services.blobs.delete(blob)  # nothing points at it
        raise
    if record.blob != blob:  # a repeat of an earlier upload: keep the first copy only
        services.blobs.delete(blob)
    return oa.file_object(record)


@router.get("/v1/files")
def list_files(
    tenant: Tenant,
    services: ServicesDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    records, has_more = services.store.list_files(
        tenant, purpose=purpose, after=after, limit=limit, order=order
    )
    return oa.list_object([oa.file_object(r) for r in records], has_more)


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    return oa.file_object(service.get_file(services, tenant, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, tenant: Tenant, services: ServicesDep) -> StreamingResponse:
    record = service.get_file(services, tenant, file_id)
    return StreamingResponse(
        services.blobs.iter_bytes(record.blob),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": f'attachment; filename="{record.id}.jsonl"',
        },
    )


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, tenant: Tenant, services: ServicesDep) -> dict[str, Any]:
    record = service.delete_file(services, tenant, file_id)
    return {"id": record.id, "object": "file", "deleted": True}
