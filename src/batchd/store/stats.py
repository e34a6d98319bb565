"""Request counts and token usage: per batch (with the two caches pollers read through) and
over the whole database (the metrics' gauges)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sqlalchemy import BigInteger, Engine, bindparam, func, select

from batchd.store import poll_reads, schema
from batchd.store.records import (
    TERMINAL_BATCH_STATUSES,
    BatchRecord,
    BatchStatus,
    RequestCounts,
    RequestState,
    Usage,
)

Stats = tuple[RequestCounts, Usage]

# One grouped scan of the (batch_id, state, tokens...) index gives counts per state and, for
# the succeeded rows, token usage, without reading the rows. Built once: constructing a
# statement per call cost more CPU than running it (measured with py-spy under 200 pollers).
_R = schema.requests
STATS_OF_BATCHES = (
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


class EndedStats:
    """Counts and usage of ended batches, which never change again (archiving empties a
    row's body and result but keeps its state and token counts). Pollers of a finished batch,
    and every list page, then cost no aggregate query. Bounded, least recently used out;
    per process, and safe across processes because the cached values are final."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, Stats] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, batch_id: str) -> Stats | None:
        with self._lock:
            item = self._items.get(batch_id)
            if item is not None:
                self._items.move_to_end(batch_id)
            return item

    def put(self, batch_id: str, item: Stats) -> None:
        with self._lock:
            self._items[batch_id] = item
            self._items.move_to_end(batch_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class RecentStats:
    """Counts and usage of running batches, each with when it was counted and the batch's
    status then. Counting a batch of 50,000 rows costs ~15 ms of CPU, so 200 clients polling
    it every second would take a core; with this they share one count per ``max_age``. A count
    is reused only while the batch keeps the status it had, so a batch never shows ``completed``
    (or any new status) with the counts of an earlier one. Bounded, least recently used out."""

    def __init__(self, capacity: int = 20_000) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, tuple[float, BatchStatus, Stats]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, batch_id: str, status: BatchStatus, max_age: float) -> Stats | None:
        with self._lock:
            entry = self._items.get(batch_id)
            if entry is None:
                return None
            counted_at, counted_status, item = entry
            if counted_status != status or time.monotonic() - counted_at > max_age:
                return None
            self._items.move_to_end(batch_id)
            return item

    def put(self, batch_id: str, status: BatchStatus, item: Stats) -> None:
        with self._lock:
            self._items[batch_id] = (time.monotonic(), status, item)
            self._items.move_to_end(batch_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class BatchStats:
    """Fills in batch records' counts and usage, through the two caches."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ended = EndedStats()
        self.recent = RecentStats()

    def attach(self, records: list[BatchRecord], max_age: float = 0.0) -> None:
        """Fill in each record's request counts and token usage: from the cache for ended
        batches; for running ones, from a count at most ``max_age`` seconds old taken while
        the batch had the same status; and for the rest from one grouped query over all of
        them (a page of 20 batches is one query, not 40), on a pooled connection. Records get
        copies: a caller changing its record never changes what the caches hold."""
        missing: dict[str, BatchRecord] = {}
        for record in records:
            cached = self.ended.get(record.id)
            if cached is None and max_age > 0:
                cached = self.recent.get(record.id, record.status, max_age)
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
            rows = conn.execute(STATS_OF_BATCHES, {"batch_ids": list(missing)}).all()
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
                self.ended.put(record.id, item)
            else:
                self.recent.put(record.id, record.status, item)


class StatsMixin:
    engine: Engine

    def counts(self, batch_id: str) -> RequestCounts:
        """The batch's requests per state, counted now (never cached)."""
        counts = RequestCounts()
        with self.engine.connect() as conn:
            for row in conn.execute(STATS_OF_BATCHES, {"batch_ids": [batch_id]}):
                setattr(counts, row.state, row.n)
        return counts

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

    def request_state_counts(self) -> dict[str, int]:
        """Requests per state over the whole database (the metrics' queue depth)."""
        r = schema.requests
        with self.engine.connect() as conn:
            rows = conn.execute(select(r.c.state, func.count()).group_by(r.c.state)).all()
        counts = {state.value: 0 for state in RequestState}
        counts.update({str(state): int(n) for state, n in rows})
        return counts

    def batch_status_counts(self) -> dict[str, int]:
        """Batches per status over the whole database (only statuses some batch has)."""
        b = schema.batches
        with self.engine.connect() as conn:
            rows = conn.execute(select(b.c.status, func.count()).group_by(b.c.status)).all()
        return {str(status): int(n) for status, n in rows}

    def usage_by_model(self, batch_id: str) -> list[tuple[str | None, int, int, int]]:
        """The batch's succeeded rows' tokens per model named in their bodies: (model,
        prompt, cached, completion). For the cost of a batch of several models."""
        r = schema.requests
        query = (
            select(
                r.c.model,
                func.coalesce(func.sum(r.c.prompt_tokens), 0),
                func.coalesce(func.sum(r.c.cached_tokens), 0),
                func.coalesce(func.sum(r.c.completion_tokens), 0),
            )
            .where(r.c.batch_id == batch_id, r.c.state == RequestState.SUCCEEDED.value)
            .group_by(r.c.model)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [(m, int(p), int(c), int(o)) for m, p, c, o in rows]

    def daily_usage(
        self, tenant: str | None, since: int, created_after: int
    ) -> list[tuple[int, str | None, int, int, int, int, int]]:
        """Succeeded requests per UTC day and model since ``since`` (epoch seconds), of one
        tenant's batches or (``tenant`` None) everyone's: (day index since the epoch, model,
        batches, requests, prompt, cached, completion tokens), of batches created after
        ``created_after`` (the caller's bound: ``since`` less the longest completion window,
        so the scan skips batches that cannot have finished rows since)."""
        r, b = schema.requests, schema.batches
        day = (r.c.finished_at / 86400).cast(BigInteger)
        query = (
            select(
                day,
                r.c.model,
                func.count(func.distinct(r.c.batch_id)),
                func.count(),
                func.coalesce(func.sum(r.c.prompt_tokens), 0),
                func.coalesce(func.sum(r.c.cached_tokens), 0),
                func.coalesce(func.sum(r.c.completion_tokens), 0),
            )
            .select_from(r.join(b, b.c.id == r.c.batch_id))
            .where(
                b.c.created_at >= created_after,
                r.c.state == RequestState.SUCCEEDED.value,
                r.c.finished_at >= since,
            )
            .group_by(day, r.c.model)
            .order_by(day)
        )
        if tenant is not None:
            query = query.where(b.c.tenant == tenant)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            (int(d), m, int(nb), int(n), int(p), int(c), int(o)) for d, m, nb, n, p, c, o in rows
        ]
