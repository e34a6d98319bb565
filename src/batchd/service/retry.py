"""Retrying a batch's failed requests: a new batch holding exactly the requests of an ended
batch that errored, expired or were cancelled, on the same surface, endpoint and window, its
metadata naming the batch it retries (``retry_of``). The two batches' results together then
answer every ``custom_id`` once: the first batch's successes plus the retry's answers.

OpenAI: the new batch's input file holds the original input file's lines themselves, taken
by the line numbers the rows were validated with, and is uploaded and created through the
same use cases a client's upload and create go through. Anthropic: the rows' stored
``params`` are the input, created through the message batch create.

Both are blocking (database and blob work): a route runs them off the event loop
(``api/deps.run_blocking``) and wakes the scheduler afterwards.

An ``Idempotency-Key`` makes a retry happen once: the content a retry derives never changes
(an ended batch's rows are final, blobs never change), so the key's repeats find the upload
and the create the first attempt made, scope by scope. What they cannot find is an input the
first attempt could still read and retention has since removed: such a repeat is answered
like a first attempt would be now.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import IO, Any

import orjson

from batchd.blobs.base import Writer
from batchd.errors import BatchdError, InvalidRequest
from batchd.protocol import anthropic as am

# The validator's own line reader: the line numbers the rows carry are the ones it counts
# (1-based, every b"\n" a line end, blank lines counted, a leading BOM dropped).
from batchd.protocol.batch_file import _read_lines
from batchd.protocol.openai import expiry
from batchd.protocol.openai import objects as oa_objects
from batchd.service import batches, files, message_batches
from batchd.service.services import Services
from batchd.store.records import BatchRecord

RETRY_OF = "retry_of"
WRITE_CHUNK_BYTES = 1024 * 1024


def retry_filename(batch_id: str) -> str:
    return f"retry-of-{batch_id}.jsonl"


def _require_ended(record: BatchRecord, message: str, param: str) -> None:
    """A batch still running has nothing final to retry yet: a 400 saying so."""
    if not record.status.terminal:
        raise InvalidRequest(message, param=param)


def retry_batch(
    services: Services, tenant: str, batch_id: str, idempotency_key: str | None = None
) -> BatchRecord:
    """A new OpenAI batch of the ended batch's errored, expired and cancelled lines, in
    ``validating``. Wake the scheduler afterwards."""
    record = batches.get_batch(services, tenant, batch_id, batches.SURFACE)
    _require_ended(
        record,
        f"Batch {batch_id} is still {record.status.value}; only a batch that has ended"
        " (completed, expired or cancelled) can be retried.",
        "batch_id",
    )
    line_numbers = services.store.retry_line_numbers(batch_id)
    if not line_numbers:
        raise InvalidRequest(
            f"Batch {batch_id} has no failed, expired or cancelled requests to retry.",
            param="batch_id",
        )
    input_file = services.store.get_file(tenant, record.input_file_id or "")
    if input_file is None:
        raise InvalidRequest(
            f"The input file {record.input_file_id} of batch {batch_id} no longer exists"
            " (deleted, or past its retention); its requests cannot be read to retry them.",
            param="batch_id",
        )
    writer = services.blobs.new_writer()
    try:
        with services.blobs.open(input_file.blob) as stream:
            _copy_lines(stream, line_numbers, writer, services.settings.max_line_bytes)
    except BaseException:
        writer.abort()
        raise
    upload = files.store_upload(
        services,
        tenant,
        purpose="batch",
        filename=retry_filename(batch_id),
        writer=writer,
        idempotency_key=idempotency_key,
    )
    try:
        return batches.create_openai_batch(
            services, tenant, _retry_body(record, upload.id), idempotency_key
        )
    except BaseException:
        if idempotency_key is None:
            # Nothing will ever use this copy; with a key, the client's repeat will.
            with contextlib.suppress(BatchdError):
                files.delete_file(services, tenant, upload.id)
        raise


def _copy_lines(stream: IO[bytes], wanted: list[int], writer: Writer, max_line_bytes: int) -> None:
    """Write the input's lines numbered ``wanted`` (ascending) to ``writer``, each as it was
    (its line end made ``\\n``)."""
    targets = iter(wanted)
    target: int | None = next(targets, None)
    buffer = bytearray()
    for line_no, raw, _ in _read_lines(stream, max_line_bytes):
        if target is None:
            break
        if line_no != target:
            continue
        if raw is None:  # fitted when the batch was validated; the limit was lowered since
            raise InvalidRequest(
                f"Line {line_no} of the input file is longer than this server's max_line_bytes"
                f" ({max_line_bytes}) now allows; it cannot be retried.",
                param="batch_id",
            )
        buffer += raw + b"\n"
        if len(buffer) >= WRITE_CHUNK_BYTES:
            writer.write(bytes(buffer))
            buffer.clear()
        target = next(targets, None)
    if target is not None:
        # Blobs never change, so the lines the rows were validated from are all there.
        raise BatchdError(f"The input file ended before line {target}, which a request came from.")
    writer.write(bytes(buffer))


def _retry_body(record: BatchRecord, input_file_id: str) -> dict[str, Any]:
    """The create body of the retry: the original's endpoint, window, output expiry and
    metadata, with ``retry_of``."""
    body: dict[str, Any] = {
        "input_file_id": input_file_id,
        "endpoint": record.endpoint,
        "completion_window": record.completion_window,
        "metadata": retry_metadata(record.metadata, record.id),
    }
    if record.output_expires_after is not None:
        body["output_expires_after"] = {
            "anchor": expiry.ANCHOR,
            "seconds": record.output_expires_after,
        }
    return body


def retry_metadata(original: dict[str, str] | None, batch_id: str) -> dict[str, str]:
    """``original`` with ``retry_of`` set (a retry of a retry names its own source). Within
    the key limit: ``retry_of`` is what makes the batch a retry, so the original's last keys
    give way to it."""
    kept = {k: v for k, v in (original or {}).items() if k != RETRY_OF}
    fitting = list(kept.items())[: oa_objects.METADATA_MAX_KEYS - 1]
    return {**dict(fitting), RETRY_OF: batch_id}


def retry_message_batch(
    services: Services, tenant: str, batch_id: str, idempotency_key: str | None = None
) -> BatchRecord:
    """A new message batch of the ended batch's errored, expired and canceled requests, with
    their stored ``params``, in ``in_progress``. Wake the scheduler afterwards."""
    record = batches.get_batch(services, tenant, batch_id, message_batches.SURFACE)
    _require_ended(
        record,
        f"Message batch {batch_id} is still {am.processing_status(record.status.value)};"
        " only a batch that has ended can be retried.",
        "message_batch_id",
    )
    rows = [] if record.archived_at is not None else services.store.retry_requests(batch_id)
    if record.archived_at is not None or any(not body for _, body in rows):
        raise InvalidRequest(
            f"Message batch {batch_id} was archived: its requests' inputs are no longer kept"
            f" (they are kept for {services.settings.anthropic_results_retention_seconds // 86400}"
            " days after creation), so they cannot be retried.",
            param="message_batch_id",
        )
    if not rows:
        raise InvalidRequest(
            f"Message batch {batch_id} has no errored, expired or canceled requests to retry.",
            param="message_batch_id",
        )
    requests = [{"custom_id": custom_id, "params": orjson.loads(body)} for custom_id, body in rows]
    made = message_batches.create_message_batch(
        services, tenant, {"requests": requests}, idempotency_key
    )
    # The Anthropic create takes no metadata; the console and the store's readers show it.
    metadata = retry_metadata(made.metadata, batch_id)
    services.store.set_batch_metadata(made.id, metadata)
    return dataclasses.replace(made, metadata=metadata)
