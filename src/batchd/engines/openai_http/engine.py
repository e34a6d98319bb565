"""The ``openai-http`` engine: one served model answered by a pool of OpenAI-compatible
servers (vLLM, SGLang, llama.cpp's server, Ollama, a cloud API).

Two ways in:
- ``forward`` / ``forward_stream``: an OpenAI body passed through unchanged but for ``model``
  (the upstream's name); the upstream's status and body come back as they were sent.
- ``generate`` / ``stream``: a ``GenerationRequest`` (Anthropic surfaces) turned into a chat or
  completions body, and the answer back into a ``GenerationResult``.

Faults: 429, 5xx, connection errors and timeouts are retried (tenacity: exponential
backoff with jitter, or the upstream's ``Retry-After``), each attempt on the least-loaded healthy
URL of the pool. A batch request retries in place for at most ``BATCH_HOLD_SECONDS`` (never
past its deadline) and then raises ``RetryLater`` so its slot goes to other work; the scheduler
queues it again and it is retried until the batch expires. Realtime requests retry for at most
``REALTIME_RETRY_SECONDS`` and then answer with the upstream's last failure. Any other 4xx is
final and returned as the upstream sent it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter

from batchd import metrics
from batchd.engines.base import (
    FinishReason,
    ForwardRequest,
    ForwardResponse,
    ForwardStream,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Priority,
    RetryLater,
    StreamDelta,
)
from batchd.engines.openai_http.upstream import (
    PoolSlots,
    Retryable,
    Upstream,
    classify,
    transport_failure,
)
from batchd.engines.registry import OpenAIHttpModel
from batchd.errors import EngineError, UpstreamError

log = logging.getLogger(__name__)

BATCH_HOLD_SECONDS = 30.0  # a batch request retries in place this long, then yields its slot
REALTIME_RETRY_SECONDS = 30.0  # a realtime caller waits at most this long for retries
MAX_BACKOFF_SECONDS = 20.0
CHARS_PER_TOKEN = 4  # the estimate before sending; see upstream.py
CAPACITY_PER_SLOT = 2  # batch requests kept per concurrency slot, so a freed slot never idles
CLOSE_SECONDS = 5.0  # closing an abandoned stream's upstream connection, at most

T = TypeVar("T")


class OpenAIHttpEngine:
    kind = "openai-http"
    supports_embeddings = True

    def __init__(self, model_id: str, config: OpenAIHttpModel, api_key: str | None) -> None:
        self.model_id = model_id
        self.config = config
        self.upstream_model = config.upstream_model or model_id
        self.names = {model_id, *config.aliases}
        self.pool = [
            Upstream(
                url,
                max_concurrency=config.max_concurrency,
                requests_per_minute=config.requests_per_minute,
                tokens_per_minute=config.tokens_per_minute,
            )
            for url in config.urls
        ]
        self.slots = PoolSlots(config.max_concurrency * len(self.pool))
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client: httpx.AsyncClient | None = None
        self.outstanding = 0  # requests inside this engine (waiting, sending or retrying)

    # ------------------------------------------------------------ contract

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=self.model_id,
                context_length=self.config.context_length,
                aliases=tuple(self.config.aliases),
                kind=self.kind,
            )
        ]

    def resolve_model(self, name: str) -> str | None:
        return self.model_id if name in self.names else None

    def capacity(self) -> int:
        return CAPACITY_PER_SLOT * self.config.max_concurrency * len(self.pool)

    def unavailable(self) -> bool:
        """Full, or every URL blocked: leasing more of this model's rows would only park them
        in slots other models could use."""
        if self.outstanding >= self.capacity():
            return True
        return all(upstream.blocked_for() > 0 for upstream in self.pool)

    def passthrough(self, model: str) -> bool:
        return model == self.model_id

    async def start(self) -> None:
        connections = self.config.max_concurrency * len(self.pool) + 4
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            # Environment proxies must not redirect upstream traffic: only the config says
            # where requests go.
            trust_env=False,
            follow_redirects=False,
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------ pass-through

    async def forward(self, request: ForwardRequest) -> ForwardResponse:
        payload, estimate = self._payload(request.endpoint, request.body)
        path = request.endpoint.removeprefix("/v1")

        async def send(upstream: Upstream) -> httpx.Response:
            response = await self._client().post(
                upstream.base_url + path, content=payload, headers=self._headers()
            )
            failure = classify(response, response.content)
            if failure is not None:
                raise failure
            return response

        response, attempts = await self._with_retries(request, estimate, send, hold_slot=False)
        body = response.content
        usage = _usage(body)
        return ForwardResponse(
            status_code=response.status_code,
            body=body,
            attempts=attempts,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            cached_tokens=usage[2],
        )

    async def forward_stream(self, request: ForwardRequest) -> ForwardStream:
        """Send with ``stream`` as the body says; retries happen only before the first byte
        of the answer. The returned chunks hold the concurrency slot until exhausted or
        closed."""
        payload, estimate = self._payload(request.endpoint, request.body)
        path = request.endpoint.removeprefix("/v1")
        holder: dict[str, Upstream] = {}

        async def send(upstream: Upstream) -> httpx.Response:
            built = self._client().build_request(
                "POST", upstream.base_url + path, content=payload, headers=self._headers()
            )
            response = await self._client().send(built, stream=True)
            if response.status_code != 200:
                body = await response.aread()
                await response.aclose()
                failure = classify(response, body)
                if failure is not None:
                    raise failure
            holder["upstream"] = upstream
            return response

        response, attempts = await self._with_retries(request, estimate, send, hold_slot=True)
        upstream = holder.get("upstream")
        if response.status_code != 200 or upstream is None:
            # A final error (its body already read), or a realtime caller out of retries
            # (no slot held then: the failed attempt gave its slot back).
            if upstream is not None:
                self._release(upstream)
            return ForwardStream(response.status_code, _once(response.content), attempts)
        return ForwardStream(200, self._relay(response, upstream, estimate), attempts)

    # ------------------------------------------------------------ generation

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        endpoint, body = self._generation_body(request, stream=False)
        forwarded = ForwardRequest(
            self.model_id, endpoint, body, request.priority, deadline=request.deadline
        )
        response = await self.forward(forwarded)
        if not 200 <= response.status_code < 300:
            raise UpstreamError(response.status_code, response.body, attempts=response.attempts)
        try:
            answer = orjson.loads(response.body)
            choice = answer["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            raise EngineError(
                "The upstream answered with a body that is not a completion."
            ) from None
        stop_sequence = choice.get("stop_reason")
        return GenerationResult(
            text=text or "",
            finish_reason=_finish(choice.get("finish_reason")),
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            cached_tokens=response.cached_tokens,
            stop_sequence=stop_sequence if stop_sequence in request.params.stop else None,
            attempts=response.attempts,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        endpoint, body = self._generation_body(request, stream=True)
        forwarded = ForwardRequest(
            self.model_id, endpoint, body, request.priority, deadline=request.deadline
        )
        answer = await self.forward_stream(forwarded)
        if answer.status_code != 200:
            body = b"".join([chunk async for chunk in answer.chunks])
            raise UpstreamError(answer.status_code, body, attempts=answer.attempts)
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        async for event in _sse_events(answer.chunks):
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content") if "delta" in choice else choice.get("text")
                if text:
                    pieces.append(text)
                    yield StreamDelta(text=text)
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or usage
        text = "".join(pieces)
        yield StreamDelta(
            text="",
            result=GenerationResult(
                text=text,
                finish_reason=_finish(finish),
                # An upstream that does not report usage in streams (stream_options is not
                # universal) gets the same estimate the limiter used, and one token a chunk.
                prompt_tokens=int(usage.get("prompt_tokens") or _estimate_chars(body)),
                completion_tokens=int(usage.get("completion_tokens") or len(pieces)),
                attempts=answer.attempts,
            ),
        )

    # ------------------------------------------------------------ internals

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            raise EngineError("the upstream engine is not started")
        return self.client

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json", **self.headers}

    def _payload(self, endpoint: str, body: dict[str, Any]) -> tuple[bytes, int]:
        """The body to send (only ``model`` rewritten) and its token estimate."""
        payload = orjson.dumps({**body, "model": self.upstream_model})
        completion = 0
        if endpoint != "/v1/embeddings":
            wanted = body.get("max_completion_tokens") or body.get("max_tokens")
            completion = wanted if isinstance(wanted, int) and wanted > 0 else 0
            completion = completion or self.config.default_completion_tokens
            n = body.get("n")
            completion *= n if isinstance(n, int) and n > 1 else 1
        return payload, math.ceil(len(payload) / CHARS_PER_TOKEN) + completion

    def _generation_body(self, request: GenerationRequest, *, stream: bool) -> tuple[str, dict]:
        params = request.params
        body: dict[str, Any] = {"model": self.model_id}
        if request.messages is not None:
            endpoint = "/v1/chat/completions"
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            endpoint = "/v1/completions"
            body["prompt"] = request.prompt or ""
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        body["temperature"] = params.temperature
        if params.top_p != 1.0:
            body["top_p"] = params.top_p
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM/SGLang/llama.cpp extension; OpenAI refuses it
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return endpoint, body

    async def _take_slot(self, priority: Priority) -> Upstream:
        """Wait for a slot of the pool, then take the URL with the least outstanding work
        among those with a free slot and not blocked. ``_release`` it after the attempt."""
        await self.slots.acquire(priority)
        free = [u for u in self.pool if u.has_free_slot() and u.blocked_for() == 0]
        if not free:
            # The free slots are on URLs that became blocked while we waited.
            self.slots.release()
            raise Retryable("every upstream URL with a free slot is blocked", sent=False)
        upstream = min(free, key=lambda u: u.outstanding)
        upstream.take_slot()
        return upstream

    def _release(self, upstream: Upstream) -> None:
        upstream.release_slot()
        self.slots.release()

    async def _relay(
        self, response: httpx.Response, upstream: Upstream, estimate: int
    ) -> AsyncIterator[bytes]:
        """The stream's bytes as they come; its slot is held until it ends or the caller stops
        reading (a client that hangs up closes this generator). A ``usage`` the stream reports
        (OpenAI's ``stream_options.include_usage``, vLLM's and SGLang's final chunk) settles the
        token budget as a full response's does; a stream without one (llama-cpp-python's server
        ignores ``stream_options``) stays charged the estimate."""
        usage = _StreamUsage()
        try:
            async for chunk in response.aiter_bytes():  # decoded: we re-serve it uncompressed
                usage.feed(chunk)
                yield chunk
        finally:
            try:
                # A client that hung up cancels us (Starlette's disconnect watch: a cancel scope
                # that cancels every await again): close the upstream connection shielded, so
                # the upstream sees it end, and give the slot back whatever happens.
                with anyio.move_on_after(CLOSE_SECONDS, shield=True):
                    await response.aclose()
            finally:
                self._release(upstream)
                if usage.found:
                    upstream.settle_tokens(estimate, usage.prompt + usage.completion)
                    metrics.count_tokens(self.model_id, usage.prompt, usage.completion)

    async def _with_retries(
        self,
        request: ForwardRequest,
        estimate: int,
        send: Callable[[Upstream], Awaitable[T]],
        *,
        hold_slot: bool,
    ) -> tuple[T, int]:
        """Run ``send`` on a pool URL under its limits until it succeeds, is final, or the
        time this request may spend here is up. Returns the result and the attempts sent."""
        now = time.time()
        if request.priority == Priority.REALTIME:
            give_up_at = now + REALTIME_RETRY_SECONDS
        else:
            give_up_at = now + BATCH_HOLD_SECONDS
            if request.deadline is not None:
                give_up_at = min(give_up_at, request.deadline)
        backoff = wait_exponential_jitter(max=MAX_BACKOFF_SECONDS, jitter=1)

        def wait(state: RetryCallState) -> float:
            # tenacity asks how long to wait only before a retry: count it here.
            metrics.UPSTREAM_RETRIES.labels(self.model_id).inc()
            failure = state.outcome.exception() if state.outcome else None
            delay = backoff(state)
            if isinstance(failure, Retryable) and failure.retry_after is not None:
                delay = failure.retry_after
            delay = max(delay, min(u.blocked_for() for u in self.pool))
            # Never sleep past the point of giving up: wake then and stop.
            return max(0.0, min(delay, give_up_at - time.time()))

        def stop(state: RetryCallState) -> bool:
            return time.time() >= give_up_at - 0.05

        soonest = min(u.blocked_for() for u in self.pool)
        if (
            request.priority == Priority.BATCH
            and soonest > 0
            and time.time() + soonest >= give_up_at
        ):
            # Every URL is blocked beyond this request's time here: do not park it in a slot.
            raise RetryLater(0, "every upstream URL is blocked")
        attempts = 0
        last_answer: list[Retryable | None] = [None]  # the last failure the upstream answered

        async def attempt() -> T:
            nonlocal attempts
            if all(u.blocked_for() > 0 for u in self.pool):
                soonest = min(self.pool, key=lambda u: u.blocked_until)
                raise Retryable(f"{soonest.base_url} is blocked", sent=False)
            upstream = await self._take_slot(request.priority)
            try:
                await upstream.within_rates(estimate)
            except BaseException:
                self._release(upstream)
                raise
            attempts += 1
            try:
                result = await send(upstream)
            except httpx.HTTPError as exc:
                self._release(upstream)
                failure = transport_failure(exc, upstream.base_url)
                upstream.record_failure(None)
                metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "transport_error").inc()
                raise failure from None
            except Retryable as failure:
                self._release(upstream)
                upstream.record_failure(failure.retry_after)
                last_answer[0] = failure
                metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "retryable_status").inc()
                raise
            except BaseException:
                self._release(upstream)
                raise
            upstream.record_success()
            metrics.UPSTREAM_ATTEMPTS.labels(self.model_id, "answered").inc()
            if not hold_slot:
                self._release(upstream)
                _settle(upstream, estimate, result, self.model_id)
            return result

        self.outstanding += 1
        try:
            retrying = AsyncRetrying(
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
                answered = failure if failure.status_code is not None else last_answer[0]
                if answered is not None:
                    return _as_final(answered), attempts  # type: ignore[return-value]
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


def _settle(upstream: Upstream, estimate: int, result: object, model: str) -> None:
    if isinstance(result, httpx.Response):  # read in full (not a stream)
        prompt, completion, _ = _usage(result.content)
        upstream.settle_tokens(estimate, prompt + completion)
        metrics.count_tokens(model, prompt, completion)


def _usage(body: bytes) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens from an OpenAI response body, 0s if absent."""
    try:
        usage = orjson.loads(body).get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0, 0, 0
    return prompt, completion, cached


def _estimate_chars(body: dict[str, Any]) -> int:
    return math.ceil(len(orjson.dumps(body.get("messages") or body.get("prompt"))) / 4)


def _finish(reason: object) -> FinishReason:
    return "length" if reason == "length" else "stop"


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class _StreamUsage:
    """Watches an OpenAI SSE stream go by for the last ``usage`` it reports."""

    MAX_LINE_BYTES = 1 << 20  # a longer line is not an event we need to read

    def __init__(self) -> None:
        self.partial = b""
        self.found = False
        self.prompt = 0
        self.completion = 0

    def feed(self, chunk: bytes) -> None:
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        if len(self.partial) > self.MAX_LINE_BYTES:
            self.partial = b""
        for line in lines:
            if b'"usage"' in line:
                self._read(line.strip())

    def _read(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        try:
            event = orjson.loads(line[5:])
            usage = event.get("usage") if isinstance(event, dict) else None
            if not isinstance(usage, dict):
                return
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return
        if prompt or completion:
            self.found = True
            self.prompt, self.completion = prompt, completion


async def _sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON ``data:`` events of an OpenAI stream, up to ``[DONE]``."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                if "error" in event and "choices" not in event:
                    raise UpstreamError(500, data)
                yield event
