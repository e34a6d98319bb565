"""An upstream's limits held for the whole deployment, not per process.

Each process's own limiter (upstream.py) would let K processes send K times an upstream's
``max_concurrency`` and K times its requests and tokens per minute. When the deployment shares
a database (PostgreSQL: API replicas and workers), every attempt also takes, from the
database, one of the upstream's slots (a lease renewed while held, so a dead process's slot
comes back once its lease lapses) and its amounts from the upstream's rate buckets. The budget
is kept in the database rather than split between live processes because a split cannot hold
while processes come and go: a newcomer's share would overlap requests the others already
have in flight. The cost is a statement or two per attempt, small beside an LLM request.

Nothing here polls the network: a process that finds every slot held tries again after a
short, growing, jittered pause (there is no cross-process wake-up to wait on); a rate bucket
says how long until the amount is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Protocol

from batchd.engines.openai_http.timing import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

SLOT_LEASE_SECONDS = 30.0  # a held slot's lease; renewed every third of it
FIRST_PAUSE_SECONDS = 0.02
MAX_PAUSE_SECONDS = 0.5


class UpstreamBudget(Protocol):
    """The store's side (store/upstream_budget.py); blocking calls, run in threads."""

    def ensure_upstream_slots(self, key: str, slots: int) -> None: ...

    def acquire_upstream_slot(
        self, key: str, slots: int, holder: str, seconds: float, at: float
    ) -> int | None: ...

    def release_upstream_slot(self, key: str, slot: int, holder: str) -> None: ...

    def renew_upstream_slots(self, holder: str, until: float) -> int: ...

    def take_upstream_rate(
        self, key: str, amount: float, capacity: float, per_second: float, at: float
    ) -> float: ...

    def adjust_upstream_rate(self, key: str, amount: float, capacity: float) -> None: ...


class SharedLimits:
    """One process's handle on the deployment's upstream budget."""

    def __init__(self, budget: UpstreamBudget, holder: str, clock: Clock = SYSTEM_CLOCK) -> None:
        self.budget = budget
        self.holder = holder
        self.clock = clock
        self._ensured: set[str] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def acquire_slot(self, key: str, slots: int) -> int:
        """One of ``key``'s ``slots``, waiting until one is free."""
        if key not in self._ensured:
            await asyncio.to_thread(self.budget.ensure_upstream_slots, key, slots)
            self._ensured.add(key)
        pause = FIRST_PAUSE_SECONDS
        while True:
            slot = await asyncio.to_thread(
                self.budget.acquire_upstream_slot,
                key,
                slots,
                self.holder,
                SLOT_LEASE_SECONDS,
                self.clock.wall(),
            )
            if slot is not None:
                return slot
            await self.clock.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(MAX_PAUSE_SECONDS, pause * 1.5)

    def release_slot(self, key: str, slot: int) -> None:
        """Give the slot back (written in the background: callers release in sync code)."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.budget.release_upstream_slot, key, slot, self.holder)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def take_rate(self, key: str, amount: float, capacity: float, per_second: float) -> None:
        """Wait until the bucket ``key`` gives ``amount`` (at most its capacity)."""
        amount = min(amount, capacity)
        while True:
            wait = await asyncio.to_thread(
                self.budget.take_upstream_rate,
                key,
                amount,
                capacity,
                per_second,
                self.clock.wall(),
            )
            if wait <= 0:
                return
            await self.clock.sleep(wait * random.uniform(1.0, 1.2))

    def adjust_rate(self, key: str, amount: float, capacity: float) -> None:
        """Refund (positive) or charge (negative) the bucket, in the background."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.budget.adjust_upstream_rate, key, amount, capacity)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(SLOT_LEASE_SECONDS / 3)
            try:
                await asyncio.to_thread(
                    self.budget.renew_upstream_slots,
                    self.holder,
                    self.clock.wall() + SLOT_LEASE_SECONDS,
                )
            except Exception:
                log.exception("could not renew upstream slot leases")
