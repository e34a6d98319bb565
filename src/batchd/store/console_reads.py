"""The console's reads: batches of both surfaces (one tenant's or everyone's) by status,
a batch's first failed requests, and the queue by tenant. Not on the polling path: plain
statements, each over an index."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from batchd.store import schema
from batchd.store.batches import batch_record
from batchd.store.records import BatchRecord, RequestState
from batchd.store.stats import BatchStats


class ConsoleReadsMixin:
    engine: Engine
    _stats: BatchStats

    def console_batches(
        self,
        tenant: str | None,
        *,
        statuses: list[str] | None,
        limit: int,
        older_than: str | None = None,
        stats_max_age: float = 0.0,
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first, both surfaces: ``tenant``'s batches, or (None) every tenant's; only
        those in ``statuses`` when given; older than the batch ``older_than`` when given."""
        b = schema.batches
        query = select(b).order_by(b.c.seq.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(b.c.tenant == tenant)
        if statuses:
            query = query.where(b.c.status.in_(statuses))
        with self.engine.connect() as conn:
            if older_than is not None:
                cursor = conn.execute(select(b.c.seq).where(b.c.id == older_than)).scalar()
                if cursor is None:
                    return [], False
                query = query.where(b.c.seq < cursor)
            rows = conn.execute(query).all()
        records = [batch_record(row) for row in rows[:limit]]
        self._stats.attach(records, stats_max_age)
        return records, len(rows) > limit

    def first_failures(self, batch_id: str, limit: int) -> list[dict[str, Any]]:
        """The batch's first requests that ended without a 2xx answer, by line: line number
        (1-based), custom_id, state, status code and the stored error (empty once archived)."""
        r = schema.requests
        failed = [RequestState.ERRORED.value, RequestState.EXPIRED.value]
        query = (
            select(r.c.line_no, r.c.custom_id, r.c.state, r.c.status_code, r.c.result)
            .where(r.c.batch_id == batch_id, r.c.state.in_(failed))
            .order_by(r.c.line_no)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "line": int(row.line_no),
                "custom_id": row.custom_id,
                "state": row.state,
                "status_code": row.status_code,
                "result": bytes(row.result) if row.result else b"",
            }
            for row in rows
        ]

    def queue_by_tenant(self) -> dict[str, dict[str, int]]:
        """Requests pending and running per tenant, over every unfinished batch."""
        r, b = schema.requests, schema.batches
        unfinished = [RequestState.PENDING.value, RequestState.RUNNING.value]
        query = (
            select(b.c.tenant, r.c.state, func.count())
            .select_from(r.join(b, b.c.id == r.c.batch_id))
            .where(r.c.state.in_(unfinished))
            .group_by(b.c.tenant, r.c.state)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        queue: dict[str, dict[str, int]] = {}
        for tenant, state, n in rows:
            queue.setdefault(tenant, {"pending": 0, "running": 0})[state] = int(n)
        return queue
