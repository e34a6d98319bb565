"""Every database operation batchd performs, as named methods over SQLAlchemy Core.

Transitions name their legal "from" states in the UPDATE itself and report whether a row
changed: zero rows means somebody else got there first, which callers treat as a conflict.
Results are written only by the current lease holder (owner and epoch in the WHERE clause).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import Engine, and_, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from batchd.ingest import RequestLine
from batchd.store import schema
from batchd.store.records import (
    TERMINAL_BATCH_STATUSES,
    BatchRecord,
    BatchStatus,
    FileRecord,
    FinishedRow,
    IdempotencyClaim,
    LeasedRequest,
    RequestCounts,
    RequestOutcome,
    RequestState,
    Usage,
)

_LEASE_SQL = text(
    """
    UPDATE requests
       SET state = 'running', lease_owner = :owner, lease_expires_at = :expires,
           lease_epoch = lease_epoch + 1, attempts = attempts + 1
     WHERE seq IN (
           SELECT r.seq FROM requests r JOIN batches b ON b.id = r.batch_id
            WHERE r.state = 'pending' AND b.status = 'in_progress'
            ORDER BY b.expires_at, r.batch_id, r.prefix_key, r.line_no
            LIMIT :n)
    RETURNING seq, batch_id, line_no, custom_id, body, lease_epoch
    """
)


def now() -> int:
    return int(time.time())


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---------------------------------------------------------------- files

    def create_file(self, record: FileRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(schema.files).values(**_file_values(record)))

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(schema.files).where(
                    schema.files.c.id == file_id, schema.files.c.tenant == tenant
                )
            ).first()
        return _file_record(row) if row else None

    def list_files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[FileRecord], bool]:
        t = schema.files
        query = select(t).where(t.c.tenant == tenant)
        if purpose:
            query = query.where(t.c.purpose == purpose)
        with self.engine.connect() as conn:
            if after:
                cursor = conn.execute(
                    select(t.c.seq).where(t.c.id == after, t.c.tenant == tenant)
                ).scalar()
                if cursor is None:
                    return [], False
                query = query.where(t.c.seq < cursor if order == "desc" else t.c.seq > cursor)
            query = query.order_by(t.c.seq.desc() if order == "desc" else t.c.seq.asc())
            rows = conn.execute(query.limit(limit + 1)).all()
        return [_file_record(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str) -> FileRecord | None:
        t = schema.files
        with self.engine.begin() as conn:
            row = conn.execute(select(t).where(t.c.id == file_id, t.c.tenant == tenant)).first()
            if row is None:
                return None
            conn.execute(t.delete().where(t.c.id == file_id))
        return _file_record(row)

    def all_blob_names(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(schema.files.c.blob)).scalars())

    # -------------------------------------------------------------- batches

    def create_batch(self, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(schema.batches).values(**values))

    def get_batch(self, batch_id: str, tenant: str | None = None) -> BatchRecord | None:
        t = schema.batches
        query = select(t).where(t.c.id == batch_id)
        if tenant is not None:
            query = query.where(t.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
            if row is None:
                return None
            record = _batch_record(row)
            record.counts = self._counts(conn, batch_id)
            record.usage = self._usage(conn, batch_id)
        return record

    def list_batches(
        self, tenant: str, surface: str, *, after: str | None, limit: int, before: str | None = None
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first. ``after``: the page older than that id; ``before``: the page newer
        than it (still newest first), with ``has_more`` meaning more newer ones exist."""
        t = schema.batches
        query = select(t).where(t.c.tenant == tenant, t.c.surface == surface)
        with self.engine.connect() as conn:
            if after or before:
                cursor = conn.execute(
                    select(t.c.seq).where(t.c.id == (after or before), t.c.tenant == tenant)
                ).scalar()
                if cursor is None:
                    return [], False
                query = query.where(t.c.seq < cursor if after else t.c.seq > cursor)
            if before and not after:
                rows = conn.execute(query.order_by(t.c.seq.asc()).limit(limit + 1)).all()
                page = list(reversed(rows[:limit]))
            else:
                rows = conn.execute(query.order_by(t.c.seq.desc()).limit(limit + 1)).all()
                page = rows[:limit]
            records = [_batch_record(r) for r in page]
            for record in records:
                record.counts = self._counts(conn, record.id)
                record.usage = self._usage(conn, record.id)
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
        **values: Any,
    ) -> bool:
        """Move a batch between states; stamps ``<to_status>_at``. False if it was not in
        one of ``from_statuses`` (a concurrent transition won)."""
        t = schema.batches
        stamp = f"{to_status.value}_at"
        if stamp in t.c and stamp not in values:
            values[stamp] = now()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == batch_id, t.c.status.in_([s.value for s in from_statuses]))
                .values(status=to_status.value, **values)
            ).rowcount
        return bool(changed)

    def batch_ids_with_status(self, *statuses: BatchStatus) -> list[str]:
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
        t = schema.batches
        active = [BatchStatus.VALIDATING.value, BatchStatus.IN_PROGRESS.value]
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(t.c.id).where(t.c.status.in_(active), t.c.expires_at <= at)
                ).scalars()
            )

    def finalize(
        self,
        batch_id: str,
        from_statuses: Iterable[BatchStatus],
        to_status: BatchStatus,
        new_files: Sequence[FileRecord],
        output_file_id: str | None,
        error_file_id: str | None,
    ) -> bool:
        """Register the result files and end the batch in one transaction (exactly once)."""
        t = schema.batches
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
                conn.execute(insert(schema.files).values(**_file_values(record)))
        return True

    # ------------------------------------------------------------- requests

    def insert_requests(self, batch_id: str, lines: Sequence[RequestLine]) -> None:
        if not lines:
            return
        with self.engine.begin() as conn:
            conn.execute(
                insert(schema.requests),
                [
                    {
                        "batch_id": batch_id,
                        "line_no": line.line_no,
                        "custom_id": line.custom_id,
                        "body": line.body,
                        "prefix_key": line.prefix_key,
                        "state": RequestState.PENDING.value,
                        "attempts": 0,
                        "lease_epoch": 0,
                    }
                    for line in lines
                ],
            )

    def delete_requests(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.requests.delete().where(schema.requests.c.batch_id == batch_id))

    def lease(self, owner: str, n: int, lease_seconds: int) -> list[LeasedRequest]:
        if n <= 0:
            return []
        with self.engine.begin() as conn:
            rows = conn.execute(
                _LEASE_SQL, {"owner": owner, "expires": now() + lease_seconds, "n": n}
            ).all()
            if not rows:
                return []
            batch_ids = {r.batch_id for r in rows}
            endpoints = dict(
                conn.execute(
                    select(schema.batches.c.id, schema.batches.c.endpoint).where(
                        schema.batches.c.id.in_(batch_ids)
                    )
                ).all()
            )
        leased = [
            LeasedRequest(
                seq=r.seq,
                batch_id=r.batch_id,
                line_no=r.line_no,
                custom_id=r.custom_id,
                body=r.body,
                epoch=r.lease_epoch,
                endpoint=endpoints[r.batch_id],
            )
            for r in rows
        ]
        # RETURNING order is unspecified; keep the scheduling order.
        leased.sort(key=lambda item: (item.batch_id, item.line_no))
        return leased

    def renew_leases(self, owner: str, lease_seconds: int) -> int:
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(r.c.state == RequestState.RUNNING.value, r.c.lease_owner == owner)
                .values(lease_expires_at=now() + lease_seconds)
            ).rowcount

    def requeue_running(self, *, lapsed_before: int | None = None) -> int:
        """Return running rows to pending: all of them (the sole worker restarting) or only
        those whose lease lapsed before ``lapsed_before``."""
        r = schema.requests
        condition = r.c.state == RequestState.RUNNING.value
        if lapsed_before is not None:
            condition = and_(condition, r.c.lease_expires_at < lapsed_before)
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(condition)
                .values(state=RequestState.PENDING.value, lease_owner=None, lease_expires_at=None)
            ).rowcount

    def complete(self, leased: LeasedRequest, owner: str, outcome: RequestOutcome) -> bool:
        r = schema.requests
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(r)
                .where(
                    r.c.seq == leased.seq,
                    r.c.state == RequestState.RUNNING.value,
                    r.c.lease_owner == owner,
                    r.c.lease_epoch == leased.epoch,
                )
                .values(
                    state=outcome.state.value,
                    status_code=outcome.status_code,
                    result=outcome.result,
                    prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cached_tokens=outcome.cached_tokens,
                    finished_at=now(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
        return bool(changed)

    def end_pending(self, batch_id: str, state: RequestState) -> int:
        """Mark every not-yet-started request of a batch canceled or expired."""
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(r.c.batch_id == batch_id, r.c.state == RequestState.PENDING.value)
                .values(state=state.value, finished_at=now())
            ).rowcount

    def end_running(self, batch_id: str, state: RequestState) -> int:
        """Mark running requests ended (used when their worker stopped them or died)."""
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(r.c.batch_id == batch_id, r.c.state == RequestState.RUNNING.value)
                .values(
                    state=state.value, finished_at=now(), lease_owner=None, lease_expires_at=None
                )
            ).rowcount

    def tenant_load(self, tenant: str) -> tuple[int, int]:
        """(batches not yet ended, requests still queued or running) of one tenant, for the
        per-tenant admission limits."""
        b, r = schema.batches, schema.requests
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        unfinished = [RequestState.PENDING.value, RequestState.RUNNING.value]
        with self.engine.connect() as conn:
            active = [
                row.id
                for row in conn.execute(
                    select(b.c.id).where(b.c.tenant == tenant, b.c.status.not_in(terminal))
                )
            ]
            queued = 0
            if active:
                queued = conn.execute(
                    select(func.count())
                    .select_from(r)
                    .where(r.c.batch_id.in_(active), r.c.state.in_(unfinished))
                ).scalar_one()
        return len(active), int(queued)

    # ------------------------------------------------------------------- retention

    def expired_files(self, at: int, limit: int = 500) -> list[FileRecord]:
        """Files past ``expires_at``, except the input file of a batch that has not ended."""
        f, b = schema.files, schema.batches
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        in_use = select(b.c.input_file_id).where(
            b.c.input_file_id.is_not(None), b.c.status.not_in(terminal)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(f)
                .where(f.c.expires_at.is_not(None), f.c.expires_at <= at, f.c.id.not_in(in_use))
                .order_by(f.c.seq)
                .limit(limit)
            ).all()
        return [_file_record(r) for r in rows]

    def remove_file(self, file_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.files.delete().where(schema.files.c.id == file_id))

    def batches_to_archive(
        self, at: int, *, openai_after_end: int, anthropic_after_creation: int, limit: int = 100
    ) -> list[str]:
        """Ended, not yet archived batches whose retention has run out: OpenAI's a while after
        they ended, Anthropic's a while after creation (its results live 29 days)."""
        b = schema.batches
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        ended = func.coalesce(b.c.completed_at, b.c.failed_at, b.c.expired_at, b.c.cancelled_at)
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(b.c.id)
                    .where(
                        b.c.status.in_(terminal),
                        b.c.archived_at.is_(None),
                        ((b.c.surface == "openai") & (ended + openai_after_end <= at))
                        | (
                            (b.c.surface == "anthropic")
                            & (b.c.created_at + anthropic_after_creation <= at)
                        ),
                    )
                    .order_by(b.c.seq)
                    .limit(limit)
                ).scalars()
            )

    def archive_batch(self, batch_id: str, at: int) -> bool:
        """Drop the prompts and results of an ended batch, keeping each row's state (the
        counts are derived from it). Only an ended batch: the status is checked in the same
        transaction."""
        b, r = schema.batches, schema.requests
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(b)
                .where(b.c.id == batch_id, b.c.status.in_(terminal), b.c.archived_at.is_(None))
                .values(archived_at=at)
            ).rowcount
            if changed:
                conn.execute(
                    update(r).where(r.c.batch_id == batch_id).values(body=b"", result=None)
                )
        return bool(changed)

    # ------------------------------------------------------------ idempotency keys

    def claim_idempotency_key(
        self, tenant: str, scope: str, key: str, fingerprint: str, ttl_seconds: int
    ) -> IdempotencyClaim | None:
        """Claim ``key`` for a new create; None if claimed now. Otherwise the earlier claim
        (a key older than ``ttl_seconds`` is forgotten and can be claimed afresh). The
        primary key decides races: of two concurrent claims, exactly one inserts."""
        t = schema.idempotency_keys
        where = and_(t.c.tenant == tenant, t.c.scope == scope, t.c.key == key)
        created = now()
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(where, t.c.created_at < created - ttl_seconds))
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(t).values(
                        tenant=tenant,
                        scope=scope,
                        key=key,
                        fingerprint=fingerprint,
                        object_id=None,
                        created_at=created,
                    )
                )
            return None
        except IntegrityError:
            pass
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(where)).first()
        if row is None:  # released between our insert and this read: the caller may retry
            return IdempotencyClaim(fingerprint="", object_id=None, created_at=created)
        return IdempotencyClaim(row.fingerprint, row.object_id, row.created_at)

    def settle_idempotency_key(
        self, tenant: str, scope: str, key: str, object_id: str | None
    ) -> None:
        """Record the object the claim created, or (``None``) release a claim whose create
        failed, so that the client's retry with the same key can run."""
        t = schema.idempotency_keys
        where = and_(t.c.tenant == tenant, t.c.scope == scope, t.c.key == key)
        with self.engine.begin() as conn:
            if object_id is None:
                conn.execute(t.delete().where(where, t.c.object_id.is_(None)))
            else:
                conn.execute(update(t).where(where).values(object_id=object_id))

    def purge_idempotency_keys(self, older_than: int) -> int:
        t = schema.idempotency_keys
        with self.engine.begin() as conn:
            return int(conn.execute(t.delete().where(t.c.created_at < older_than)).rowcount)

    def has_unfinished(self, batch_id: str) -> bool:
        """Cheap (one index probe): does any request of the batch still need to run?"""
        r = schema.requests
        unfinished = [RequestState.PENDING.value, RequestState.RUNNING.value]
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(r.c.seq)
                    .where(r.c.batch_id == batch_id, r.c.state.in_(unfinished))
                    .limit(1)
                ).first()
                is not None
            )

    def counts(self, batch_id: str) -> RequestCounts:
        with self.engine.connect() as conn:
            return self._counts(conn, batch_id)

    def iter_finished(self, batch_id: str, chunk: int = 1000) -> Iterator[FinishedRow]:
        """Stream a batch's rows in input order, ``chunk`` at a time (keyset pagination)."""
        r = schema.requests
        last_line = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(r.c.line_no, r.c.custom_id, r.c.state, r.c.status_code, r.c.result)
                    .where(r.c.batch_id == batch_id, r.c.line_no > last_line)
                    .order_by(r.c.line_no)
                    .limit(chunk)
                ).all()
            if not rows:
                return
            for row in rows:
                yield FinishedRow(
                    line_no=row.line_no,
                    custom_id=row.custom_id,
                    state=RequestState(row.state),
                    status_code=row.status_code,
                    result=row.result,
                )
            last_line = rows[-1].line_no

    @staticmethod
    def _counts(conn: Any, batch_id: str) -> RequestCounts:
        r = schema.requests
        counts = RequestCounts()
        for state, count in conn.execute(
            select(r.c.state, func.count()).where(r.c.batch_id == batch_id).group_by(r.c.state)
        ):
            setattr(counts, state, count)
        return counts

    @staticmethod
    def _usage(conn: Any, batch_id: str) -> Usage:
        r = schema.requests
        row = conn.execute(
            select(
                func.coalesce(func.sum(r.c.prompt_tokens), 0),
                func.coalesce(func.sum(r.c.cached_tokens), 0),
                func.coalesce(func.sum(r.c.completion_tokens), 0),
            ).where(r.c.batch_id == batch_id, r.c.state == RequestState.SUCCEEDED.value)
        ).one()
        return Usage(input_tokens=row[0], cached_tokens=row[1], output_tokens=row[2])


def _file_values(record: FileRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "tenant": record.tenant,
        "filename": record.filename,
        "purpose": record.purpose,
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "blob": record.blob,
    }


def _file_record(row: Any) -> FileRecord:
    return FileRecord(
        id=row.id,
        tenant=row.tenant,
        filename=row.filename,
        purpose=row.purpose,
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        blob=row.blob,
    )


def _batch_record(row: Any) -> BatchRecord:
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
    )
