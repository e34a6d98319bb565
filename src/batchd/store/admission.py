"""Admission: a tenant's load (batches not yet ended, requests queued or running), and creating
a batch only while that load stays within the tenant's limits, counted under its lock."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Select, func, insert, select

from batchd import failpoints
from batchd.store import locks, schema
from batchd.store.idempotency import record_key
from batchd.store.records import TERMINAL_BATCH_STATUSES, IdempotencyKey, RequestState

_TERMINAL = [s.value for s in TERMINAL_BATCH_STATUSES]
_UNFINISHED = [RequestState.PENDING.value, RequestState.RUNNING.value]


def _active_batch_ids(tenant: str) -> Select[Any]:
    b = schema.batches
    return select(b.c.id).where(b.c.tenant == tenant, b.c.status.not_in(_TERMINAL))


class AdmissionMixin:
    engine: Engine

    def tenant_load(self, tenant: str) -> tuple[int, int]:
        """(batches not yet ended, requests still queued or running) of one tenant, for the
        per-tenant admission limits."""
        r = schema.requests
        with self.engine.connect() as conn:
            active = list(conn.execute(_active_batch_ids(tenant)).scalars())
            queued = 0
            if active:
                queued = conn.execute(
                    select(func.count())
                    .select_from(r)
                    .where(r.c.batch_id.in_(active), r.c.state.in_(_UNFINISHED))
                ).scalar_one()
        return len(active), int(queued)

    def create_batch_within_limits(
        self,
        values: dict[str, Any],
        *,
        adding_requests: int,
        max_active: int,
        max_queued: int,
        idempotency: IdempotencyKey | None = None,
    ) -> tuple[int, int] | None:
        """Insert a batch row only if its tenant stays within its admission limits: fewer
        than ``max_active`` batches not yet ended, and its queued or running requests plus
        ``adding_requests`` (at least one: a batch whose size is not yet known needs room for
        one) at most ``max_queued``. None when inserted; otherwise the tenant's
        (active, queued) as counted, and nothing is written.

        The count and the insert are one transaction that holds the tenant's lock
        (locks.lock_tenant), so two creates racing each other cannot both pass on the same
        room. The rows of ``values``' batch, if already inserted, are not counted: rows count
        once their batch row exists. ``idempotency``: the create's key, recorded in the same
        transaction (IdempotencyKeyTaken if another create recorded it first: then nothing is
        written)."""
        tenant = str(values["tenant"])
        r = schema.requests
        with self.engine.begin() as conn:
            locks.lock_tenant(conn, tenant)
            active = _active_batch_ids(tenant)
            active_count = conn.execute(
                select(func.count()).select_from(active.subquery())
            ).scalar_one()
            queued = conn.execute(
                select(func.count())
                .select_from(r)
                .where(r.c.batch_id.in_(active), r.c.state.in_(_UNFINISHED))
            ).scalar_one()
            if active_count >= max_active or queued + max(adding_requests, 1) > max_queued:
                return int(active_count), int(queued)
            record_key(conn, idempotency, str(values["id"]))
            conn.execute(insert(schema.batches).values(**values))
            failpoints.hit("create_batch.before_commit")
        return None
