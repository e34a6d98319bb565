"""Anthropic Message Batches on the shared core: create, delete, results.

A message batch is a ``batches`` row with surface "anthropic" and endpoint ``/v1/messages``;
its requests become rows at create time and run through the same scheduler and engine as
OpenAI batches. Anthropic validates ``params`` asynchronously (a bad one comes back as an
``errored`` result), so creation checks only the envelope: ``custom_id``s, counts, types.

Retrieve and list need nothing surface-specific beyond ``batches``'s functions. Every
function here but ``iter_results`` is blocking (database work): a route runs it off the event
loop (``api/deps.run_blocking``); ``iter_results`` reads as it is consumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson

from batchd import failpoints, ids
from batchd.clock import now
from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.protocol import anthropic as am
from batchd.protocol.batch_file import prefix_key
from batchd.service import idempotency
from batchd.service.admission import check_tenant_capacity, create_batch_admitted
from batchd.service.batches import cancel_batch, get_batch
from batchd.service.services import Services
from batchd.store.records import (
    FINAL_REQUEST_STATES,
    BatchRecord,
    BatchStatus,
    IdempotencyKey,
    RequestLine,
)

log = logging.getLogger(__name__)

SURFACE = "anthropic"
INSERT_CHUNK_ROWS = 2000
RESULTS_CHUNK_BYTES = 256 * 1024  # lines per write to the client, to keep the hops few


def _checked_requests(body: Any, max_requests: int) -> list[Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    requests = body.get("requests")
    if requests is None:
        raise InvalidRequest("requests: Field required", param="requests")
    if not isinstance(requests, list):
        raise InvalidRequest("requests: Input should be a valid list", param="requests")
    if not requests:
        raise InvalidRequest("requests: List should have at least 1 item", param="requests")
    if len(requests) > max_requests:
        raise InvalidRequest(
            f"requests: the batch has {len(requests)} requests; the limit is {max_requests}"
            " requests per batch (anthropic_max_batch_requests).",
            param="requests",
        )
    first_use: dict[str, int] = {}
    for index, item in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: Input should be an object", param=where)
        for key in ("custom_id", "params"):
            if key not in item:
                raise InvalidRequest(f"{where}.{key}: Field required", param=f"{where}.{key}")
        extra = sorted(set(item) - {"custom_id", "params"})
        if extra:
            raise InvalidRequest(
                f"{where}.{extra[0][:64]}: Extra inputs are not permitted", param=where
            )
        custom_id = item["custom_id"]
        if not isinstance(custom_id, str) or not am.CUSTOM_ID_RE.fullmatch(custom_id):
            raise InvalidRequest(
                f"{where}.custom_id: must be 1 to 64 characters from [a-zA-Z0-9_-], got "
                f"{str(custom_id)[:80]!r}.",
                param=f"{where}.custom_id",
            )
        if custom_id in first_use:
            raise InvalidRequest(
                f"{where}.custom_id: duplicate custom_id {custom_id!r} (first used by "
                f"requests.{first_use[custom_id]}); each custom_id must be unique within a batch.",
                param=f"{where}.custom_id",
            )
        first_use[custom_id] = index
        if not isinstance(item["params"], dict):
            raise InvalidRequest(
                f"{where}.params: Input should be an object", param=f"{where}.params"
            )
    return requests


def _row(line_no: int, custom_id: str, params: dict[str, Any]) -> RequestLine:
    model = params.get("model")
    model = model if isinstance(model, str) else ""
    messages = params.get("messages")
    # The system prompt sits outside ``messages`` in this format, yet it is the most shared
    # part of the prefix: hash it as a leading turn.
    keyed = {"messages": [params.get("system"), *messages]} if isinstance(messages, list) else {}
    return RequestLine(
        line_no=line_no,
        custom_id=custom_id,
        body=orjson.dumps(params),
        model=model,
        prefix_key=prefix_key(model, keyed),
    )


def create_message_batch(
    services: Services, tenant: str, body: Any, idempotency_key: str | None = None
) -> BatchRecord:
    """The message batch ``body`` asks for, in ``in_progress``; with ``idempotency_key``, the
    batch an earlier create with that key made instead. Wake the scheduler afterwards."""
    return idempotency.create_once(
        services.store,
        tenant=tenant,
        scope=idempotency.SCOPE_MESSAGE_BATCHES,
        key=idempotency_key,
        # Before the create: it drops each request's parsed params once they are bytes.
        fingerprint=idempotency.fingerprint_json(body) if idempotency_key else "",
        create=lambda key: _create_message_batch(services, tenant, body, key),
        fetch=lambda batch_id: get_batch(services, tenant, batch_id, SURFACE),
    )


def _create_message_batch(
    services: Services, tenant: str, body: Any, idempotency: IdempotencyKey | None
) -> BatchRecord:
    """Check the envelope, insert every request as a row, then open the batch.

    The rows go in first, in short chunked transactions, and the batch row last: the
    scheduler leases only rows of an ``in_progress`` batch, so it can neither run nor
    finalize a half-inserted one. If insertion fails the rows are removed; a crash mid-way
    leaves rows no batch owns, which nothing reads and retention removes once they are an
    hour old. The tenant's limits are checked before the rows go in (a quick refusal) and
    again with the batch row's insert, atomically (the one that binds: rows count only once
    their batch row exists).
    """
    requests = _checked_requests(body, services.settings.anthropic_max_batch_requests)
    check_tenant_capacity(services, tenant, len(requests))
    store = services.store
    batch_id = ids.message_batch_id()
    models: dict[str, None] = {}
    try:
        chunk: list[RequestLine] = []
        for index, item in enumerate(requests):
            row = _row(index + 1, item["custom_id"], item["params"])
            requests[index] = None  # drop the parsed params once they are bytes
            if len(models) < 8:
                models.setdefault(row.model)
            chunk.append(row)
            if len(chunk) >= INSERT_CHUNK_ROWS:
                store.insert_requests(batch_id, chunk)
                chunk = []
        store.insert_requests(batch_id, chunk)
        failpoints.hit("message_batch.rows_inserted")  # rows in, no batch row owns them yet
        created = now()
        create_batch_admitted(
            services,
            {
                "id": batch_id,
                "tenant": tenant,
                "surface": SURFACE,
                "endpoint": am.MESSAGES_ENDPOINT,
                "input_file_id": None,
                "completion_window": am.COMPLETION_WINDOW,
                # No validating step: Anthropic validates params while executing them.
                "status": BatchStatus.IN_PROGRESS.value,
                "model": ",".join(m for m in models if m) or None,
                "metadata": None,
                "created_at": created,
                "in_progress_at": created,
                "expires_at": created + am.BATCH_WINDOW_SECONDS,
            },
            len(requests),
            idempotency,
        )
    except BaseException:
        store.delete_requests(batch_id)
        raise
    log.info(
        "message batch created",
        extra={"action": "batch_created", "batch_id": batch_id, "requests": len(requests)},
    )
    return get_batch(services, tenant, batch_id, SURFACE)


def cancel_message_batch(services: Services, tenant: str, batch_id: str) -> BatchRecord:
    """Start cancelling; idempotent while canceling. Wake the scheduler afterwards: it ends
    the cancelled work."""
    record = get_batch(services, tenant, batch_id, SURFACE)
    if record.status.terminal:
        raise Conflict(
            f"Message batch {batch_id} has already ended; it cannot be canceled.",
            param="message_batch_id",
        )
    return cancel_batch(services, tenant, batch_id, SURFACE)


def delete_message_batch(services: Services, tenant: str, batch_id: str) -> None:
    record = get_batch(services, tenant, batch_id, SURFACE)
    if not record.status.terminal:
        raise Conflict(
            f"Message batch {batch_id} is still {am.processing_status(record.status.value)}; "
            "a batch can be deleted only once it has ended. Cancel it first.",
            param="message_batch_id",
        )
    if not services.store.delete_batch(batch_id, tenant):
        raise NotFound(f"No batch found with id '{batch_id}'.", param="message_batch_id")


def results_batch(services: Services, tenant: str, batch_id: str) -> BatchRecord:
    """The batch whose results are about to be streamed; refuses one that has not ended."""
    record = get_batch(services, tenant, batch_id, SURFACE)
    if not record.status.terminal:
        raise InvalidRequest(
            f"Message batch {batch_id} is still "
            f"{am.processing_status(record.status.value)}; its results are available once "
            "processing has ended.",
            param="message_batch_id",
        )
    if record.archived_at is not None:
        raise NotFound(
            f"The results of message batch {batch_id} were archived (results are kept for "
            f"{services.settings.anthropic_results_retention_seconds // 86400} days after "
            "creation) and are no longer available.",
            param="message_batch_id",
        )
    return record


def iter_results(services: Services, batch_id: str) -> Iterator[bytes]:
    """The results file, streamed from the rows in input order, a few hundred KB at a time."""
    buffer: list[bytes] = []
    size = 0
    for row in services.store.iter_finished(batch_id):
        if row.state not in FINAL_REQUEST_STATES:  # cannot happen once ended; never guess
            continue
        line = am.result_line(row.custom_id, row.state.value, row.result)
        buffer.append(line)
        size += len(line)
        if size >= RESULTS_CHUNK_BYTES:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)
