"""Assembling a finished batch's output and error files, exactly once.

Rows are streamed in input order; each ``custom_id`` lands in exactly one of the two files.
The blobs are written first; the batch's final transition and the file rows are then committed
in one transaction whose UPDATE names the batch's current status. If another finalizer won,
that UPDATE changes nothing and our blobs are deleted.
"""

from __future__ import annotations

import logging

import orjson

from batchd import failpoints, ids
from batchd.blobs.base import BlobStore, Writer
from batchd.clock import now
from batchd.store.records import BatchRecord, BatchStatus, FileRecord, RequestState
from batchd.store.store import Store

log = logging.getLogger(__name__)

OUTPUT_FILE_RETENTION_SECONDS = 30 * 24 * 3600

NOT_EXECUTED = {
    RequestState.CANCELED: (
        "batch_cancelled",
        "This request was not executed because the batch was cancelled.",
    ),
    RequestState.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
}


def _output_line(custom_id: str, status_code: int, body: bytes) -> bytes:
    # The stored body is already JSON: splice it in rather than parse and re-serialize it.
    return b"".join(
        (
            b'{"id":',
            orjson.dumps(ids.batch_request_id()),
            b',"custom_id":',
            orjson.dumps(custom_id),
            b',"response":{"status_code":',
            str(status_code).encode(),
            b',"request_id":',
            orjson.dumps(ids.request_id()),
            b',"body":',
            body,
            b'},"error":null}\n',
        )
    )


def _not_executed_line(custom_id: str, state: RequestState) -> bytes:
    code, message = NOT_EXECUTED[state]
    return (
        orjson.dumps(
            {
                "id": ids.batch_request_id(),
                "custom_id": custom_id,
                "response": None,
                "error": {"code": code, "message": message},
            }
        )
        + b"\n"
    )


def final_status(batch: BatchRecord) -> BatchStatus:
    if batch.status == BatchStatus.CANCELLING:
        return BatchStatus.CANCELLED
    if batch.counts.expired:
        return BatchStatus.EXPIRED
    return BatchStatus.COMPLETED


def finalize_batch(
    store: Store,
    blobs: BlobStore,
    batch_id: str,
    file_retention_seconds: int = OUTPUT_FILE_RETENTION_SECONDS,
) -> BatchStatus | None:
    """Write the result files (kept the batch's ``output_expires_after``, else
    ``file_retention_seconds``) and end the batch. Returns the
    final status, or None if the batch was not ready, another worker is finalizing it, or
    another finalizer committed first."""
    with store.finalize_lock(batch_id) as ours:
        return _finalize(store, blobs, batch_id, file_retention_seconds) if ours else None


def _finalize(
    store: Store, blobs: BlobStore, batch_id: str, retention_seconds: int
) -> BatchStatus | None:
    batch = store.get_batch(batch_id)
    if batch is None or batch.status.terminal or batch.counts.unfinished:
        return None
    target = final_status(batch)
    if batch.output_expires_after is not None:
        retention_seconds = batch.output_expires_after
    if batch.surface == "anthropic":
        # Anthropic results are streamed from the rows on request: no files, just the end.
        if not store.finalize(batch_id, [batch.status], target, [], None, None):
            return None
        log.info(
            "batch finalized",
            extra={"action": "batch_finalized", "batch_id": batch_id, "status": target.value},
        )
        return target
    from_status = batch.status
    if target == BatchStatus.COMPLETED and batch.status == BatchStatus.IN_PROGRESS:
        if not store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING):
            return None
        from_status = BatchStatus.FINALIZING

    output, errors = blobs.new_writer(), blobs.new_writer()
    try:
        for row in store.iter_finished(batch_id):
            if row.state == RequestState.SUCCEEDED:
                output.write(
                    _output_line(row.custom_id, row.status_code or 200, row.result or b"{}")
                )
            elif row.state == RequestState.ERRORED:
                errors.write(
                    _output_line(row.custom_id, row.status_code or 500, row.result or b"{}")
                )
            else:
                errors.write(_not_executed_line(row.custom_id, row.state))
        files = [
            _commit(writer, batch, kind, retention_seconds)
            for writer, kind in ((output, "output"), (errors, "error"))
        ]
    except BaseException:
        output.abort()
        errors.abort()
        raise
    new_files = [f for f in files if f is not None]
    failpoints.hit("finalize.before_commit")  # the files are written, the batch not yet ended
    ok = store.finalize(
        batch_id,
        [from_status],
        target,
        new_files,
        output_file_id=files[0].id if files[0] else None,
        error_file_id=files[1].id if files[1] else None,
    )
    if not ok:
        for record in new_files:
            blobs.delete(record.blob)
        return None
    log.info(
        "batch finalized",
        extra={"action": "batch_finalized", "batch_id": batch_id, "status": target.value},
    )
    return target


def _commit(
    writer: Writer, batch: BatchRecord, kind: str, retention_seconds: int
) -> FileRecord | None:
    if writer.size == 0:
        writer.abort()  # upstream: no file (null id) when there are no such lines
        return None
    size = writer.size
    blob = writer.commit()
    created = now()
    return FileRecord(
        id=ids.file_id(),
        tenant=batch.tenant,
        filename=f"{batch.id}_{kind}.jsonl",
        purpose="batch_output",
        bytes=size,
        created_at=created,
        expires_at=created + retention_seconds,
        blob=blob,
    )
