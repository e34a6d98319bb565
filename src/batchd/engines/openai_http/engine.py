"""The ``openai-http`` engine: one served model answered by a pool of OpenAI-compatible
servers (vLLM, SGLang, llama.cpp's server, Ollama, a cloud API).

Two ways in:
- ``forward`` / ``forward_stream``: an OpenAI body passed through unchanged but for ``model``
  (the upstream's name); the upstream's status and body come back as they were sent.
- ``generate`` / ``stream``: a ``GenerationRequest`` (Anthropic surfaces) turned into a chat or
  completions body, and the answer back into a ``GenerationResult`` (bodies.py).

Every attempt goes through the retry loop (retry.py: 429, 5xx and transport errors retried,
any other answer final) on the pool's URLs under their limits (upstream.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson

from batchd import metrics
from batchd.engines.base import (
    EmbedRequest,
    EmbedResult,
    ForwardRequest,
    ForwardResponse,
    ForwardStream,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PassthroughEngine,
    Priority,
    StreamDelta,
)
from batchd.engines.openai_http.adaptive import AdaptiveLimit
from batchd.engines.openai_http.bodies import (
    answer_result,
    request_body,
    response_usage,
    stream_result,
    token_estimate,
)
from batchd.engines.openai_http.retry import DEFAULT_RETRY_POLICY, RetryLoop, RetryPolicy
from batchd.engines.openai_http.shared_limits import SharedLimits
from batchd.engines.openai_http.sse import StreamUsage, sse_events
from batchd.engines.openai_http.timing import SYSTEM_CLOCK, Clock
from batchd.engines.openai_http.upstream import Pool, Upstream, classify
from batchd.engines.registry import OpenAIHttpModel
from batchd.errors import EngineError, UpstreamError

CAPACITY_PER_SLOT = 2  # batch requests kept per concurrency slot, so a freed slot never idles
CLOSE_SECONDS = 5.0  # closing an abandoned stream's upstream connection, at most


class OpenAIHttpEngine:
    kind = "openai-http"
    supports_embeddings = True
    computes_locally = False  # the upstream computes: never a reason to pace the API loop

    def __init__(
        self,
        model_id: str,
        config: OpenAIHttpModel,
        api_key: str | None,
        *,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        clock: Clock = SYSTEM_CLOCK,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``policy``, ``clock`` and ``transport`` (in place of the network) are for tests."""
        self.model_id = model_id
        self.config = config
        self.upstream_model = config.upstream_model or model_id
        self.native_responses = config.responses == "native"
        self.names = {model_id, *config.aliases}
        self.pool = Pool(
            [
                Upstream(
                    url,
                    max_concurrency=config.max_concurrency,
                    requests_per_minute=config.requests_per_minute,
                    tokens_per_minute=config.tokens_per_minute,
                    clock=clock,
                )
                for url in config.urls
            ],
            config.max_concurrency,
        )
        self.retries = RetryLoop(model_id, self.pool, policy, clock)
        if config.adaptive_concurrency:
            self.retries.adaptive = AdaptiveLimit(
                model_id,
                config.max_concurrency * len(config.urls),
                config.latency_target_seconds,
                clock,
            )
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.transport = transport
        self.client: httpx.AsyncClient | None = None

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
        return CAPACITY_PER_SLOT * self.config.max_concurrency * len(self.pool.urls)

    def decoding_batch_only(self) -> bool:
        return False

    def prompt_token_ids(self, request: GenerationRequest) -> list[int] | None:
        return None  # the upstream's tokenizer is not here

    def unavailable_models(self) -> list[str]:
        """Full, or every URL blocked: leasing more of this model's rows would only park them
        in slots other models could use."""
        if self.retries.outstanding >= self.capacity() or self.pool.all_blocked():
            return [self.model_id, *self.config.aliases]
        return []

    def passthrough(self, model: str) -> PassthroughEngine | None:
        return self if model == self.model_id else None

    def share_limits(self, shared: SharedLimits) -> None:
        """Hold every URL's limits for the whole deployment (shared_limits.py)."""
        for upstream in self.pool.urls:
            upstream.share(shared, f"{self.model_id}|{upstream.base_url}")

    async def start(self) -> None:
        connections = self.config.max_concurrency * len(self.pool.urls) + 4
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            # Environment proxies must not redirect upstream traffic: only the config says
            # where requests go.
            trust_env=False,
            follow_redirects=False,
            transport=self.transport,
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------ pass-through

    async def forward(self, request: ForwardRequest) -> ForwardResponse:
        payload, estimate = self._payload(request.endpoint, request.body)
        path = request.endpoint.removeprefix("/v1")
        realtime = request.priority == Priority.REALTIME

        async def send(upstream: Upstream) -> httpx.Response:
            response = await self._client().post(
                upstream.base_url + path, content=payload, headers=self._headers()
            )
            failure = classify(response, response.content)
            if failure is not None:
                raise failure
            self._settle(upstream, estimate, response.content, realtime)
            return response

        response, attempts = await self.retries.run(request, estimate, send, hold_slot=False)
        body = response.content
        prompt, completion, cached = response_usage(body)
        return ForwardResponse(
            status_code=response.status_code,
            body=body,
            attempts=attempts,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
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

        response, attempts = await self.retries.run(request, estimate, send, hold_slot=True)
        upstream = holder.get("upstream")
        if response.status_code != 200 or upstream is None:
            # A final error (its body already read), or a realtime caller out of retries
            # (no slot held then: the failed attempt gave its slot back).
            if upstream is not None:
                self.pool.release(upstream)
            return ForwardStream(response.status_code, _once(response.content), attempts)
        realtime = request.priority == Priority.REALTIME
        return ForwardStream(200, self._relay(response, upstream, estimate, realtime), attempts)

    # ------------------------------------------------------------ generation

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        endpoint, body = request_body(request, self.model_id, stream=False)
        forwarded = ForwardRequest(
            self.model_id, endpoint, body, request.priority, deadline=request.deadline
        )
        response = await self.forward(forwarded)
        if not 200 <= response.status_code < 300:
            raise UpstreamError(response.status_code, response.body, attempts=response.attempts)
        return answer_result(response, request.params.stop)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        endpoint, body = request_body(request, self.model_id, stream=True)
        forwarded = ForwardRequest(
            self.model_id, endpoint, body, request.priority, deadline=request.deadline
        )
        answer = await self.forward_stream(forwarded)
        if answer.status_code != 200:
            error_body = b"".join([chunk async for chunk in answer.chunks])
            raise UpstreamError(answer.status_code, error_body, attempts=answer.attempts)
        pieces: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] = {}
        async for event in sse_events(answer.chunks):
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content") if "delta" in choice else choice.get("text")
                if text:
                    pieces.append(text)
                    yield StreamDelta(text=text)
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or usage
        yield StreamDelta(
            text="", result=stream_result(pieces, finish, usage, body, answer.attempts)
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        # Never called: an upstream's /v1/embeddings bodies are passed through (forward).
        raise EngineError("an upstream model's embeddings are passed through, not embedded here")

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
        return payload, token_estimate(
            payload, endpoint, body, self.config.default_completion_tokens
        )

    def _settle(self, upstream: Upstream, estimate: int, body: bytes, realtime: bool) -> None:
        """Correct the token budget with the usage a full answer reports."""
        prompt, completion, _ = response_usage(body)
        upstream.settle_tokens(estimate, prompt + completion)
        metrics.count_tokens(self.model_id, prompt, completion, realtime=realtime)

    async def _relay(
        self, response: httpx.Response, upstream: Upstream, estimate: int, realtime: bool
    ) -> AsyncIterator[bytes]:
        """The stream's bytes as they come; its slot is held until it ends or the caller stops
        reading (a client that hangs up closes this generator). A ``usage`` the stream reports
        settles the token budget (sse.py)."""
        usage = StreamUsage()
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
                self.pool.release(upstream)
                if usage.found:
                    upstream.settle_tokens(estimate, usage.prompt + usage.completion)
                    metrics.count_tokens(
                        self.model_id, usage.prompt, usage.completion, realtime=realtime
                    )


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
