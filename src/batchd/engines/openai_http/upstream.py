"""One upstream base URL (its limits and its health), a model's pool of them, and how an
attempt's outcome is classified.

Limits are per base URL, enforced with real primitives, never sleep loops:
- concurrency: ``max_concurrency`` slots per URL, held for the whole attempt (a stream: until
  it ends). A pool's slots are handed out by one queue (``PoolSlots``, futures, no polling):
  a request waits for *any* URL's slot and then takes the free one with the least work, so a
  burst is not dealt out round-robin to URLs before they can take it, and realtime waiters go
  ahead of batch waiters;
- requests per minute: an ``aiolimiter.AsyncLimiter`` with one second's worth of burst
  (``rpm/60`` requests per second, at least one), so a limit of 60 means one request a second,
  not 60 at once and then a minute of silence;
- tokens per minute: an ``AsyncLimiter`` over a minute. A request is charged its estimate before
  it is sent: prompt characters / 4 (BPE tokenizers average 3.5-4.5 characters per token of
  English; the JSON keys around the text make this an over-estimate) plus its ``max_tokens``
  (the most it can generate). When the response reports ``usage``, the difference is settled:
  an under-estimate is charged afterwards (so the next requests wait), an over-estimate is
  refunded (``TokenBucket.refund``). A stream is settled the same way when it reports
  ``usage`` in its events; one that does not stays charged the estimate.

Health is a small circuit: after ``CIRCUIT_THRESHOLD`` consecutive retryable failures the URL
is blocked for an exponentially growing, jittered time (capped), and a 429's ``Retry-After``
blocks it for that long at once. A blocked URL is not sent to; when every URL of a pool is
blocked, the model is "unavailable" and the scheduler stops leasing its rows (so other models'
batches keep their slots) until the block lapses and a request probes it again.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import random
import time

import httpx
from aiolimiter import AsyncLimiter

from batchd.engines.openai_http.shared_limits import SharedLimits
from batchd.engines.openai_http.timing import SYSTEM_CLOCK, Clock

CIRCUIT_THRESHOLD = 3  # consecutive retryable failures before a URL is blocked
MAX_BLOCK_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 600.0  # a Retry-After beyond this is clamped (a misconfigured proxy)
# Only a rate limit (and every 5xx, below) is worth another attempt. Any other 4xx is the
# upstream's verdict on this request (a 408 or 409 included: the OpenAI SDK retries those, but
# an upstream answering them about a batch line has judged that line) and is final.
RETRYABLE_STATUSES = frozenset({429})


class TokenBucket(AsyncLimiter):
    """``AsyncLimiter`` plus a refund, to correct an estimate with the reported usage."""

    # aiolimiter has no public way to adjust a charge; its bucket level is the one piece of
    # state (``_level``, drained by ``_leak``) and is stable across 1.x (pinned <2).

    def refund(self, amount: float) -> None:
        self._leak()
        self._level = max(0.0, self._level - amount)

    def charge(self, amount: float) -> None:
        """Add to the level without waiting; it may exceed the maximum, and later
        ``acquire`` calls then wait until the excess has drained."""
        self._leak()
        self._level += amount


class Retryable(Exception):
    """An attempt that may succeed if tried again: 429, 5xx, a reset, a timeout, a block."""

    def __init__(
        self,
        reason: str,
        *,
        status_code: int | None = None,
        body: bytes = b"",
        retry_after: float | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code
        self.body = body
        self.retry_after = retry_after
        self.sent = sent  # False: refused before sending (blocked URL); not an attempt


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def is_retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


class PoolSlots:
    """The concurrency slots of a whole pool, handed out in priority order (lower first: the
    engine's ``Priority``), first come first served within one.

    A freed slot is handed to the first waiter directly (never back to a common count a
    newcomer could take first). The URL behind a slot is chosen by the caller once it has one:
    ``acquire`` only guarantees that some URL of the pool has a free slot."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._waiters: dict[int, collections.deque[asyncio.Future[None]]] = {}

    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiters.values())

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self.waiting():
            self.free -= 1
            return
        queue = self._waiters.setdefault(priority, collections.deque())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as we were cancelled: pass it on
            else:
                queue.remove(waiter)
            raise

    def release(self) -> None:
        for priority in sorted(self._waiters):
            queue = self._waiters[priority]
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.free += 1


class Upstream:
    """One base URL (``http://host:8000/v1``) of a model's pool."""

    def __init__(
        self,
        base_url: str,
        *,
        max_concurrency: int,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.base_url = base_url
        self.clock = clock
        self.max_concurrency = max_concurrency
        self.requests: AsyncLimiter | None = None
        if requests_per_minute is not None:
            per_second = requests_per_minute / 60
            burst = max(1.0, per_second)
            self.requests = AsyncLimiter(burst, burst / per_second)
        self.tokens: TokenBucket | None = None
        if tokens_per_minute is not None:
            self.tokens = TokenBucket(tokens_per_minute, 60)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.outstanding = 0  # attempts holding a slot here (waiting for its rates, or sent)
        self.failures = 0  # consecutive retryable failures
        self.blocked_until = 0.0  # clock.monotonic(); not sent to before then
        # The deployment's budget (shared_limits.py), when processes share a database: the
        # keys of this URL's rows there, and the shared slots this process holds now.
        self.shared: SharedLimits | None = None
        self.shared_key = ""
        self.shared_slots: list[int] = []

    def share(self, shared: SharedLimits, key: str) -> None:
        """Hold this URL's limits for the whole deployment through ``shared`` too."""
        self.shared, self.shared_key = shared, key

    # ------------------------------------------------------------ health

    def blocked_for(self) -> float:
        return max(0.0, self.blocked_until - self.clock.monotonic())

    def record_success(self) -> None:
        self.failures = 0
        self.blocked_until = 0.0

    def record_failure(self, retry_after: float | None) -> None:
        self.failures += 1
        block = 0.0
        if retry_after is not None:
            block = retry_after
        elif self.failures >= CIRCUIT_THRESHOLD:
            base = min(MAX_BLOCK_SECONDS, 2.0 ** (self.failures - CIRCUIT_THRESHOLD))
            block = base * random.uniform(1.0, 1.5)
        if block:
            self.blocked_until = max(self.blocked_until, self.clock.monotonic() + block)

    # ------------------------------------------------------------ limits

    def has_free_slot(self) -> bool:
        return self.outstanding < self.max_concurrency

    def take_slot(self) -> None:
        """Take one of this URL's slots (the caller has checked ``has_free_slot``, and holds a
        slot of the pool's queue for it); ``release_slot()`` after the attempt."""
        self.outstanding += 1

    def release_slot(self) -> None:
        self.outstanding -= 1

    async def within_rates(self, estimated_tokens: int) -> None:
        """Wait until the request and token rates allow one more request (this process's,
        then the deployment's)."""
        if self.requests is not None:
            await self.requests.acquire()
        if self.tokens is not None:
            await self.tokens.acquire(min(float(estimated_tokens), self.tokens.max_rate))
        if self.shared is not None:
            if self.requests_per_minute is not None:
                per_second = self.requests_per_minute / 60
                await self.shared.take_rate(
                    self.shared_key + "|rpm", 1, max(1.0, per_second), per_second
                )
            if self.tokens_per_minute is not None:
                await self.shared.take_rate(
                    self.shared_key + "|tpm",
                    float(estimated_tokens),
                    float(self.tokens_per_minute),
                    self.tokens_per_minute / 60,
                )

    def settle_tokens(self, estimated: int, actual: int) -> None:
        """Correct the token budget with the usage the upstream reported."""
        if self.tokens is None or actual <= 0:
            return
        charged = min(float(estimated), self.tokens.max_rate)
        difference = actual - charged
        if self.shared is not None and self.tokens_per_minute is not None and difference:
            self.shared.adjust_rate(
                self.shared_key + "|tpm", -difference, float(self.tokens_per_minute)
            )
        if difference < 0:
            self.tokens.refund(-difference)
        elif difference > 0:
            # Charged as debt: later requests wait for it, this one's result does not.
            self.tokens.charge(difference)


class Pool:
    """A model's upstream URLs and the concurrency slots they share."""

    def __init__(self, urls: list[Upstream], slots_per_url: int) -> None:
        self.urls = urls
        self.slots = PoolSlots(slots_per_url * len(urls))

    def blocked_for(self) -> float:
        """Seconds until some URL takes requests again (0: one does now)."""
        return min(upstream.blocked_for() for upstream in self.urls)

    def all_blocked(self) -> bool:
        return all(upstream.blocked_for() > 0 for upstream in self.urls)

    async def take(self, priority: int) -> Upstream:
        """Wait for a slot of the pool, then take the URL with the least outstanding work
        among those with a free slot and not blocked. ``release`` it after the attempt."""
        await self.slots.acquire(priority)
        free = [u for u in self.urls if u.has_free_slot() and u.blocked_for() == 0]
        if not free:
            # The free slots are on URLs that became blocked while we waited.
            self.slots.release()
            raise Retryable("every upstream URL with a free slot is blocked", sent=False)
        upstream = min(free, key=lambda u: u.outstanding)
        upstream.take_slot()
        if upstream.shared is not None:
            try:
                slot = await upstream.shared.acquire_slot(
                    upstream.shared_key + "|slots", upstream.max_concurrency
                )
            except BaseException:
                upstream.release_slot()
                self.slots.release()
                raise
            upstream.shared_slots.append(slot)
        return upstream

    def release(self, upstream: Upstream) -> None:
        upstream.release_slot()
        if upstream.shared is not None and upstream.shared_slots:
            upstream.shared.release_slot(
                upstream.shared_key + "|slots", upstream.shared_slots.pop()
            )
        self.slots.release()


def classify(response: httpx.Response, body: bytes) -> Retryable | None:
    """The retryable failure a finished response represents, or None if it is final."""
    if is_retryable_status(response.status_code):
        return Retryable(
            f"upstream answered {response.status_code}",
            status_code=response.status_code,
            body=body,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    return None


def transport_failure(exc: httpx.HTTPError, base_url: str) -> Retryable:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return Retryable(f"request to {base_url} {kind}: {type(exc).__name__}")
