"""A request on its way between the event loop and a model's decode thread.

The asyncio side puts a ``Job`` on the model's inbox and awaits its future (``generate``) or
its queue of deltas (``stream``). The decode thread answers through the job only, and only by
``loop.call_soon_threadsafe``: asyncio futures and queues are not thread-safe.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from batchd.engines.base import GenerationRequest, GenerationResult, StreamDelta


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerationResult] | None = None
    deltas: asyncio.Queue[StreamDelta | BaseException] | None = None
    # Set from the event loop when the caller stops waiting; the decode thread drops the
    # sequence at its next step.
    cancelled: bool = False

    def deliver(self, item: StreamDelta | BaseException) -> None:
        """One more piece of a stream (or the error that ends it)."""
        assert self.deltas is not None
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)

    def complete(self, result: GenerationResult) -> None:
        if self.deltas is not None:
            self.deliver(StreamDelta(text="", result=result))
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future, result)

    def fail(self, error: BaseException) -> None:
        if self.deltas is not None:
            self.deliver(error)
        elif self.future is not None:
            self.loop.call_soon_threadsafe(_reject, self.future, error)


def _resolve(future: asyncio.Future[GenerationResult], result: GenerationResult) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future[GenerationResult], error: BaseException) -> None:
    if not future.done():
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
