"""Wake-up moderation for the event loop while the embedded engine decodes batch work.

On a small machine the embedded engine keeps every core busy, and llama.cpp's threads meet at
a barrier after every operation of every step: whichever thread the kernel preempts holds
the others up. An API that wakes for each poll as it arrives (200 clients polling once a
second: 200 wake-ups a second, each on caches the engine has just flushed) costs the batch
far more than its CPU. Measured on the 2-core test machine (bench/load.py): with every poll
answered at once, the batch lost 11-20% of its throughput to 200 pollers; with the loop
waking at most every 20 ms it lost 2-8%, polls took ~30 ms instead of ~1 ms, and a batch
with no pollers ran as fast as unpaced (bench/bench_pacing.py: 267 vs 247 tok/s).

So while the engine is decoding batch work, no realtime request is running or recent, and
every HTTP request in flight is a poll, the loop sleeps between iterations (the GIL released) until ``interval`` has passed since the
last one: whatever arrived meanwhile (polls, uploads, engine results) is then served in one
go, with warm caches, in one wake-up. This is interrupt moderation as network cards do it,
traded the same way: a little latency for the batch's throughput. It never paces realtime
work: the engine reports a realtime request as soon as it arrives and for a grace period
after (``engines/llamacpp/``), and the loop then runs freely. Nor does it pace any
other request: every request but a poll runs inside ``unpaced()`` (api/poll_fast_path.py decides
what is a poll), because one read or write per interval would throttle a body to a crawl
(measured: a 53 MB upload beside a running batch took 13.3 s paced, 0.5 s unpaced). An upstream engine
(vLLM, a cloud API) computes elsewhere, so the loop is never paced for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from batchd import metrics

# After a realtime request arrives, no pacing for this long (the embedded engine's own grace
# for realtime work is the same length): its stream and the next ones run unmoderated.
REALTIME_HOLD_SECONDS = 2.0


class LoopPacer:
    """Runs on the loop it is started on; ``busy()`` is asked on every iteration."""

    def __init__(self, busy: Callable[[], bool], interval: float) -> None:
        self.busy = busy
        self.interval = interval
        self.paced_seconds = 0.0  # time the loop spent paced (for tests and metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None
        self._last = 0.0
        self._held_until = float("-inf")
        self._unpaced = 0  # requests in flight that must not wait for the pacer

    @contextlib.contextmanager
    def unpaced(self) -> Iterator[None]:
        """No pacing while this is entered (a request other than a poll is in flight)."""
        self._unpaced += 1
        try:
            yield
        finally:
            self._unpaced -= 1

    def hold(self, seconds: float) -> None:
        """No pacing for ``seconds`` from now (a realtime request arrived)."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._last = time.monotonic()
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        if self._unpaced or now < self._held_until or not self.busy():
            # Not pacing: look again an interval from now, the loop otherwise free to sleep.
            self._last = now
            self._handle = self._loop.call_later(self.interval, self._tick)
            return
        # Pacing: at most one iteration per interval. An iteration that already took that
        # long (a lot of work arrived) goes on at once.
        wait = self.interval - (now - self._last)
        if wait > 0:
            time.sleep(wait)
            self.paced_seconds += wait
            metrics.LOOP_PACED_SECONDS.inc(wait)
        self._last = time.monotonic()
        # call_soon: the next iteration polls I/O without blocking, serves all that arrived
        # during the sleep, and comes back here.
        self._handle = self._loop.call_soon(self._tick)
