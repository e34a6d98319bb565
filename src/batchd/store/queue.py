"""The request queue: a batch's rows inserted under its validation claim, leased to workers in
prompt-prefix order, kept by heartbeats, and completed, released or ended.

Request rows move ``pending -> running -> succeeded | errored | canceled | expired``. Results
are written only by the current lease holder: owner and epoch are in the WHERE clause, so a
worker whose lease lapsed and was taken over writes nothing (the statement reports False).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, func, insert, or_, select, text, update
from sqlalchemy.sql.elements import TextClause

from batchd.clock import now
from batchd.store import fair_share, schema, tenants
from batchd.store.records import (
    BatchStatus,
    FinishedRow,
    LeasedRequest,
    RequestLine,
    RequestOutcome,
    RequestState,
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
    RETURNING seq, batch_id, line_no, prefix_key, custom_id, body, lease_epoch, upstream_attempts
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


class QueueMixin:
    engine: Engine

    # ------------------------------------------------------------ filling the queue

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

    def delete_requests(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.requests.delete().where(schema.requests.c.batch_id == batch_id))

    # ---------------------------------------------------------------------- leases

    def lease(
        self,
        owner: str,
        n: int,
        lease_seconds: int,
        skip_models: Iterable[str] = (),
        share_window: int = 300,
    ) -> list[LeasedRequest]:
        """Claim up to ``n`` pending rows, shared across tenants by fair_share.plan (deadlines
        at risk first, then each tenant by weight in tokens over the last ``share_window``
        seconds, then a tenant's batches by deadline); within a batch, rows sharing a prompt
        prefix together, in input order."""
        if n <= 0:
            return []
        b, r = schema.batches, schema.requests
        at = now()
        with self.engine.connect() as conn:  # read apart: the claim below starts by writing
            rows_in_order = conn.execute(
                select(b.c.id, b.c.tenant, b.c.endpoint, b.c.expires_at)
                .where(
                    b.c.status == BatchStatus.IN_PROGRESS.value,
                    select(r.c.seq)
                    .where(r.c.batch_id == b.c.id, r.c.state == RequestState.PENDING.value)
                    .exists(),
                )
                .order_by(b.c.expires_at, b.c.id)
            ).all()
            if not rows_in_order:
                return []
            batches = {row.id: row for row in rows_in_order}
            order = [(row.id, n) for row in rows_in_order]
            if len({row.tenant for row in rows_in_order}) > 1:
                # Several tenants wait: share the slice (one tenant's batches simply go in
                # deadline order, which is what the plan would say, without its reads).
                order = self._share(conn, rows_in_order, n, share_window, at)
        params: dict[str, Any] = {"owner": owner, "expires": at + lease_seconds}
        skip = sorted(set(skip_models))
        if skip:
            params["skip"] = skip
        rank = {batch_id: position for position, (batch_id, _) in enumerate(order)}
        rows: list[Any] = []
        with self.engine.begin() as conn:
            statement = _LEASE_SQL[conn.dialect.name, bool(skip)]

            def claim(batch_id: str, wanted: int) -> None:
                if wanted > 0:
                    rows.extend(
                        conn.execute(statement, {**params, "batch_id": batch_id, "n": wanted})
                    )

            for batch_id, share in order:
                claim(batch_id, min(share, n - len(rows)))
            # Rows the plan counted on but could not claim (their model is skipped, or
            # another worker took them first) go to whoever has runnable rows left.
            for batch_id in batches:
                claim(batch_id, n - len(rows))
        # RETURNING order is unspecified: put the slice back in scheduling order (the plan's,
        # then prompt prefix, then input order), the order the engine should start it in.
        rows.sort(
            key=lambda row: (rank.get(row.batch_id, len(rank)), row.prefix_key or "", row.line_no)
        )
        return [
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
                tenant=batches[row.batch_id].tenant,
            )
            for row in rows
        ]

    @staticmethod
    def _share(
        conn: Connection, candidates: Sequence[Any], n: int, window: int, at: int
    ) -> list[tuple[str, int]]:
        """fair_share.plan over what the database says now: pending rows per batch, each
        tenant's recent usage and running rows, and the weights."""
        r = schema.requests
        ids = [row.id for row in candidates]
        pending = {
            row[0]: int(row[1])
            for row in conn.execute(
                select(r.c.batch_id, func.count())
                .where(r.c.batch_id.in_(ids), r.c.state == RequestState.PENDING.value)
                .group_by(r.c.batch_id)
            )
        }
        weights = {
            row.tenant: float(row.weight) for row in conn.execute(select(schema.tenant_weights))
        }
        return fair_share.plan(
            n,
            [
                fair_share.Candidate(row.id, row.tenant, row.expires_at, pending.get(row.id, 0))
                for row in candidates
            ],
            weights,
            tenants.recent(conn, ids, window, at),
            at,
        )

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

    # ------------------------------------------------------------- ending rows

    def complete(self, leased: LeasedRequest, owner: str, outcome: RequestOutcome) -> bool:
        """Write a leased row's result and make it final, if ``owner`` still holds that lease."""
        return self.complete_many([(leased, outcome)], owner)[0]

    def complete_many(
        self, finished: Sequence[tuple[LeasedRequest, RequestOutcome]], owner: str
    ) -> list[bool]:
        """``complete`` for many rows in one transaction (one commit, so one fsync, however
        many rows): each row is fenced on its own lease, and the answer says, row by row,
        whether it was still ``owner``'s and so written."""
        r = schema.requests
        finished_at = now()
        written: list[bool] = []
        usage: dict[str, fair_share.Usage] = {}  # what each tenant's rows used, for its share
        with self.engine.begin() as conn:
            for leased, outcome in finished:
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
                        finished_at=finished_at,
                        lease_owner=None,
                        lease_expires_at=None,
                    )
                ).rowcount
                written.append(bool(changed))
                if changed and leased.tenant:
                    used = usage.setdefault(leased.tenant, fair_share.Usage())
                    used.rows += 1
                    used.tokens += (
                        max(0, outcome.prompt_tokens - outcome.cached_tokens)
                        + outcome.completion_tokens
                    )
            if usage:
                tenants.add_usage(conn, usage, finished_at)
        return written

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

    def iter_finished(self, batch_id: str, chunk: int = 1000) -> Iterator[FinishedRow]:
        """Stream a batch's rows in input order, ``chunk`` at a time (keyset pagination),
        each read on a connection of its own so a slow consumer holds none open."""
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
