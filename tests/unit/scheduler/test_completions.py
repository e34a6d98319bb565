"""Group commit: results that finish while a write is in flight share the next transaction;
each caller learns its own row's answer; a failed write fails its whole group and the next
group is still written; a caller that stops waiting does not stop its row's write."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from batchd.scheduler.completions import CompletionWriter
from batchd.store.records import LeasedRequest, RequestOutcome, RequestState

OK = RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 1, 1, 0)


def leased(seq: int) -> LeasedRequest:
    return LeasedRequest(
        seq=seq, batch_id="b", line_no=seq, custom_id=f"c{seq}", endpoint="/v1/embeddings",
        body=b"{}", epoch=1, expires_at=None, upstream_attempts=0,
    )  # fmt: skip


class SlowStore:
    """``complete_many`` that blocks until released, recording each group it was given."""

    def __init__(self, refuse: frozenset[int] = frozenset(), fail_first: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.gate = threading.Event()
        self.refuse = refuse
        self.fail_first = fail_first

    def complete_many(
        self, finished: Sequence[tuple[LeasedRequest, RequestOutcome]], owner: str
    ) -> list[bool]:
        assert owner == "me"
        self.gate.wait(5)
        self.groups.append([row.seq for row, _ in finished])
        if self.fail_first and len(self.groups) == 1:
            raise RuntimeError("database is locked")
        return [row.seq not in self.refuse for row, _ in finished]


async def _settle_soon(store: SlowStore) -> None:
    await asyncio.sleep(0.05)  # let every caller queue behind the first write
    store.gate.set()


def test_results_finishing_during_a_write_share_the_next_one() -> None:
    store = SlowStore(refuse=frozenset({3}))
    writer = CompletionWriter(store.complete_many, "me")

    async def main() -> list[bool]:
        first = asyncio.create_task(writer.complete(leased(1), OK))
        await asyncio.sleep(0.01)  # the first write is in flight, blocked
        rest = [asyncio.create_task(writer.complete(leased(n), OK)) for n in (2, 3, 4)]
        await _settle_soon(store)
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [True, True, False, True]
    assert store.groups == [[1], [2, 3, 4]]
    assert writer.groups_written == 2


def test_a_failed_write_fails_its_group_and_the_next_group_is_still_written() -> None:
    store = SlowStore(fail_first=True)
    writer = CompletionWriter(store.complete_many, "me")

    async def main() -> tuple[BaseException | bool, ...]:
        first = asyncio.create_task(writer.complete(leased(1), OK))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(writer.complete(leased(2), OK))
        await _settle_soon(store)
        return tuple(await asyncio.gather(first, second, return_exceptions=True))

    first, second = asyncio.run(main())
    assert isinstance(first, RuntimeError) and second is True
    assert store.groups == [[1], [2]]


def test_a_caller_that_stops_waiting_still_gets_its_row_written() -> None:
    store = SlowStore()
    writer = CompletionWriter(store.complete_many, "me")

    async def main() -> None:
        waiter = asyncio.create_task(writer.complete(leased(7), OK))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        store.gate.set()
        while writer.groups_written == 0:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert store.groups == [[7]]


def test_groups_are_capped() -> None:
    store = SlowStore()
    store.gate.set()
    writer = CompletionWriter(store.complete_many, "me", max_group=2)

    async def main() -> list[bool]:
        return await asyncio.gather(*(writer.complete(leased(n), OK) for n in range(5)))

    assert asyncio.run(main()) == [True] * 5
    assert all(len(group) <= 2 for group in store.groups)
    assert sorted(seq for group in store.groups for seq in group) == list(range(5))
