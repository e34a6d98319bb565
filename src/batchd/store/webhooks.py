"""Webhooks in the store: each tenant's endpoints, the outbox of deliveries, and the lease
that lets one process at a time send them.

The outbox is what makes delivery lose nothing: ``enqueue_batch_ended`` runs inside the
transaction that ends a batch (``BatchesMixin.transition`` and ``finalize``), so a batch is
never ended without its events written, and a crash at any point after the commit leaves the
rows for whichever process sends next. The event bodies are built here, beside the rows they
go in, because that transaction is here; their shape is OpenAI's webhook event (``{"id",
"object": "event", "type", "created_at", "data": {"id"}}``)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from batchd import ids
from batchd.store import schema
from batchd.store.records import BatchStatus

OPENAI_EVENTS = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}
ANTHROPIC_ENDED = "message_batch.ended"
EVENT_TYPES = (*OPENAI_EVENTS.values(), ANTHROPIC_ENDED)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def event_body(event_id: str, event_type: str, object_id: str, created_at: int) -> bytes:
    return orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": created_at,
            "data": {"id": object_id},
        }
    )


def _deliveries(conn: Connection, tenant: str, event_type: str, object_id: str, at: int) -> int:
    """One pending delivery per endpoint of ``tenant`` that asked for ``event_type``."""
    e = schema.webhook_endpoints
    endpoints = conn.execute(select(e.c.id, e.c.events).where(e.c.tenant == tenant)).all()
    wanted = [row.id for row in endpoints if event_type in orjson.loads(row.events)]
    if not wanted:
        return 0
    event_id = ids.webhook_event_id()
    payload = event_body(event_id, event_type, object_id, at)
    conn.execute(
        insert(schema.webhook_deliveries),
        [
            {
                "event_id": event_id,
                "endpoint_id": endpoint_id,
                "tenant": tenant,
                "type": event_type,
                "payload": payload,
                "created_at": at,
                "state": PENDING,
                "attempts": 0,
                "next_attempt_at": float(at),
            }
            for endpoint_id in wanted
        ],
    )
    return len(wanted)


def enqueue_batch_ended(conn: Connection, batch_id: str, status: BatchStatus, at: int) -> int:
    """In the caller's transaction, the one that ended the batch: its event for every endpoint
    of its tenant that wants it. OpenAI batches: ``batch.<status>``; Anthropic message batches:
    ``message_batch.ended``."""
    b = schema.batches
    row = conn.execute(select(b.c.tenant, b.c.surface).where(b.c.id == batch_id)).first()
    if row is None:
        return 0
    event_type = ANTHROPIC_ENDED if row.surface == "anthropic" else OPENAI_EVENTS.get(status)
    if event_type is None:
        return 0
    return _deliveries(conn, row.tenant, event_type, batch_id, at)


class WebhooksMixin:
    engine: Engine

    # ------------------------------------------------------------------ endpoints

    def create_webhook_endpoint(self, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(schema.webhook_endpoints).values(**values))

    def webhook_endpoints(
        self, tenant: str, *, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """The tenant's endpoints, newest first, a page after the endpoint ``after``."""
        e = schema.webhook_endpoints
        query = select(e).where(e.c.tenant == tenant).order_by(e.c.seq.desc()).limit(limit + 1)
        with self.engine.connect() as conn:
            if after is not None:
                cursor = conn.execute(
                    select(e.c.seq).where(e.c.id == after, e.c.tenant == tenant)
                ).scalar()
                if cursor is None:
                    return [], False
                query = query.where(e.c.seq < cursor)
            rows = conn.execute(query).mappings().all()
        return [dict(row) for row in rows[:limit]], len(rows) > limit

    def webhook_endpoint(self, tenant: str, endpoint_id: str) -> dict[str, Any] | None:
        e = schema.webhook_endpoints
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(e).where(e.c.id == endpoint_id, e.c.tenant == tenant))
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    def update_webhook_endpoint(
        self, tenant: str, endpoint_id: str, values: dict[str, Any]
    ) -> bool:
        e = schema.webhook_endpoints
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(e).where(e.c.id == endpoint_id, e.c.tenant == tenant).values(**values)
            ).rowcount
        return bool(changed)

    def record_test_delivery(
        self,
        tenant: str,
        endpoint_id: str,
        event_id: str,
        event_type: str,
        payload: bytes,
        *,
        at: float,
        delivered: bool,
        status: int | None,
        error: str | None,
    ) -> None:
        """A test event sent there and then: one attempt, recorded as a delivery that is not
        retried (the caller saw its outcome)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(schema.webhook_deliveries).values(
                    event_id=event_id,
                    endpoint_id=endpoint_id,
                    tenant=tenant,
                    type=event_type,
                    payload=payload,
                    created_at=int(at),
                    state=DELIVERED if delivered else FAILED,
                    attempts=1,
                    next_attempt_at=at,
                    last_attempt_at=at,
                    last_status=status,
                    last_error=error,
                    delivered_at=at if delivered else None,
                )
            )

    def delete_webhook_endpoint(self, tenant: str, endpoint_id: str) -> bool:
        """Remove the endpoint and the deliveries still owed to it."""
        e, d = schema.webhook_endpoints, schema.webhook_deliveries
        with self.engine.begin() as conn:
            changed = conn.execute(
                delete(e).where(e.c.id == endpoint_id, e.c.tenant == tenant)
            ).rowcount
            if changed:
                conn.execute(delete(d).where(d.c.endpoint_id == endpoint_id))
        return bool(changed)

    # ------------------------------------------------------------------ deliveries

    def webhook_deliveries(self, tenant: str, endpoint_id: str, limit: int) -> list[dict[str, Any]]:
        """The endpoint's deliveries, newest first (the payload left out)."""
        d = schema.webhook_deliveries
        columns = [c for c in d.c if c.name not in ("payload", "tenant")]
        query = (
            select(*columns)
            .where(d.c.endpoint_id == endpoint_id, d.c.tenant == tenant)
            .order_by(d.c.seq.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings().all()]

    def due_webhook_deliveries(self, at: float, limit: int) -> list[dict[str, Any]]:
        """Pending deliveries due by ``at``, soonest first, with their endpoint's url and
        secret (a delivery whose endpoint is gone is skipped: deleting removes both)."""
        d, e = schema.webhook_deliveries, schema.webhook_endpoints
        query = (
            select(
                d.c.seq,
                d.c.event_id,
                d.c.endpoint_id,
                d.c.payload,
                d.c.created_at,
                d.c.attempts,
                e.c.url,
                e.c.secret,
            )
            .select_from(d.join(e, e.c.id == d.c.endpoint_id))
            .where(d.c.state == PENDING, d.c.next_attempt_at <= at)
            .order_by(d.c.next_attempt_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings().all()]

    def record_webhook_attempt(
        self,
        seq: int,
        *,
        at: float,
        delivered: bool,
        status: int | None,
        error: str | None,
        retry_at: float | None,
    ) -> None:
        """One attempt's outcome: delivered; or pending again at ``retry_at``; or, with no
        ``retry_at``, failed for good."""
        d = schema.webhook_deliveries
        if delivered:
            state, next_at = DELIVERED, at
        elif retry_at is not None:
            state, next_at = PENDING, retry_at
        else:
            state, next_at = FAILED, at
        with self.engine.begin() as conn:
            conn.execute(
                update(d)
                .where(d.c.seq == seq)
                .values(
                    state=state,
                    attempts=d.c.attempts + 1,
                    last_attempt_at=at,
                    last_status=status,
                    last_error=error,
                    next_attempt_at=next_at,
                    delivered_at=at if delivered else None,
                )
            )

    # ------------------------------------------------------------------ one sender

    def hold_singleton(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the lease on job ``name`` for ``holder``: True while it is this
        holder's (free, expired, or its own), so one process at a time runs the job."""
        s = schema.singleton_leases
        at = time.time()
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    conn.execute(insert(s).values(name=name, holder=None, expires_at=0.0))
            except IntegrityError:
                pass  # the row exists already
            changed = conn.execute(
                update(s)
                .where(
                    s.c.name == name,
                    (s.c.holder == holder) | (s.c.holder.is_(None)) | (s.c.expires_at < at),
                )
                .values(holder=holder, expires_at=at + seconds)
            ).rowcount
        return bool(changed)
