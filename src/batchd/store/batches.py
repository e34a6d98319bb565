"""Batches: reading them (with their counts), moving them between states, and ending them.

Transitions name their legal "from" states in the UPDATE itself and report whether a row
changed: zero rows means somebody else got there first, which callers treat as a conflict.
Admission (creating a batch within its tenant's limits) is admission.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Engine, and_, insert, select, update

from batchd.clock import now
from batchd.store import locks, poll_reads, schema, webhooks
from batchd.store.files import file_values
from batchd.store.records import TERMINAL_BATCH_STATUSES, BatchRecord, BatchStatus, FileRecord
from batchd.store.stats import BatchStats


def batch_record(row: Any) -> BatchRecord:
    """The record of a ``select(batches)`` row, its counts and usage not yet filled in."""
    return BatchRecord(
        id=row.id,
        tenant=row.tenant,
        surface=row.surface,
        endpoint=row.endpoint,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=BatchStatus(row.status),
        model=row.model,
        errors=orjson.loads(row.errors) if row.errors else None,
        metadata=orjson.loads(row.metadata) if row.metadata else None,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        in_progress_at=row.in_progress_at,
        expires_at=row.expires_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        archived_at=row.archived_at,
        output_expires_after=row.output_expires_after,
    )


class BatchesMixin:
    engine: Engine
    _reads: poll_reads.ReadConnections
    _stats: BatchStats

    def create_batch(self, values: dict[str, Any]) -> None:
        """Insert a batch row as is, with no admission check (create_batch_within_limits)."""
        with self.engine.begin() as conn:
            conn.execute(insert(schema.batches).values(**values))

    def get_batch(
        self, batch_id: str, tenant: str | None = None, *, stats_max_age: float = 0.0
    ) -> BatchRecord | None:
        """The batch with its request counts and usage. ``stats_max_age``: how many seconds
        old the counts of a running batch may be (pollers' reads; 0, the default, counts now:
        the scheduler decides on these)."""
        poller = stats_max_age > 0
        dialect = self.engine.dialect
        with self._reads.connection(poller=poller) as dbapi:
            if tenant is None:
                rows = poll_reads.batch_rows(
                    dbapi, dialect, poll_reads.BATCH_BY_ID, {"id": batch_id}
                )
            else:
                params = {"id": batch_id, "tenant": tenant}
                rows = poll_reads.batch_rows(dbapi, dialect, poll_reads.TENANT_BATCH_BY_ID, params)
        if not rows:
            return None
        record = batch_record(rows[0])
        self._stats.attach([record], stats_max_age)
        return record

    def list_batches(
        self,
        tenant: str,
        surface: str,
        *,
        after: str | None,
        limit: int,
        before: str | None = None,
        stats_max_age: float = 0.0,
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first. ``after``: the page older than that id; ``before``: the page newer
        than it (still newest first), with ``has_more`` meaning more newer ones exist.
        ``stats_max_age`` as in get_batch."""
        params: dict[str, Any] = {"tenant": tenant, "surface": surface, "n": limit + 1}
        dialect = self.engine.dialect
        with self._reads.connection(poller=stats_max_age > 0) as dbapi:
            if after or before:
                found = poll_reads.fetch(
                    dbapi,
                    dialect,
                    poll_reads.TENANT_BATCH_SEQ,
                    {"id": after or before, "tenant": tenant},
                )
                if not found:
                    return [], False
                params["cursor"] = found[0][0]
            if before and not after:
                rows = poll_reads.batch_rows(dbapi, dialect, poll_reads.PAGE_NEWER, params)
                page = list(reversed(rows[:limit]))
            else:
                statement = poll_reads.PAGE_OLDER if after else poll_reads.PAGE
                rows = poll_reads.batch_rows(dbapi, dialect, statement, params)
                page = rows[:limit]
        records = [batch_record(r) for r in page]
        self._stats.attach(records, stats_max_age)
        return records, len(rows) > limit

    def delete_batch(self, batch_id: str, tenant: str) -> bool:
        """Remove an ended batch and its rows. False if it is unknown to ``tenant`` or has
        not ended (the status is checked in the DELETE itself, so it cannot race a cancel)."""
        t = schema.batches
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        with self.engine.begin() as conn:
            changed = conn.execute(
                t.delete().where(t.c.id == batch_id, t.c.tenant == tenant, t.c.status.in_(terminal))
            ).rowcount
            if changed:
                conn.execute(schema.requests.delete().where(schema.requests.c.batch_id == batch_id))
        return bool(changed)

    def transition(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        *,
        claimed_by: str | None = None,
        **values: Any,
    ) -> bool:
        """Move a batch between states; stamps ``<to_status>_at``. False if it was not in
        one of ``from_statuses`` (a concurrent transition won), or, with ``claimed_by``, if
        that worker no longer holds the batch's validation claim."""
        t = schema.batches
        from_statuses = list(from_statuses)
        stamp = f"{to_status.value}_at"
        if stamp in t.c and stamp not in values:
            values[stamp] = now()
        condition = and_(t.c.id == batch_id, t.c.status.in_([s.value for s in from_statuses]))
        if claimed_by is not None:
            condition = and_(condition, t.c.claim_owner == claimed_by)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(t).where(condition).values(status=to_status.value, **values)
            ).rowcount
            if changed and to_status.terminal and not any(s.terminal for s in from_statuses):
                # Its webhook events, in the transaction that ends it (the outbox).
                webhooks.enqueue_batch_ended(conn, batch_id, to_status, now())
        return bool(changed)

    def batch_ids_with_status(self, *statuses: BatchStatus) -> list[str]:
        """Every batch in one of ``statuses``, oldest first (what a scheduler pass visits)."""
        t = schema.batches
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(t.c.id)
                    .where(t.c.status.in_([s.value for s in statuses]))
                    .order_by(t.c.seq)
                ).scalars()
            )

    def overdue_batch_ids(self, at: int) -> list[str]:
        """Batches still validating or running whose deadline is ``at`` or earlier."""
        t = schema.batches
        active = [BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(t.c.id).where(t.c.status.in_(active), t.c.expires_at <= at)
                ).scalars()
            )

    def finalize_lock(self, batch_id: str) -> contextlib.AbstractContextManager[bool]:
        """Whether this process may finalize ``batch_id`` now. On PostgreSQL: a session
        advisory lock on the batch, held on a connection of its own for the whole finalize,
        so the workers that all see a batch's last rows finish do not each write its result
        files (the commit in ``finalize`` stays the exactly-once guarantee); a finalizer that
        dies drops the lock with its connection. SQLite has one worker: always True."""
        return locks.finalize_lock(self.engine, batch_id)

    def finalize(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        new_files: Sequence[FileRecord],
        output_file_id: str | None,
        error_file_id: str | None,
    ) -> bool:
        """Register the result files and end the batch in one transaction (exactly once),
        with its webhook events (the outbox: store/webhooks.py)."""
        t = schema.batches
        from_statuses = list(from_statuses)
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == batch_id, t.c.status.in_([s.value for s in from_statuses]))
                .values(
                    status=to_status.value,
                    output_file_id=output_file_id,
                    error_file_id=error_file_id,
                    **{f"{to_status.value}_at": now()},
                )
            ).rowcount
            if not changed:
                conn.rollback()
                return False
            for record in new_files:
                conn.execute(insert(schema.files).values(**file_values(record)))
            if not any(s.terminal for s in from_statuses):  # ending it, not re-ending it
                webhooks.enqueue_batch_ended(conn, batch_id, to_status, now())
        return True
