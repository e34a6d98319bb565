"""OpenAI batch use cases, and those both surfaces share: create (once per Idempotency-Key),
retrieve, list and cancel. Every function here is blocking (database work): a route runs it
off the event loop (``api/deps.run_blocking``) and wakes the scheduler itself afterwards
where the work changed (``services.wake_scheduler``, on the loop)."""

from __future__ import annotations

from typing import Any

import orjson

from batchd import ids
from batchd.clock import now
from batchd.engines.base import Engine
from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai import expiry
from batchd.protocol.openai import objects as oa_objects
from batchd.service import idempotency
from batchd.service.admission import create_batch_admitted
from batchd.service.services import Services
from batchd.store.records import BatchRecord, BatchStatus, IdempotencyKey

SURFACE = "openai"


def batch_endpoints(engine: Engine) -> tuple[str, ...]:
    """Batch endpoints some served model can answer: embeddings only with an upstream
    (``openai-http``) model or the embedded engine's bundled embedding model."""
    if engine.supports_embeddings:
        return oa_bodies.SUPPORTED_BATCH_ENDPOINTS
    return tuple(
        e for e in oa_bodies.SUPPORTED_BATCH_ENDPOINTS if e != oa_bodies.EMBEDDINGS_ENDPOINT
    )


def create_openai_batch(
    services: Services, tenant: str, body: Any, idempotency_key: str | None = None
) -> BatchRecord:
    """The batch ``body`` asks for, in ``validating``; with ``idempotency_key``, the batch an
    earlier create with that key made instead. Wake the scheduler afterwards."""
    return idempotency.create_once(
        services.store,
        tenant=tenant,
        scope=idempotency.SCOPE_BATCHES,
        key=idempotency_key,
        fingerprint=idempotency.fingerprint_json(body) if idempotency_key else "",
        create=lambda key: _create_openai_batch(services, tenant, body, key),
        fetch=lambda batch_id: get_batch(services, tenant, batch_id, SURFACE),
    )


def _create_openai_batch(
    services: Services, tenant: str, body: Any, idempotency: IdempotencyKey | None
) -> BatchRecord:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    for key in ("input_file_id", "endpoint", "completion_window"):
        if body.get(key) in (None, ""):
            raise InvalidRequest(
                f"Missing required parameter: '{key}'.",
                param=key,
                code="missing_required_parameter",
            )
    endpoint = body["endpoint"]
    supported = batch_endpoints(services.engine)
    if endpoint not in oa_bodies.KNOWN_BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"Invalid endpoint {str(endpoint)[:100]!r}: expected one of {', '.join(supported)}.",
            param="endpoint",
        )
    if endpoint not in supported:
        raise InvalidRequest(
            f"The endpoint {endpoint} is not supported by this server's models; supported: "
            f"{', '.join(supported)}.",
            param="endpoint",
            code="unsupported_endpoint",
        )
    window_seconds = oa_objects.parse_completion_window(body["completion_window"])
    metadata = oa_objects.check_metadata(body.get("metadata"))
    output_expires_after = expiry.parse_expires_after(
        body.get("output_expires_after"),
        field="output_expires_after",
        min_seconds=services.settings.min_expires_after_seconds,
    )
    input_file_id = body["input_file_id"]
    if not isinstance(input_file_id, str):
        raise InvalidRequest("input_file_id must be a string.", param="input_file_id")
    file = services.store.get_file(tenant, input_file_id)
    if file is None:
        raise InvalidRequest(
            f"No such File object: {input_file_id}", param="input_file_id", code="invalid_request"
        )
    if file.purpose != "batch":
        raise InvalidRequest(
            f"File {input_file_id} has purpose {file.purpose!r}; a batch needs purpose 'batch'.",
            param="input_file_id",
        )
    created = now()
    batch_id = ids.batch_id()
    create_batch_admitted(
        services,
        {
            "id": batch_id,
            "tenant": tenant,
            "surface": SURFACE,
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": body["completion_window"],
            "status": BatchStatus.VALIDATING.value,
            "metadata": orjson.dumps(metadata).decode() if metadata is not None else None,
            "created_at": created,
            "expires_at": created + window_seconds,
            "output_expires_after": output_expires_after,
        },
        idempotency=idempotency,
    )
    record = services.store.get_batch(batch_id, tenant)
    assert record is not None
    return record


def get_batch(
    services: Services, tenant: str, batch_id: str, surface: str, *, for_poller: bool = False
) -> BatchRecord:
    """The tenant's batch on ``surface``, or NotFound. ``for_poller``: a client's read, whose
    counts of a running batch may be up to ``batch_counts_max_age_seconds`` old."""
    max_age = services.settings.batch_counts_max_age_seconds if for_poller else 0.0
    record = services.store.get_batch(batch_id, tenant, stats_max_age=max_age)
    if record is None or record.surface != surface:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return record


def list_batches(
    services: Services,
    tenant: str,
    surface: str,
    *,
    after: str | None,
    before: str | None = None,
    limit: int,
) -> tuple[list[BatchRecord], bool]:
    """A page of the tenant's batches on ``surface``, newest first, and whether more follow.
    A client's read: counts of running batches may be ``batch_counts_max_age_seconds`` old."""
    return services.store.list_batches(
        tenant,
        surface,
        after=after,
        before=before,
        limit=limit,
        stats_max_age=services.settings.batch_counts_max_age_seconds,
    )


def cancel_batch(services: Services, tenant: str, batch_id: str, surface: str) -> BatchRecord:
    """Start cancelling the batch (idempotent: a batch already cancelling or cancelled is
    answered as it is). Wake the scheduler afterwards: it ends the cancelled work."""
    record = get_batch(services, tenant, batch_id, surface)
    if record.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return record  # cancelling twice is harmless, however fast the first one finished
    if record.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        raise Conflict(
            f"Cannot cancel a batch with status '{record.status.value}'.", param="batch_id"
        )
    if not services.store.transition(
        batch_id, [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING
    ):
        record = get_batch(services, tenant, batch_id, surface)
        if record.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise Conflict(
                f"Cannot cancel a batch with status '{record.status.value}'.", param="batch_id"
            )
        return record
    return get_batch(services, tenant, batch_id, surface)
