"""One upstream base URL: its limits, its health, and one HTTP attempt against it.

Limits are per base URL, enforced with real primitives, never sleep loops:
- concurrency: an ``asyncio.Semaphore`` held for the whole attempt (a stream: until it ends);
- requests per minute: an ``aiolimiter.AsyncLimiter`` with one second's worth of burst
  (``rpm/60`` requests per second, at least one), so a limit of 60 means one request a second,
  not 60 at once and then a minute of silence;
- tokens per minute: an ``AsyncLimiter`` over a minute. A request is charged its estimate before
  it is sent: prompt characters / 4 (BPE tokenizers average 3.5-4.5 characters per token of
  English; the JSON keys around the text make this an over-estimate) plus its ``max_tokens``
  (the most it can generate). When the response reports ``usage``, the difference is settled:
  an under-estimate is charged afterwards (so the next requests wait), an over-estimate is
  refunded (``TokenBucket.refund``).

Health is a small circuit: after ``CIRCUIT_THRESHOLD`` consecutive retryable failures the URL
is blocked for an exponentially growing, jittered time (capped), and a 429's ``Retry-After``
blocks it for that long at once. A blocked URL is not sent to; when every URL of a pool is
blocked, the model is "unavailable" and the scheduler stops leasing its rows (so other models'
batches keep their slots) until the block lapses and a request probes it again.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import httpx
from aiolimiter import AsyncLimiter

CIRCUIT_THRESHOLD = 3  # consecutive retryable failures before a URL is blocked
MAX_BLOCK_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 600.0  # a Retry-After beyond this is clamped (a misconfigured proxy)
# As the official OpenAI SDK retries: request timeout, lock conflict, rate limit, and every 5xx.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


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


class Upstream:
    """One base URL (``http://host:8000/v1``) of a model's pool."""

    def __init__(
        self,
        base_url: str,
        *,
        max_concurrency: int,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
    ) -> None:
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.slots = asyncio.Semaphore(max_concurrency)
        self.requests: AsyncLimiter | None = None
        if requests_per_minute is not None:
            per_second = requests_per_minute / 60
            burst = max(1.0, per_second)
            self.requests = AsyncLimiter(burst, burst / per_second)
        self.tokens: TokenBucket | None = None
        if tokens_per_minute is not None:
            self.tokens = TokenBucket(tokens_per_minute, 60)
        self.outstanding = 0  # attempts waiting for or holding a slot here
        self.failures = 0  # consecutive retryable failures
        self.blocked_until = 0.0  # time.monotonic(); not sent to before then

    # ------------------------------------------------------------ health

    def blocked_for(self) -> float:
        return max(0.0, self.blocked_until - time.monotonic())

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
            self.blocked_until = max(self.blocked_until, time.monotonic() + block)

    # ------------------------------------------------------------ limits

    async def admit(self, estimated_tokens: int) -> None:
        """Wait for a concurrency slot, then for the rate limits. The caller must
        ``release()`` after the attempt (including a stream's end)."""
        await self.slots.acquire()
        try:
            if self.requests is not None:
                await self.requests.acquire()
            if self.tokens is not None:
                await self.tokens.acquire(min(float(estimated_tokens), self.tokens.max_rate))
        except BaseException:
            self.slots.release()
            raise

    def release(self) -> None:
        self.slots.release()

    def settle_tokens(self, estimated: int, actual: int) -> None:
        """Correct the token budget with the usage the upstream reported."""
        if self.tokens is None or actual <= 0:
            return
        charged = min(float(estimated), self.tokens.max_rate)
        difference = actual - charged
        if difference < 0:
            self.tokens.refund(-difference)
        elif difference > 0:
            # Charged as debt: later requests wait for it, this one's result does not.
            self.tokens.charge(difference)


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
