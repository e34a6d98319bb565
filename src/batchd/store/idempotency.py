"""Idempotency keys: looking up what an earlier create with a key made, and recording a key
inside the transaction that writes the object it names (forgetting old keys is retention's)."""

from __future__ import annotations

from sqlalchemy import Connection, Engine, and_, insert, or_, select
from sqlalchemy.exc import IntegrityError

from batchd.clock import now
from batchd.errors import IdempotencyKeyTaken
from batchd.store import schema
from batchd.store.records import EarlierCreate, IdempotencyKey


def record_key(conn: Connection, idempotency: IdempotencyKey | None, object_id: str) -> None:
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


class IdempotencyMixin:
    engine: Engine

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
