"""Adaptive concurrency toward an upstream (AIMD), for batch work.

An upstream shared with its own realtime users has spare capacity that batch work should fill,
but no more: past it, every request waits longer, the upstream's users included. With
``adaptive_concurrency`` on, batch attempts to a URL are held to a limit that moves as TCP's
congestion window does:

- an answer within ``latency_target_seconds`` adds 1/limit (one more slot per round of
  answers at the current limit: additive increase);
- a 429, a 5xx or an answer slower than the target halves it (multiplicative decrease),
  once per round: only an attempt sent after the last decrease can cause the next, so one
  overloaded burst is one decrease;
- it starts at ``max_concurrency`` and stays between 1 and that.

Realtime attempts are not held by it (they are few, and their caller is waiting); they count
in the URL's ``max_concurrency`` as always. Waiting batch attempts are woken when a slot
frees or the limit grows (an ``asyncio.Condition``), never by polling.
"""

from __future__ import annotations

import asyncio

from batchd import metrics
from batchd.engines.openai_http.timing import SYSTEM_CLOCK, Clock


class AdaptiveLimit:
    def __init__(
        self,
        model: str,
        max_concurrency: int,
        latency_target: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.model = model
        self.max = float(max_concurrency)
        self.latency_target = latency_target
        self.clock = clock
        self.limit = self.max  # as without it, until the upstream says it is too much
        self.inflight = 0
        self._last_decrease = float("-inf")
        self._changed = asyncio.Condition()
        metrics.UPSTREAM_CONCURRENCY_LIMIT.labels(model).set(self.limit)

    async def admit(self) -> None:
        """Wait until a batch attempt fits under the limit; ``done`` after it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.inflight < int(self.limit))
            self.inflight += 1

    async def done(self, seconds: float, overloaded: bool) -> None:
        """An attempt ended after ``seconds``; ``overloaded``: the upstream said so (a 429 or
        a 5xx)."""
        async with self._changed:
            self.inflight -= 1
            if overloaded or seconds > self.latency_target:
                now = self.clock.monotonic()
                if now - seconds >= self._last_decrease:  # sent at the current limit
                    self.limit = max(1.0, self.limit / 2)
                    self._last_decrease = now
                    metrics.UPSTREAM_CONCURRENCY_DECREASES.labels(self.model).inc()
            else:
                self.limit = min(self.max, self.limit + 1 / self.limit)
            metrics.UPSTREAM_CONCURRENCY_LIMIT.labels(self.model).set(self.limit)
            self._changed.notify_all()

    async def cancelled(self) -> None:
        """An attempt that never reached the upstream gives its place back."""
        async with self._changed:
            self.inflight -= 1
            self._changed.notify_all()
