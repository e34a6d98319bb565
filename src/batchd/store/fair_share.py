"""Which batches the next lease slice comes from: weighted fair share across tenants, with
deadlines that are at risk served first.

A lease slice of ``n`` rows is planned from what the database says right now, so any worker
of a deployment (SQLite alone, or many on PostgreSQL) plans the same way and no worker keeps
state of its own:

1. **Deadlines at risk first.** Walking every batch with pending rows in deadline order, a
   batch is at risk when the rows up to and including its own no longer fit before its
   deadline at the rate the deployment finished rows lately (earliest deadline first is the
   order that meets the most deadlines, so that is the order they are served in).
2. **Then each tenant in proportion to its weight, measured in tokens.** A tenant's load is
   the engine tokens its rows used in the recent window (uncached prompt + completion), plus
   its rows running now at its own tokens-per-row. Each row of the slice goes to the tenant
   whose load over weight is smallest, which then carries that row's expected tokens. A
   tenant alone gets every row; a tenant that queued 2,000 rows does not make one that
   queued 20 wait behind them; a tenant of weight 2 gets twice the tokens of weight 1.
3. **Within a tenant, its batches in deadline order**, and within a batch (the lease query's
   job) rows sharing a prompt prefix together, so a prefix is still computed once.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_WEIGHT = 1.0
# Usage is kept in buckets of this many seconds (one row per tenant per bucket).
BUCKET_SECONDS = 10


@dataclass(frozen=True, slots=True)
class Candidate:
    """A batch with pending rows, as the lease sees it."""

    batch_id: str
    tenant: str
    expires_at: int
    pending: int


@dataclass(slots=True)
class Usage:
    """A tenant's engine use in the recent window."""

    tokens: int = 0
    rows: int = 0


@dataclass(frozen=True, slots=True)
class Recent:
    """What the deployment did lately: per tenant, and over how many seconds."""

    usage: Mapping[str, Usage] = field(default_factory=dict)
    running: Mapping[str, int] = field(default_factory=dict)  # rows in flight per tenant
    seconds: float = 0.0  # the span the usage covers

    def rows_per_second(self) -> float:
        rows = sum(u.rows for u in self.usage.values())
        return rows / self.seconds if self.seconds > 0 else 0.0

    def tokens_per_row(self, tenant: str) -> float:
        """A row's expected tokens for ``tenant``: its own recent mean, else everyone's, else
        1 (so that, before anything was measured, shares are counted in rows)."""
        own = self.usage.get(tenant)
        if own is not None and own.rows > 0:
            return max(1.0, own.tokens / own.rows)
        tokens = sum(u.tokens for u in self.usage.values())
        rows = sum(u.rows for u in self.usage.values())
        return max(1.0, tokens / rows) if rows else 1.0


def at_risk(candidates: Sequence[Candidate], recent: Recent, at: int) -> set[str]:
    """The batches whose deadline the queue ahead of them (deadline order) and their own rows
    no longer fit before, at the measured rate. Nothing is at risk before a rate is known."""
    rate = recent.rows_per_second()
    if rate <= 0:
        return set()
    risky: set[str] = set()
    ahead = 0
    for batch in sorted(candidates, key=lambda c: (c.expires_at, c.batch_id)):
        ahead += batch.pending
        if ahead / rate > batch.expires_at - at:
            risky.add(batch.batch_id)
    return risky


def plan(
    n: int,
    candidates: Sequence[Candidate],
    weights: Mapping[str, float],
    recent: Recent,
    at: int,
) -> list[tuple[str, int]]:
    """How many of the next ``n`` rows each batch gives, in the order the engine should start
    them: (batch id, rows), every batch at most once."""
    by_deadline = sorted(candidates, key=lambda c: (c.expires_at, c.batch_id))
    left = {c.batch_id: c.pending for c in by_deadline}
    planned: dict[str, int] = {}

    def take(batch_id: str, rows: int) -> int:
        rows = min(rows, left[batch_id])
        if rows > 0:
            left[batch_id] -= rows
            planned[batch_id] = planned.get(batch_id, 0) + rows
        return rows

    risky = at_risk(by_deadline, recent, at)
    for batch in by_deadline:
        if n <= 0:
            break
        if batch.batch_id in risky:
            n -= take(batch.batch_id, n)

    queues: dict[str, list[Candidate]] = {}
    for batch in by_deadline:
        if left[batch.batch_id] > 0:
            queues.setdefault(batch.tenant, []).append(batch)
    # A heap of (load / weight, earliest deadline, tenant): ties go to the earlier deadline.
    heap: list[tuple[float, int, str]] = []
    cost: dict[str, float] = {}
    for tenant, batches in queues.items():
        per_row = recent.tokens_per_row(tenant)
        used = recent.usage.get(tenant, Usage())
        weight = max(weights.get(tenant, DEFAULT_WEIGHT), 1e-6)
        cost[tenant] = per_row / weight
        load = (used.tokens + recent.running.get(tenant, 0) * per_row) / weight
        heapq.heappush(heap, (load, batches[0].expires_at, tenant))
    while n > 0 and heap:
        load, _, tenant = heapq.heappop(heap)
        batches = queues[tenant]
        n -= take(batches[0].batch_id, 1)
        if left[batches[0].batch_id] == 0:
            batches.pop(0)
        if batches:
            heapq.heappush(heap, (load + cost[tenant], batches[0].expires_at, tenant))
    return list(planned.items())
