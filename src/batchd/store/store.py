"""Every database operation batchd performs, as named methods over SQLAlchemy Core.

Transitions name their legal "from" states in the UPDATE itself and report whether a row
changed: zero rows means somebody else got there first, which callers treat as a conflict.
Results are written only by the current lease holder (owner and epoch in the WHERE clause).
"""

from __future__ import annotations

import contextlib
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import Engine, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import TextClause

from batchd import failpoints
from batchd.clock import now
from batchd.errors import IdempotencyKeyTaken
from batchd.protocol.batch_file import RequestLine
from batchd.store import poll_reads, schema
from batchd.store.records import (
    TERMINAL_BATCH_STATUSES,
    BatchRecord,
    BatchStatus,
    EarlierCreate,
    FileRecord,
    FinishedRow,
    IdempotencyKey,
    LeasedRequest,
    RequestCounts,
    RequestOutcome,
    RequestState,
    Usage,
)

# One batch's next pending rows in prompt-prefix order: a range of the (batch_id, state,
# prefix_key, line_no) index, however deep the queue. Leasing walks the batches with pending
# rows in deadline order and runs this for each until the slice is full (ordering every
# pending row of every batch by deadline in one query cost 190 ms on SQLite and 420 ms on
# PostgreSQL per lease with 100,000 rows queued: bench/bench_queue.py).
_LEASE_TEMPLATE = """
    UPDATE requests
       SET state = 'running', lease_owner = :owner, lease_expires_at = :expires,
           lease_epoch = lease_epoch + 1, attempts = attempts + 1
     WHERE seq IN (
           SELECT r.seq FROM requests r JOIN batches b ON b.id = r.batch_id
            WHERE r.batch_id = :batch_id AND r.state = 'pending'
              AND b.status = 'in_progress' {skip}
            ORDER BY r.prefix_key, r.line_no
            LIMIT :n {lock})
    RETURNING seq, batch_id, line_no, custom_id, body, lease_epoch, upstream_attempts
    """
# PostgreSQL, many workers: each claims a slice of rows no other worker has locked, instead
# of queueing behind the first claimer's row locks and then finding its rows taken. SQLite
# has one writer at a time anyway.
_ROW_LOCKS = {"postgresql": "FOR UPDATE OF r SKIP LOCKED"}
# Models whose engine is full or whose upstream is down are skipped, so their queue cannot
# take every slot from other models' batches (rows from before the model column: NULL).
_SKIP_MODELS = "AND (r.model IS NULL OR r.model NOT IN :skip)"


def _lease_sql(dialect: str, skipping: bool) -> TextClause:
    statement = text(
        _LEASE_TEMPLATE.format(
            skip=_SKIP_MODELS if skipping else "", lock=_ROW_LOCKS.get(dialect, "")
        )
    )
    return statement.bindparams(bindparam("skip", expanding=True)) if skipping else statement


_LEASE_SQL = {
    (dialect, skipping): _lease_sql(dialect, skipping)
    for dialect in ("sqlite", "postgresql")
    for skipping in (False, True)
}


def _still_leased(leased: LeasedRequest, owner: str) -> tuple[Any, ...]:
    """The fence: the row is still running under this owner's lease of this epoch."""
    r = schema.requests
    return (
        r.c.seq == leased.seq,
        r.c.state == RequestState.RUNNING.value,
        r.c.lease_owner == owner,
        r.c.lease_epoch == leased.epoch,
    )


# Transaction advisory locks serializing one tenant's admissions (the two-int form: its keys
# never meet the single-bigint lock the migrations take).
_TENANT_LOCK_SPACE = 20261201


# Session advisory locks held while one worker writes a batch's result files.
_FINALIZE_LOCK_SPACE = 20261202


def _advisory_key(name: str) -> int:
    """A stable signed 32-bit key for an advisory lock on ``name``."""
    unsigned = zlib.crc32(name.encode())
    return unsigned - (1 << 32) if unsigned >= 1 << 31 else unsigned


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reads = poll_reads.ReadConnections(engine)
        self._ended_stats = _EndedStats()
        self._recent_stats = _RecentStats()

    # ---------------------------------------------------------------- files

    def create_file(self, record: FileRecord, idempotency: IdempotencyKey | None = None) -> None:
        """Insert a file row, and its create's idempotency key in the same transaction."""
        with self.engine.begin() as conn:
            _record_idempotency_key(conn, idempotency, record.id)
            conn.execute(insert(schema.files).values(**_file_values(record)))
            failpoints.hit("create_file.before_commit")

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

    def batch_validating_file(self, tenant: str, file_id: str) -> str | None:
        """The id of a batch still reading ``file_id`` (status validating), if any."""
        t = schema.batches
        with self.engine.connect() as conn:
            return conn.execute(
                select(t.c.id)
                .where(
                    t.c.tenant == tenant,
                    t.c.input_file_id == file_id,
                    t.c.status == BatchStatus.VALIDATING.value,
                )
                .limit(1)
            ).scalar()

    def all_blob_names(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(schema.files.c.blob)).scalars())

    # -------------------------------------------------------------- batches

    def create_batch(self, values: dict[str, Any]) -> None:
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
        record = _batch_record(rows[0])
        self._attach_stats([record], stats_max_age)
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
        records = [_batch_record(r) for r in page]
        self._attach_stats(records, stats_max_age)
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

    @contextlib.contextmanager
    def finalize_lock(self, batch_id: str) -> Iterator[bool]:
        """Whether this process may finalize ``batch_id`` now. On PostgreSQL: a session
        advisory lock on the batch, held on a connection of its own for the whole finalize,
        so the workers that all see a batch's last rows finish do not each write its result
        files (the commit in ``finalize`` stays the exactly-once guarantee); a finalizer that
        dies drops the lock with its connection. SQLite has one worker: always True."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        params = {"space": _FINALIZE_LOCK_SPACE, "key": _advisory_key(batch_id)}
        conn = self.engine.connect()
        try:
            held = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:space, :key)"), params).scalar()
            )
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:space, :key)"), params)
                    conn.commit()
        except BaseException:
            conn.invalidate()  # never hand a connection that may still hold the lock back
            raise
        finally:
            conn.close()

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

    def claim_validation(self, batch_id: str, owner: str, seconds: int) -> bool:
        """Claim (or renew) the right to validate a batch: granted when nobody holds it, its
        holder's claim lapsed, or ``owner`` holds it already. With many workers, exactly one
        turns a file into rows; a worker that died mid-way is replaced once its claim lapses."""
        t = schema.batches
        at = now()
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(t)
                    .where(
                        t.c.id == batch_id,
                        t.c.status == BatchStatus.VALIDATING.value,
                        or_(
                            t.c.claim_owner.is_(None),
                            t.c.claim_owner == owner,
                            t.c.claim_expires_at < at,
                        ),
                    )
                    .values(claim_owner=owner, claim_expires_at=at + seconds)
                ).rowcount
            )

    def insert_requests(
        self,
        batch_id: str,
        lines: Sequence[RequestLine],
        claim: tuple[str, int] | None = None,
    ) -> bool:
        """Insert a chunk of a batch's rows. With ``claim`` (owner, seconds), only while that
        owner still holds the batch's validation claim, renewed in the same transaction: a
        worker whose claim lapsed and was taken over inserts nothing (False)."""
        if not lines:
            return True
        with self.engine.begin() as conn:
            if claim is not None:
                t = schema.batches
                held = conn.execute(
                    update(t)
                    .where(
                        t.c.id == batch_id,
                        t.c.status == BatchStatus.VALIDATING.value,
                        t.c.claim_owner == claim[0],
                    )
                    .values(claim_expires_at=now() + claim[1])
                ).rowcount
                if not held:
                    return False
            conn.execute(
                insert(schema.requests),
                [
                    {
                        "batch_id": batch_id,
                        "line_no": line.line_no,
                        "custom_id": line.custom_id,
                        "body": line.body,
                        "prefix_key": line.prefix_key,
                        "model": line.model,
                        "state": RequestState.PENDING.value,
                        "attempts": 0,
                        "lease_epoch": 0,
                    }
                    for line in lines
                ],
            )
        return True

    def orphan_request_batch_ids(self, limit: int = 100) -> list[str]:
        """Batch ids that request rows name but no batch row has: what a message batch create
        killed between inserting its rows and its batch row left behind (or one running now)."""
        r, b = schema.requests, schema.batches
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(r.c.batch_id)
                    .where(~select(b.c.id).where(b.c.id == r.c.batch_id).exists())
                    .distinct()
                    .limit(limit)
                ).scalars()
            )

    def delete_requests(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.requests.delete().where(schema.requests.c.batch_id == batch_id))

    def lease(
        self, owner: str, n: int, lease_seconds: int, skip_models: Iterable[str] = ()
    ) -> list[LeasedRequest]:
        """Claim up to ``n`` pending rows: the earliest deadline's batch first, within a
        batch rows sharing a prompt prefix together, in input order."""
        if n <= 0:
            return []
        b, r = schema.batches, schema.requests
        with self.engine.connect() as conn:  # read apart: the claim below starts by writing
            candidates = conn.execute(
                select(b.c.id, b.c.endpoint, b.c.expires_at)
                .where(
                    b.c.status == BatchStatus.IN_PROGRESS.value,
                    select(r.c.seq)
                    .where(r.c.batch_id == b.c.id, r.c.state == RequestState.PENDING.value)
                    .exists(),
                )
                .order_by(b.c.expires_at, b.c.id)
            ).all()
        if not candidates:
            return []
        params: dict[str, Any] = {"owner": owner, "expires": now() + lease_seconds}
        skip = sorted(set(skip_models))
        if skip:
            params["skip"] = skip
        batches = {row.id: row for row in candidates}
        rows: list[Any] = []
        with self.engine.begin() as conn:
            statement = _LEASE_SQL[conn.dialect.name, bool(skip)]
            for batch in candidates:
                wanted = n - len(rows)
                if wanted <= 0:
                    break
                rows += conn.execute(statement, {**params, "batch_id": batch.id, "n": wanted})
        leased = [
            LeasedRequest(
                seq=row.seq,
                batch_id=row.batch_id,
                line_no=row.line_no,
                custom_id=row.custom_id,
                body=row.body,
                epoch=row.lease_epoch,
                endpoint=batches[row.batch_id].endpoint,
                expires_at=batches[row.batch_id].expires_at,
                upstream_attempts=row.upstream_attempts,
            )
            for row in rows
        ]
        # RETURNING order is unspecified; keep the scheduling order.
        leased.sort(key=lambda item: (item.batch_id, item.line_no))
        return leased

    def renew_leases(self, owner: str, lease_seconds: int) -> int:
        """The heartbeat: push back the expiry of every lease ``owner`` holds; returns how
        many rows it still holds."""
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(r.c.state == RequestState.RUNNING.value, r.c.lease_owner == owner)
                .values(lease_expires_at=now() + lease_seconds)
            ).rowcount

    def held_leases(self, owner: str) -> set[tuple[int, int]]:
        """(seq, epoch) of every row running under ``owner``'s lease."""
        r = schema.requests
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(r.c.seq, r.c.lease_epoch).where(
                    r.c.state == RequestState.RUNNING.value, r.c.lease_owner == owner
                )
            )
            return {(row.seq, row.lease_epoch) for row in rows}

    def release_owned(self, owner: str) -> int:
        """Return ``owner``'s running rows to the queue at once (a worker stopping cleanly),
        rather than leaving them for the sweeper after their lease lapses."""
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(r.c.state == RequestState.RUNNING.value, r.c.lease_owner == owner)
                .values(state=RequestState.PENDING.value, lease_owner=None, lease_expires_at=None)
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
                .where(*_still_leased(leased, owner))
                .values(
                    state=outcome.state.value,
                    status_code=outcome.status_code,
                    result=outcome.result,
                    prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cached_tokens=outcome.cached_tokens,
                    upstream_attempts=outcome.upstream_attempts,
                    finished_at=now(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
        return bool(changed)

    def release(self, leased: LeasedRequest, owner: str, upstream_attempts: int) -> bool:
        """Give a running row back to the queue unfinished (its upstream is failing and the
        deadline allows another try later), keeping the count of attempts made so far."""
        r = schema.requests
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(r)
                .where(*_still_leased(leased, owner))
                .values(
                    state=RequestState.PENDING.value,
                    upstream_attempts=upstream_attempts,
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

    def end_running(self, batch_id: str, state: RequestState, owner: str) -> int:
        """Mark ``owner``'s running requests of a batch ended (it stopped them). Only its own:
        another worker's rows are ended by that worker when it sees the cancel or the expiry
        and stops its tasks, and a dead worker's rows by the sweep that requeues them, so no
        engine keeps generating for a request whose row was ended behind its back."""
        r = schema.requests
        with self.engine.begin() as conn:
            return conn.execute(
                update(r)
                .where(
                    r.c.batch_id == batch_id,
                    r.c.state == RequestState.RUNNING.value,
                    r.c.lease_owner == owner,
                )
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

        The count and the insert are one transaction that holds the tenant's lock (on
        PostgreSQL a transaction-scoped advisory lock keyed on the tenant; on SQLite
        ``BEGIN IMMEDIATE``, the database's one writer lock), so two creates racing each other
        cannot both pass on the same room. The rows of ``values``' batch, if already
        inserted, are not counted: rows count once their batch row exists. ``idempotency``:
        the create's key, recorded in the same transaction (IdempotencyKeyTaken if another
        create recorded it first: then nothing is written)."""
        tenant = str(values["tenant"])
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:space, :key)"),
                    {"space": _TENANT_LOCK_SPACE, "key": _advisory_key(tenant)},
                )
            else:
                # pysqlite opens its transaction lazily, at the first write: take the write
                # lock now, before counting, so the count cannot go stale before the insert.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            b, r = schema.batches, schema.requests
            terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
            unfinished = [RequestState.PENDING.value, RequestState.RUNNING.value]
            active = select(b.c.id).where(b.c.tenant == tenant, b.c.status.not_in(terminal))
            active_count = conn.execute(
                select(func.count()).select_from(active.subquery())
            ).scalar_one()
            queued = conn.execute(
                select(func.count())
                .select_from(r)
                .where(r.c.batch_id.in_(active), r.c.state.in_(unfinished))
            ).scalar_one()
            if active_count >= max_active or queued + max(adding_requests, 1) > max_queued:
                return int(active_count), int(queued)
            _record_idempotency_key(conn, idempotency, str(values["id"]))
            conn.execute(insert(b).values(**values))
            failpoints.hit("create_batch.before_commit")
        return None

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

    def find_idempotency_key(
        self, tenant: str, scope: str, key: str, ttl_seconds: int
    ) -> EarlierCreate | None:
        """The object an earlier create with this key made, unless the key is older than
        ``ttl_seconds`` (then it is forgotten) or was never used."""
        t = schema.idempotency_keys
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.c.fingerprint, t.c.object_id, t.c.created_at).where(
                    t.c.tenant == tenant,
                    t.c.scope == scope,
                    t.c.key == key,
                    t.c.object_id.is_not(None),
                    t.c.created_at >= now() - ttl_seconds,
                )
            ).first()
        return EarlierCreate(row.fingerprint, row.object_id, row.created_at) if row else None

    def purge_idempotency_keys(self, older_than: int) -> int:
        t = schema.idempotency_keys
        with self.engine.begin() as conn:
            return int(conn.execute(t.delete().where(t.c.created_at < older_than)).rowcount)

    def request_state_counts(self) -> dict[str, int]:
        """Requests per state over the whole database (the metrics' queue depth)."""
        r = schema.requests
        with self.engine.connect() as conn:
            rows = conn.execute(select(r.c.state, func.count()).group_by(r.c.state)).all()
        counts = {state.value: 0 for state in RequestState}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    def batch_status_counts(self) -> dict[str, int]:
        b = schema.batches
        with self.engine.connect() as conn:
            rows = conn.execute(select(b.c.status, func.count()).group_by(b.c.status)).all()
        return {str(status): int(n) for status, n in rows}

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
        counts = RequestCounts()
        for row in conn.execute(_STATS_OF_BATCHES, {"batch_ids": [batch_id]}):
            setattr(counts, row.state, row.n)
        return counts

    def _attach_stats(self, records: list[BatchRecord], max_age: float = 0.0) -> None:
        """Fill in each record's request counts and token usage: from the cache for ended
        batches; for running ones, from a count at most ``max_age`` seconds old taken while
        the batch had the same status; and for the rest from one grouped query over all of
        them (a page of 20 batches is one query, not 40), on a pooled connection."""
        missing: dict[str, BatchRecord] = {}
        for record in records:
            cached = self._ended_stats.get(record.id)
            if cached is None and max_age > 0:
                cached = self._recent_stats.get(record.id, record.status, max_age)
            if cached is None:
                missing[record.id] = record
            else:
                record.counts, record.usage = (
                    poll_reads.copied(cached[0]),
                    poll_reads.copied(cached[1]),
                )
        if not missing:
            return
        for record in missing.values():
            record.counts, record.usage = RequestCounts(), Usage()
        with self.engine.connect() as conn:
            rows = conn.execute(_STATS_OF_BATCHES, {"batch_ids": list(missing)}).all()
        for row in rows:
            record = missing[row.batch_id]
            setattr(record.counts, row.state, row.n)
            if row.state == RequestState.SUCCEEDED.value:
                record.usage = Usage(
                    input_tokens=row.prompt, cached_tokens=row.cached, output_tokens=row.completion
                )
        for record in missing.values():
            item = (poll_reads.copied(record.counts), poll_reads.copied(record.usage))
            if record.status in TERMINAL_BATCH_STATUSES:
                self._ended_stats.put(record.id, item)
            else:
                self._recent_stats.put(record.id, record.status, item)


class _EndedStats:
    """Counts and usage of ended batches, which never change again (archiving empties a
    row's body and result but keeps its state and token counts). Pollers of a finished batch,
    and every list page, then cost no aggregate query. Bounded, least recently used out;
    per process, and safe across processes because the cached values are final."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[RequestCounts, Usage]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, batch_id: str) -> tuple[RequestCounts, Usage] | None:
        with self._lock:
            item = self._items.get(batch_id)
            if item is not None:
                self._items.move_to_end(batch_id)
            return item

    def put(self, batch_id: str, item: tuple[RequestCounts, Usage]) -> None:
        with self._lock:
            self._items[batch_id] = item
            self._items.move_to_end(batch_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class _RecentStats:
    """Counts and usage of running batches, each with when it was counted and the batch's
    status then. Counting a batch of 50,000 rows costs ~15 ms of CPU, so 200 clients polling
    it every second would take a core; with this they share one count per ``max_age``. A count
    is reused only while the batch keeps the status it had, so a batch never shows ``completed``
    (or any new status) with the counts of an earlier one. Bounded, least recently used out."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[float, BatchStatus, tuple[RequestCounts, Usage]]]
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, batch_id: str, status: BatchStatus, max_age: float
    ) -> tuple[RequestCounts, Usage] | None:
        with self._lock:
            entry = self._items.get(batch_id)
            if entry is None:
                return None
            counted_at, counted_status, item = entry
            if counted_status != status or time.monotonic() - counted_at > max_age:
                return None
            self._items.move_to_end(batch_id)
            return item

    def put(self, batch_id: str, status: BatchStatus, item: tuple[RequestCounts, Usage]) -> None:
        with self._lock:
            self._items[batch_id] = (time.monotonic(), status, item)
            self._items.move_to_end(batch_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


# One grouped scan of the (batch_id, state, tokens...) index gives counts per state and, for
# the succeeded rows, token usage, without reading the rows. Built once: constructing a statement per call cost more CPU
# than running it (measured with py-spy under 200 pollers).
_R = schema.requests
_STATS_OF_BATCHES = (
    select(
        _R.c.batch_id,
        _R.c.state,
        func.count().label("n"),
        func.coalesce(func.sum(_R.c.prompt_tokens), 0).label("prompt"),
        func.coalesce(func.sum(_R.c.cached_tokens), 0).label("cached"),
        func.coalesce(func.sum(_R.c.completion_tokens), 0).label("completion"),
    )
    .where(_R.c.batch_id.in_(bindparam("batch_ids", expanding=True)))
    .group_by(_R.c.batch_id, _R.c.state)
)


def _record_idempotency_key(conn: Any, idempotency: IdempotencyKey | None, object_id: str) -> None:
    """Write ``idempotency`` naming ``object_id`` inside the caller's transaction, which also
    writes the object: both commit or neither does. The primary key decides races: of two
    creates with one key, the second's insert fails (on PostgreSQL it waits for the first's
    commit) and IdempotencyKeyTaken rolls its whole transaction back. A row past its TTL, or
    a claim with no object left by an older version that crashed, is replaced."""
    if idempotency is None:
        return
    t = schema.idempotency_keys
    created = now()
    same_key = and_(
        t.c.tenant == idempotency.tenant, t.c.scope == idempotency.scope, t.c.key == idempotency.key
    )
    conn.execute(
        t.delete().where(
            same_key,
            or_(t.c.object_id.is_(None), t.c.created_at < created - idempotency.ttl_seconds),
        )
    )
    try:
        conn.execute(
            insert(t).values(
                tenant=idempotency.tenant,
                scope=idempotency.scope,
                key=idempotency.key,
                fingerprint=idempotency.fingerprint,
                object_id=object_id,
                created_at=created,
            )
        )
    except IntegrityError:
        raise IdempotencyKeyTaken(idempotency.key) from None


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
