"""Turning an uploaded file into request rows: validate (pass one), then insert (pass two).

Both passes stream the file. Rows are inserted in chunks, each its own short transaction, so
the scheduler's result commits are never blocked for long; the batch only becomes
``in_progress`` (and so leasable) after the last chunk. A crash mid-way leaves the batch in
``validating``; on restart its partial rows are deleted and validation runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from batchd.blobs.base import BlobStore
from batchd.config import Settings
from batchd.protocol import batch_file as ingest
from batchd.store.records import BatchStatus
from batchd.store.store import Store

log = logging.getLogger(__name__)

INSERT_CHUNK_ROWS = 2000


def validate_batch(
    store: Store,
    blobs: BlobStore,
    settings: Settings,
    batch_id: str,
    owner: str = "local",
    resolve_model: Callable[[str], str | None] | None = None,
) -> BatchStatus:
    """Validate the batch's file into rows. ``resolve_model`` (the engine's): the batch's
    ``model`` names the served ids the file's models and aliases stand for."""
    batch = store.get_batch(batch_id)
    if batch is None or batch.status != BatchStatus.VALIDATING:
        return batch.status if batch else BatchStatus.FAILED
    claim_seconds = max(settings.lease_seconds, 30)
    if not store.claim_validation(batch_id, owner, claim_seconds):
        return BatchStatus.VALIDATING  # another worker is validating it
    store.delete_requests(batch_id)  # leftovers of an interrupted earlier attempt
    file = store.get_file(batch.tenant, batch.input_file_id or "")
    if file is None:
        errors = [
            ingest.LineError(
                "invalid_request", "The input file no longer exists.", None, "input_file_id"
            ).to_wire()
        ]
        store.transition(
            batch_id,
            [BatchStatus.VALIDATING],
            BatchStatus.FAILED,
            claimed_by=owner,
            errors=_json(errors),
        )
        return BatchStatus.FAILED

    with blobs.open(file.blob) as stream:
        report = ingest.validate(
            stream,
            batch.endpoint,
            max_lines=settings.max_batch_lines,
            max_line_bytes=settings.max_line_bytes,
            max_errors=settings.max_validation_errors,
            max_depth=settings.max_json_depth,
        )
    if report.ok:
        queue_error = _queue_limit_error(store, settings, batch.tenant, report.request_count)
        if queue_error is not None:
            report.errors.append(queue_error)
    if not report.ok:
        errors = [e.to_wire() for e in report.errors]
        store.transition(
            batch_id,
            [BatchStatus.VALIDATING],
            BatchStatus.FAILED,
            claimed_by=owner,
            errors=_json(errors),
        )
        log.info(
            "batch failed validation",
            extra={"action": "batch_failed", "batch_id": batch_id, "errors": len(errors)},
        )
        return BatchStatus.FAILED

    with blobs.open(file.blob) as stream:
        chunk: list[ingest.RequestLine] = []
        for line in ingest.iter_requests(
            stream, batch.endpoint, max_line_bytes=settings.max_line_bytes
        ):
            chunk.append(line)
            if len(chunk) >= INSERT_CHUNK_ROWS:
                if not store.insert_requests(batch_id, chunk, claim=(owner, claim_seconds)):
                    return _stopped_mid_insert(store, batch_id)
                chunk = []
        if not store.insert_requests(batch_id, chunk, claim=(owner, claim_seconds)):
            return _stopped_mid_insert(store, batch_id)
    model = batch_model(report.models, resolve_model)
    if not store.transition(
        batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS, claimed_by=owner, model=model
    ):
        # Cancelled while validating: the rows exist, the scheduler will end them.
        return store.get_batch(batch_id).status  # type: ignore[union-attr]
    log.info(
        "batch validated",
        extra={"action": "batch_validated", "batch_id": batch_id, "requests": report.request_count},
    )
    return BatchStatus.IN_PROGRESS


def batch_model(
    names: list[str], resolve_model: Callable[[str], str | None] | None = None
) -> str | None:
    """The batch's ``model``: the served model id the file's lines name (an alias resolved);
    for a file naming several, their ids joined by commas in first-use order (at most 8). A
    name no model serves is kept as written: its lines will answer 404."""
    served: dict[str, None] = {}
    for name in names:
        served.setdefault((resolve_model(name) if resolve_model else None) or name)
    return ",".join(list(served)[:8]) or None


def _stopped_mid_insert(store: Store, batch_id: str) -> BatchStatus:
    """Our inserts were refused half-way. Either our claim lapsed and another worker took the
    validation over (it deletes our rows and starts again), or the batch was cancelled: then
    the rows inserted so far go, and it ends as one cancelled before validation did, with no
    requests, rather than answering some of its lines and silently dropping the rest."""
    batch = store.get_batch(batch_id)
    if batch is None:
        return BatchStatus.FAILED
    if batch.status != BatchStatus.VALIDATING:
        store.delete_requests(batch_id)
    return batch.status


def _queue_limit_error(
    store: Store, settings: Settings, tenant: str, request_count: int
) -> ingest.LineError | None:
    """The batch error when this batch's requests would take the tenant past its queued
    requests limit. An OpenAI batch was admitted at create before its size was known; now it
    is. This batch's own rows were deleted above, so the count is everyone else's.

    Within one process validations run one after another, each seeing the rows of the one
    before; two processes validating one tenant's batches at the same moment can each pass
    (the create-time check is the atomic one)."""
    limit = settings.max_queued_requests_per_tenant
    _, queued = store.tenant_load(tenant)
    if queued + request_count <= limit:
        return None
    return ingest.LineError(
        "queued_request_limit_exceeded",
        f"Enqueued request limit reached: this batch has {request_count} requests and this key"
        f" already has {queued} requests waiting or running, {queued + request_count} in all;"
        f" the limit is {limit} queued requests per key (max_queued_requests_per_tenant)."
        " Submit it again once some in-progress batches have ended.",
        None,
        "max_queued_requests_per_tenant",
    )


def _json(value: object) -> str:
    return orjson.dumps(value).decode()
