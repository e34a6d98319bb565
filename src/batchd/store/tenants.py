"""What fair share reads and writes per tenant: weights, and the engine tokens and rows each
tenant's batch work finished lately (see fair_share.py for how leasing uses them)."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from batchd.clock import now
from batchd.store import schema
from batchd.store.fair_share import BUCKET_SECONDS, Recent, Usage

# Usage older than this is deleted (any fair-share window is shorter).
USAGE_KEPT_SECONDS = 3600


def add_usage(conn: Connection, usage: Mapping[str, Usage], at: int) -> None:
    """Add finished work to each tenant's bucket of ``at``, in the caller's transaction.
    Tenants are written in name order, so concurrent workers lock their rows in one order."""
    t = schema.tenant_usage
    bucket = at - at % BUCKET_SECONDS
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    for tenant in sorted(usage):
        used = usage[tenant]
        statement = dialect_insert(t).values(
            tenant=tenant, bucket=bucket, tokens=used.tokens, rows=used.rows
        )
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[t.c.tenant, t.c.bucket],
                set_={
                    "tokens": t.c.tokens + statement.excluded.tokens,
                    "rows": t.c.rows + statement.excluded.rows,
                },
            )
        )


def recent_usage(conn: Connection, window: int, at: int) -> tuple[dict[str, Usage], float]:
    """Each tenant's usage over the last ``window`` seconds, and the seconds it covers (from
    the oldest bucket in the window, so a deployment that just started is not taken for a
    slow one)."""
    t = schema.tenant_usage
    since = at - window
    rows = conn.execute(
        select(t.c.tenant, func.sum(t.c.tokens), func.sum(t.c.rows), func.min(t.c.bucket))
        .where(t.c.bucket >= since - since % BUCKET_SECONDS)
        .group_by(t.c.tenant)
    ).all()
    if not rows:
        return {}, 0.0
    oldest = min(int(row[3]) for row in rows)
    usage = {row[0]: Usage(tokens=int(row[1] or 0), rows=int(row[2] or 0)) for row in rows}
    return usage, float(max(BUCKET_SECONDS, at - oldest))


def running_by_tenant(conn: Connection, batch_ids: list[str]) -> dict[str, int]:
    """Rows in flight per tenant, among ``batch_ids``."""
    b, r = schema.batches, schema.requests
    rows = conn.execute(
        select(b.c.tenant, func.count())
        .select_from(r.join(b, b.c.id == r.c.batch_id))
        .where(r.c.batch_id.in_(batch_ids), r.c.state == "running")
        .group_by(b.c.tenant)
    ).all()
    return {row[0]: int(row[1]) for row in rows}


def recent(conn: Connection, batch_ids: list[str], window: int, at: int) -> Recent:
    usage, seconds = recent_usage(conn, window, at)
    return Recent(usage=usage, running=running_by_tenant(conn, batch_ids), seconds=seconds)


class TenantsMixin:
    engine: Engine

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Make ``weights`` the whole table (a tenant left out weighs the default again)."""
        t = schema.tenant_weights
        with self.engine.begin() as conn:
            conn.execute(delete(t))
            if weights:
                conn.execute(
                    t.insert(), [{"tenant": k, "weight": float(v)} for k, v in weights.items()]
                )

    def tenant_weights(self) -> dict[str, float]:
        t = schema.tenant_weights
        with self.engine.connect() as conn:
            return {row.tenant: float(row.weight) for row in conn.execute(select(t))}

    def tenant_usage(self, window: int) -> dict[str, Usage]:
        """Each tenant's finished batch work over the last ``window`` seconds."""
        with self.engine.connect() as conn:
            return recent_usage(conn, window, now())[0]

    def prune_tenant_usage(self) -> int:
        """Delete usage buckets older than any window reads."""
        t = schema.tenant_usage
        with self.engine.begin() as conn:
            return conn.execute(delete(t).where(t.c.bucket < now() - USAGE_KEPT_SECONDS)).rowcount
