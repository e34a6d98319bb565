"""The deployment's upstream budget as one process uses it, over a real store (SQLite): an
attempt waits for a slot another holds, and for the rate bucket to refill."""

from __future__ import annotations

import asyncio
import time

from batchd.engines.openai_http.shared_limits import SharedLimits
from batchd.store.store import Store


def test_a_second_holder_waits_for_the_slot_the_first_releases(sqlite_store: Store) -> None:
    async def scenario() -> list[str]:
        first, second = SharedLimits(sqlite_store, "proc-a"), SharedLimits(sqlite_store, "proc-b")
        events: list[str] = []
        slot = await first.acquire_slot("m|u|slots", 1)
        events.append("a took")

        async def b() -> None:
            await second.acquire_slot("m|u|slots", 1)
            events.append("b took")

        waiting = asyncio.create_task(b())
        await asyncio.sleep(0.2)
        events.append("a releases")
        first.release_slot("m|u|slots", slot)
        await asyncio.wait_for(waiting, 5)
        await first.close()
        await second.close()
        return events

    assert asyncio.run(scenario()) == ["a took", "a releases", "b took"]


def test_a_rate_bucket_holds_a_second_process_back_until_it_refills(sqlite_store: Store) -> None:
    async def scenario() -> float:
        first, second = SharedLimits(sqlite_store, "proc-a"), SharedLimits(sqlite_store, "proc-b")
        await first.take_rate("m|u|rpm", 1, capacity=1, per_second=4)
        start = time.monotonic()
        await second.take_rate("m|u|rpm", 1, capacity=1, per_second=4)
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.2  # a quarter second to refill one request
