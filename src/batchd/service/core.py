"""Operations behind the HTTP routes, independent of any wire format's HTTP details."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from batchd import ids, metrics
from batchd.blobs.base import BlobStore
from batchd.clock import now
from batchd.config import Settings
from batchd.engines.base import Engine
from batchd.errors import Conflict, InvalidRequest, LimitExceeded, NotFound
from batchd.loop_pacing import REALTIME_HOLD_SECONDS, LoopPacer
from batchd.protocol import openai as oa
from batchd.scheduler.runner import Scheduler
from batchd.store.records import BatchRecord, BatchStatus, FileRecord, IdempotencyKey
from batchd.store.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    blobs: BlobStore
    engine: Engine
    scheduler: Scheduler | None  # None in an API-only process (`batchd api`)
    # Moderates the loop's wake-ups while the embedded engine decodes batch work; set by the
    # app's lifespan where that applies (loop_pacing.py).
    pacer: LoopPacer | None = None


def install_metrics(services: Services) -> None:
    """This process's Prometheus gauges: the shared queue's depth, and (in a process that
    runs the scheduler) the leases it holds."""
    scheduler = services.scheduler
    metrics.install_process_gauges(
        request_states=services.store.request_state_counts,
        batch_statuses=services.store.batch_status_counts,
        leases_held=scheduler.leases_held if scheduler is not None else None,
    )


def note_realtime(services: Services) -> None:
    """A realtime request arrived: the loop serves everything at once for a while, whichever
    engine answers it (the embedded one also tells the pacer itself)."""
    if services.pacer is not None:
        services.pacer.hold(REALTIME_HOLD_SECONDS)


def wake_scheduler(services: Services) -> None:
    """Start new work now rather than at the next poll, when this process runs the scheduler
    (an API-only process has none: the workers find the work on their next poll)."""
    if services.scheduler is not None:
        services.scheduler.wake()


def register_upload(
    services: Services,
    tenant: str,
    *,
    filename: str,
    purpose: str,
    blob: str,
    size: int,
    idempotency: IdempotencyKey | None = None,
) -> FileRecord:
    created = now()
    record = FileRecord(
        id=ids.file_id(),
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=size,
        created_at=created,
        expires_at=(
            created + services.settings.file_retention_seconds if purpose == "batch" else None
        ),
        blob=blob,
    )
    services.store.create_file(record, idempotency)
    return record


def get_file(services: Services, tenant: str, file_id: str) -> FileRecord:
    record = services.store.get_file(tenant, file_id)
    if record is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return record


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


def _capacity_error(
    settings: Settings, active: int, queued: int, adding_requests: int
) -> LimitExceeded | None:
    """The 429 for a tenant with ``active`` unfinished batches and ``queued`` requests that
    asks to add a batch of ``adding_requests`` (0: not yet known), or None if it fits."""
    if active >= settings.max_active_batches_per_tenant:
        return LimitExceeded(
            f"Too many batches in progress: this key has {active} batches that have not "
            f"ended; the limit is {settings.max_active_batches_per_tenant}. Retry once some "
            "have ended.",
            retry_after=60,
            param="max_active_batches_per_tenant",
        )
    if queued + max(adding_requests, 1) > settings.max_queued_requests_per_tenant:
        return LimitExceeded(
            f"Too many queued requests: this key has {queued} requests waiting or running"
            + (f" and this batch adds {adding_requests}" if adding_requests else "")
            + f"; the limit is {settings.max_queued_requests_per_tenant}.",
            retry_after=60,
            param="max_queued_requests_per_tenant",
        )
    return None


def check_tenant_capacity(services: Services, tenant: str, adding_requests: int = 0) -> None:
    """Refuse a new batch early while the tenant is at its limits (429, with a Retry-After).

    A cheap early answer, before a big create does its work; the binding check is
    ``create_batch_admitted``'s, made atomically with the insert of the batch row.
    """
    active, queued = services.store.tenant_load(tenant)
    error = _capacity_error(services.settings, active, queued, adding_requests)
    if error is not None:
        raise error


def create_batch_admitted(
    services: Services,
    values: dict[str, Any],
    adding_requests: int = 0,
    idempotency: IdempotencyKey | None = None,
) -> None:
    """Insert the batch row ``values`` if its tenant is within its per-tenant limits, else
    raise the 429. The count and the insert are one transaction under the tenant's lock:
    of two creates racing for the last room, exactly one gets it.

    An OpenAI batch's size is unknown until its file is validated (``adding_requests`` 0):
    it is admitted while the tenant's queue has room for one more request, and validation
    fails it if its requests then do not fit.
    """
    settings = services.settings
    refused = services.store.create_batch_within_limits(
        values,
        adding_requests=adding_requests,
        max_active=settings.max_active_batches_per_tenant,
        max_queued=settings.max_queued_requests_per_tenant,
        idempotency=idempotency,
    )
    if refused is not None:
        error = _capacity_error(settings, *refused, adding_requests)
        assert error is not None  # the store refuses by the same rule
        raise error


def batch_endpoints(engine: Engine) -> tuple[str, ...]:
    """Batch endpoints some served model can answer: embeddings only with an upstream
    (``openai-http``) model; the embedded engine generates text only."""
    if getattr(engine, "supports_embeddings", False):
        return oa.SUPPORTED_BATCH_ENDPOINTS
    return tuple(e for e in oa.SUPPORTED_BATCH_ENDPOINTS if e != oa.EMBEDDINGS_ENDPOINT)


def create_openai_batch(
    services: Services, tenant: str, body: Any, idempotency: IdempotencyKey | None = None
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
    if endpoint not in oa.KNOWN_BATCH_ENDPOINTS:
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
    window_seconds = oa.parse_completion_window(body["completion_window"])
    metadata = oa.check_metadata(body.get("metadata"))
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
            "surface": "openai",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": body["completion_window"],
            "status": BatchStatus.VALIDATING.value,
            "metadata": orjson.dumps(metadata).decode() if metadata is not None else None,
            "created_at": created,
            "expires_at": created + window_seconds,
        },
        idempotency=idempotency,
    )
    wake_scheduler(services)
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


def cancel_batch(services: Services, tenant: str, batch_id: str, surface: str) -> BatchRecord:
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
    wake_scheduler(services)
    return get_batch(services, tenant, batch_id, surface)
