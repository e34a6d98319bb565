"""Group commit of finished requests: every result that finishes while one write is in
flight goes into the next write, one transaction for all of them.

A request that finishes in a millisecond (an embedding, a short completion) would otherwise
cost a transaction of its own, and on a small machine the commits (an fsync each on SQLite)
take the cores the engine computes on. Nothing waits on a timer: the first result is written
at once, and what arrives meanwhile is written as soon as that write returns. A result counts
as done only when its group has committed, so a crash loses nothing that was reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from batchd.store.records import LeasedRequest, RequestOutcome

WriteMany = Callable[[Sequence[tuple[LeasedRequest, RequestOutcome]], str], list[bool]]
MAX_GROUP = 256  # rows a transaction, at most: a long transaction holds the write lock


class CompletionWriter:
    """Writes ``(row, outcome)`` pairs for ``owner`` through ``write_many`` (the store's
    ``complete_many``, run on a worker thread), grouping whatever is waiting."""

    def __init__(self, write_many: WriteMany, owner: str, max_group: int = MAX_GROUP) -> None:
        self._write_many = write_many
        self._owner = owner
        self._max_group = max_group
        self._waiting: list[tuple[LeasedRequest, RequestOutcome, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.groups_written = 0  # transactions committed, for tests

    async def complete(self, leased: LeasedRequest, outcome: RequestOutcome) -> bool:
        """Whether the row was still ours and its result is now committed."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((leased, outcome, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        # The write goes on if this caller is cancelled: the engine's work is not thrown away.
        return await asyncio.shield(future)

    async def _write_waiting(self) -> None:
        while self._waiting:
            group = self._waiting[: self._max_group]
            del self._waiting[: self._max_group]
            pairs = [(leased, outcome) for leased, outcome, _ in group]
            try:
                written = await asyncio.to_thread(self._write_many, pairs, self._owner)
            except Exception as exc:  # every caller of the group sees the failure
                for _, _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.groups_written += 1
            for (_, _, future), ok in zip(group, written, strict=True):
                if not future.done():
                    future.set_result(ok)
