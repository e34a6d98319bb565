"""The openai-http engine's retry loop: one request tried on its pool until it is answered, is
final, or its time here is up.

Retried: 429 and every 5xx, connection errors and timeouts (``upstream.classify`` and
``transport_failure`` say which); any other status is the upstream's verdict on the request
and final after one attempt. Between attempts: exponential backoff with jitter (tenacity), or
the upstream's ``Retry-After`` when it sent one, and never less than the time until some URL
of the pool is unblocked. Each attempt goes to the least-loaded healthy URL of the pool.

How long: a batch request retries in place for at most ``batch_hold_seconds`` (never past its
deadline) and then raises ``RetryLater``, so its slot goes to other work while the scheduler
queues it again. A realtime request retries for at most ``realtime_retry_seconds`` and then
gets the upstream's last failure as its answer (a 502 if the upstream never answered).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter

from batchd import metrics
from batchd.engines.base import ForwardRequest, Priority, RetryLater
from batchd.engines.openai_http.adaptive import AdaptiveLimit
from batchd.engines.openai_http.timing import SYSTEM_CLOCK, Clock
from batchd.engines.openai_http.upstream import Pool, Retryable, Upstream, transport_failure
from batchd.errors import UpstreamError

log = logging.getLogger(__name__)

# One attempt: send the request to the URL it was given and return the answer, or raise
# ``Retryable`` for an answer worth another attempt (``upstream.classify``).
Send = Callable[[Upstream], Awaitable[httpx.Response]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    batch_hold_seconds: float = 30.0  # a batch request retries in place this long, then yields
    realtime_retry_seconds: float = 30.0  # a realtime caller waits at most this long for retries
    max_backoff_seconds: float = 20.0


DEFAULT_RETRY_POLICY = RetryPolicy()


class RetryLoop:
    def __init__(
        self,
        model_id: str,
        pool: Pool,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.model_id = model_id
        self.pool = pool
        self.policy = policy
        self.clock = clock
        self.outstanding = 0  # requests inside (waiting for a slot, sending or retrying)
        # Batch attempts' adaptive concurrency (adaptive.py), when the model turns it on.
        self.adaptive: AdaptiveLimit | None = None

    async def run(
        self, request: ForwardRequest, estimate: int, send: Send, *, hold_slot: bool
    ) -> tuple[httpx.Response, int]:
        """Run ``send`` on a pool URL under its limits until it succeeds, is final, or the
        time this request may spend here is up. Returns the answer and the attempts sent.

        ``hold_slot``: a successful attempt keeps its URL's slot, for the caller to
        ``pool.release`` (a stream holds it until it ends); otherwise it is given back here.
        """
        pool, clock, policy = self.pool, self.clock, self.policy
        now = clock.wall()
        if request.priority == Priority.REALTIME:
            give_up_at = now + policy.realtime_retry_seconds
        else:
            give_up_at = now + policy.batch_hold_seconds
            if request.deadline is not None:
                give_up_at = min(give_up_at, request.deadline)
        backoff = wait_exponential_jitter(max=policy.max_backoff_seconds, jitter=1)

        def wait(state: RetryCallState) -> float:
            # tenacity asks how long to wait only before a retry: count it here.
            metrics.UPSTREAM_RETRIES.labels(self.model_id).inc()
            failure = state.outcome.exception() if state.outcome else None
            delay = backoff(state)
            if isinstance(failure, Retryable) and failure.retry_after is not None:
                delay = failure.retry_after
            delay = max(delay, pool.blocked_for())
            # Never sleep past the point of giving up: wake then and stop.
            return max(0.0, min(delay, give_up_at - clock.wall()))

        def stop(state: RetryCallState) -> bool:
            return clock.wall() >= give_up_at - 0.05

        soonest = pool.blocked_for()
        if (
            request.priority == Priority.BATCH
            and soonest > 0
            and clock.wall() + soonest >= give_up_at
        ):
            # Every URL is blocked beyond this request's time here: do not park it in a slot.
            raise RetryLater(0, "every upstream URL is blocked")
        attempts = 0
        last_answer: Retryable | None = None  # the last failure the upstream answered

        adaptive = self.adaptive if request.priority == Priority.BATCH else None

        async def attempt() -> httpx.Response:
            if adaptive is None:
                return await attempt_in_slot()
            await adaptive.admit()
            started = clock.monotonic()
            sent_before = attempts
            overloaded = False
            try:
                return await attempt_in_slot()
            except Retryable as failure:
                # A 429, a 5xx or a timeout says the upstream is past its capacity; a 4xx
                # is this request's own fault and final anyway.
                overloaded = failure.status_code is None or failure.status_code >= 429
                raise
            finally:
                if attempts == sent_before:  # never reached the upstream
                    await adaptive.cancelled()
                else:
                    await adaptive.done(clock.monotonic() - started, overloaded)

        async def attempt_in_slot() -> httpx.Response:
            nonlocal attempts, last_answer
            if pool.all_blocked():
                soonest = min(pool.urls, key=lambda u: u.blocked_until)
                raise Retryable(f"{soonest.base_url} is blocked", sent=False)
            upstream = await pool.take(request.priority)
            try:
                await upstream.within_rates(estimate)
            except BaseException:
                pool.release(upstream)
                raise
            attempts += 1
            try:
                result = await send(upstream)
            except httpx.HTTPError as exc:
                pool.release(upstream)
                failure = transport_failure(exc, upstream.base_url)
                upstream.record_failure(None)
                metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "transport_error").inc()
                raise failure from None
            except Retryable as failure:
                pool.release(upstream)
                upstream.record_failure(failure.retry_after)
                last_answer = failure
                metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "retryable_status").inc()
                raise
            except BaseException:
                pool.release(upstream)
                raise
            upstream.record_success()
            metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "answered").inc()
            if not hold_slot:
                pool.release(upstream)
            return result

        self.outstanding += 1
        try:
            retrying = AsyncRetrying(
                sleep=clock.sleep,
                retry=retry_if_exception_type(Retryable),
                wait=wait,
                stop=stop,
                reraise=True,
            )
            async for try_ in retrying:
                with try_:
                    return await attempt(), attempts
        except Retryable as failure:
            log.info(
                "upstream retries paused: %s",
                failure.reason,
                extra={"action": "upstream_retry_later", "model": self.model_id},
            )
            if request.priority == Priority.REALTIME:
                answered = failure if failure.status_code is not None else last_answer
                if answered is not None:
                    return _as_final(answered), attempts
                raise UpstreamError(502, _gateway_error(failure.reason)) from None
            raise RetryLater(attempts, failure.reason) from None
        finally:
            self.outstanding -= 1
        raise AssertionError("unreachable: tenacity either returns or raises")


def _as_final(failure: Retryable) -> httpx.Response:
    """A realtime caller out of retries gets the upstream's last answer as it was."""
    return httpx.Response(
        failure.status_code or 502,
        content=failure.body,
        headers={"content-type": "application/json"},
    )


def _gateway_error(reason: str) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": f"The upstream server could not be reached: {reason}.",
                "type": "server_error",
                "param": None,
                "code": "upstream_unavailable",
            }
        }
    )
