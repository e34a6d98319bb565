"""File use cases: upload (checked, stored, registered once per Idempotency-Key), retrieve,
list, download and delete. Every function here is blocking (database and blob work): a route
runs it off the event loop (``api/deps.run_blocking``)."""

from __future__ import annotations

from collections.abc import Iterator

from batchd import failpoints, ids
from batchd.blobs.base import Writer
from batchd.clock import now
from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.protocol.openai import expiry
from batchd.service import idempotency
from batchd.service.services import Services
from batchd.store.records import FileRecord, IdempotencyKey

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
DEFAULT_FILENAME = "upload.jsonl"


def _checked_upload(purpose: str | None, filename: str | None, writer: Writer | None) -> str:
    """The upload's purpose, once the form is one this server stores; else the 400 that says
    what is wrong with it (in the order the checks have always been made)."""
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
    if writer is None:
        raise InvalidRequest(
            "Missing required parameter: 'file'.",
            param="file",
            code="missing_required_parameter",
        )
    if purpose == "batch" and not (filename or DEFAULT_FILENAME).lower().endswith(".jsonl"):
        raise InvalidRequest("Invalid file format for Batch API. Must be .jsonl", param="file")
    if writer.size == 0:
        raise InvalidRequest("The uploaded file is empty.", param="file", code="empty_file")
    return purpose


def display_name(filename: str | None) -> str:
    """The name kept for a client's file: only the last path component, and only as metadata.
    Control characters (NUL, newlines) go too: the name is echoed in headers and listings."""
    base_name = (filename or DEFAULT_FILENAME).replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c for c in base_name if c.isprintable())[:255] or DEFAULT_FILENAME


def store_upload(
    services: Services,
    tenant: str,
    *,
    purpose: str | None,
    filename: str | None,
    writer: Writer | None,
    idempotency_key: str | None = None,
    expires_after: object = None,
) -> FileRecord:
    """Check the uploaded form, commit its bytes (``writer``, written but not yet committed)
    and register the file, once per ``idempotency_key``. Whatever fails, no bytes are left
    behind that no row names; a repeat of an earlier upload keeps the first copy only.
    ``expires_after``: the form's expiration policy (``expiry.form_expires_after``)."""
    try:
        checked_purpose = _checked_upload(purpose, filename, writer)
        expires_seconds = expiry.parse_expires_after(
            expires_after,
            field="expires_after",
            min_seconds=services.settings.min_expires_after_seconds,
            form=True,
        )
        assert writer is not None  # _checked_upload refuses a form without a file
        size = writer.size
        digest = writer.sha256.hexdigest()
        blob = writer.commit()  # an fsync, or an upload to object storage
        failpoints.hit("upload.blob_committed")  # the bytes are stored, no row names them yet
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    name = display_name(filename)
    try:
        record = idempotency.create_once(
            services.store,
            tenant=tenant,
            scope=idempotency.SCOPE_FILES,
            key=idempotency_key,
            fingerprint=idempotency.fingerprint_upload(
                checked_purpose, name, digest, expires_seconds
            ),
            create=lambda key: register_upload(
                services,
                tenant,
                filename=name,
                purpose=checked_purpose,
                blob=blob,
                size=size,
                idempotency=key,
                expires_after_seconds=expires_seconds,
            ),
            fetch=lambda file_id: get_file(services, tenant, file_id),
        )
    except BaseException:
        services.blobs.delete(blob)  # nothing points at it
        raise
    if record.blob != blob:  # a repeat of an earlier upload: keep the first copy only
        services.blobs.delete(blob)
    return record


def register_upload(
    services: Services,
    tenant: str,
    *,
    filename: str,
    purpose: str,
    blob: str,
    size: int,
    idempotency: IdempotencyKey | None = None,
    expires_after_seconds: int | None = None,
) -> FileRecord:
    """The row of a file whose bytes are committed as ``blob``. It expires
    ``expires_after_seconds`` after upload when asked; else a ``batch`` file after the
    server's file retention, and a file of another purpose never."""
    created = now()
    if expires_after_seconds is not None:
        expires_at: int | None = created + expires_after_seconds
    elif purpose == "batch":
        expires_at = created + services.settings.file_retention_seconds
    else:
        expires_at = None
    record = FileRecord(
        id=ids.file_id(),
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=size,
        created_at=created,
        expires_at=expires_at,
        blob=blob,
    )
    services.store.create_file(record, idempotency)
    return record


def get_file(services: Services, tenant: str, file_id: str) -> FileRecord:
    record = services.store.get_file(tenant, file_id)
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return record


def list_files(
    services: Services,
    tenant: str,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    order: str,
) -> tuple[list[FileRecord], bool]:
    """A page of the tenant's files, and whether more follow."""
    return services.store.list_files(tenant, purpose=purpose, after=after, limit=limit, order=order)


def open_content(
    services: Services, tenant: str, file_id: str
) -> tuple[FileRecord, Iterator[bytes]]:
    """The file and its bytes, to stream (the iterator reads the blob as it is consumed)."""
    record = get_file(services, tenant, file_id)
    return record, services.blobs.iter_bytes(record.blob)


def delete_file(services: Services, tenant: str, file_id: str) -> FileRecord:
    validating = services.store.batch_validating_file(tenant, file_id)
    if validating is not None:
        # Its requests are not yet copied into rows: deleting the bytes now would fail the
        # batch. Validation takes seconds; the client can delete as soon as it has ended.
        raise Conflict(
            f"File {file_id} is being validated as the input of batch {validating}; delete it"
            " once that batch has left the 'validating' status.",
            param="file_id",
            code="file_in_use",
        )
    record = services.store.delete_file(tenant, file_id)
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    # Rows of running batches hold their own copy of each body, so the bytes can go now.
    services.blobs.delete(record.blob)
    return record
