"""Upstream limits held for a whole deployment, in the shared database: concurrency slots
leased like request rows, and rate buckets refilled by the clock.

With many processes (API replicas and workers on PostgreSQL), each one's own limiter would let
K processes send K times an upstream's ``max_concurrency`` and K times its requests and tokens
per minute. So every process also takes, for each attempt, one of the upstream's slot rows
(``holder`` + ``expires_at``, renewed while held, so a dead holder's slot comes back when its
lease lapses) and its share of the upstream's rate buckets, each updated in one statement that
refills the bucket for the time passed and takes the amount only if it is there. The engine
side (engines/openai_http/shared_limits.py) waits and retries when nothing is free.
"""

from __future__ import annotations

from sqlalchemy import Engine, and_, case, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from batchd.store import schema


class UpstreamBudgetMixin:
    engine: Engine

    # ------------------------------------------------------------- concurrency

    def ensure_upstream_slots(self, key: str, slots: int) -> None:
        """Slot rows 0..slots-1 for ``key`` (rows beyond are kept but never handed out)."""
        t = schema.upstream_slots
        with self.engine.begin() as conn:
            dialect_insert = (
                postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            )
            conn.execute(
                dialect_insert(t).on_conflict_do_nothing(index_elements=[t.c.key, t.c.slot]),
                [{"key": key, "slot": slot} for slot in range(slots)],
            )

    def acquire_upstream_slot(
        self, key: str, slots: int, holder: str, seconds: float, at: float
    ) -> int | None:
        """Take a free (or lapsed) slot of ``key`` below ``slots`` for ``holder`` until
        ``at + seconds``; its number, or None when all are held."""
        t = schema.upstream_slots
        free = and_(
            t.c.key == key,
            t.c.slot < slots,
            or_(t.c.holder.is_(None), t.c.expires_at < at),
        )
        with self.engine.begin() as conn:
            pick = select(t.c.slot).where(free).order_by(t.c.slot).limit(1)
            if conn.dialect.name == "postgresql":
                # Another process's pick is skipped, not waited for.
                pick = pick.with_for_update(skip_locked=True)
            slot = conn.execute(pick).scalar()
            if slot is None:
                return None
            taken = conn.execute(
                update(t)
                .where(free, t.c.slot == slot)
                .values(holder=holder, expires_at=at + seconds)
            ).rowcount
            return int(slot) if taken else None

    def release_upstream_slot(self, key: str, slot: int, holder: str) -> None:
        t = schema.upstream_slots
        with self.engine.begin() as conn:
            conn.execute(
                update(t)
                .where(t.c.key == key, t.c.slot == slot, t.c.holder == holder)
                .values(holder=None, expires_at=None)
            )

    def renew_upstream_slots(self, holder: str, until: float) -> int:
        """Push back the lease of every slot ``holder`` holds; how many it holds."""
        t = schema.upstream_slots
        with self.engine.begin() as conn:
            return conn.execute(
                update(t).where(t.c.holder == holder).values(expires_at=until)
            ).rowcount

    # ------------------------------------------------------------------- rates

    def take_upstream_rate(
        self, key: str, amount: float, capacity: float, per_second: float, at: float
    ) -> float:
        """Take ``amount`` from the bucket ``key`` (``capacity`` at most, refilled at
        ``per_second``): 0 when taken, else the seconds until it would be there."""
        t = schema.upstream_rates
        with self.engine.begin() as conn:
            dialect_insert = (
                postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            )
            conn.execute(
                dialect_insert(t)
                .values(key=key, level=capacity, updated_at=at)
                .on_conflict_do_nothing(index_elements=[t.c.key])
            )
            refilled = t.c.level + (at - t.c.updated_at) * per_second
            level = case((refilled > capacity, capacity), else_=refilled)
            taken = conn.execute(
                update(t)
                .where(t.c.key == key, level >= amount)
                .values(level=level - amount, updated_at=at)
            ).rowcount
            if taken:
                return 0.0
            now_level = conn.execute(select(level).where(t.c.key == key)).scalar()
        missing = amount - float(now_level or 0.0)
        return max(0.001, missing / per_second) if per_second > 0 else 60.0

    def adjust_upstream_rate(self, key: str, amount: float, capacity: float) -> None:
        """Give ``amount`` back to the bucket (positive: an over-estimate refunded, never
        beyond ``capacity``) or charge it (negative: usage beyond the estimate, as debt)."""
        t = schema.upstream_rates
        adjusted = t.c.level + amount
        with self.engine.begin() as conn:
            conn.execute(
                update(t)
                .where(t.c.key == key)
                .values(level=case((adjusted > capacity, capacity), else_=adjusted))
            )
