"""Per-tenant admission: how many unfinished batches and queued requests a tenant may have,
and the 429 that names the limit a new batch would cross."""

from __future__ import annotations

from typing import Any

from batchd.config import Settings
from batchd.errors import LimitExceeded
from batchd.service.services import Services
from batchd.store.records import IdempotencyKey


def capacity_error(
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
    error = capacity_error(services.settings, active, queued, adding_requests)
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
        error = capacity_error(settings, *refused, adding_requests)
        assert error is not None  # the store refuses by the same rule
        raise error
