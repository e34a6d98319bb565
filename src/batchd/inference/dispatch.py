"""One wire request to an engine and back, for the realtime routes and the batch executors alike.

Every request takes the same steps: check the body, resolve the model (a 404 before anything an
engine would refuse), then either forward the body verbatim to a passthrough (upstream) engine
or build a ``GenerationRequest`` for a generating engine (an ``EmbedRequest`` for an embedding
model it serves in-process), and render the result in the surface's wire shape. A step that refuses the request raises a ``BatchdError``: the API turns
it into an HTTP error, an executor into that row's errored outcome.

Realtime requests carry ``Priority.REALTIME`` so engines admit them ahead of batch work; batch
requests carry their batch's deadline, until which an upstream engine may keep retrying.

Models served by an upstream (``openai-http``) engine take OpenAI bodies as they are: only
types, ranges and routing fields are checked here, the embedded engine's own limits (``n=1``,
no ``logit_bias``...) are not applied, and the upstream's status and body come back as sent.
A Responses API body is passed through only to an upstream configured with
``responses = "native"`` (its own ``/v1/responses``); otherwise it becomes a
``GenerationRequest`` (checked by the Responses rules), which an upstream engine sends on as a
chat completion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from batchd import metrics
from batchd.engines.base import (
    EmbedRequest,
    Engine,
    ForwardRequest,
    ForwardResponse,
    GenerationRequest,
    GenerationResult,
    PassthroughEngine,
    Priority,
)
from batchd.errors import ContextLengthExceeded, ModelNotFound
from batchd.inference import realtime_limits, service_tiers, sse
from batchd.protocol import anthropic as am
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai import embeddings as oa_embeddings
from batchd.protocol.openai import responses as oa_responses
from batchd.protocol.openai import results as oa_results

# Anthropic's usage.service_tier: what a realtime message and a batch's message report.
REALTIME_SERVICE_TIER = "standard"
BATCH_SERVICE_TIER = "batch"

# Streams that may sit in a proxy's buffer otherwise (relayed upstream streams, Anthropic's).
_NO_CACHE = {"cache-control": "no-cache"}


def resolve(engine: Engine, generation: GenerationRequest) -> GenerationRequest:
    """``generation`` for the served model id its name or alias stands for, once it is known
    to fit: raises ``ModelNotFound`` or ``ContextLengthExceeded``."""
    served = engine.resolve_model(generation.model)
    if served is None:
        raise ModelNotFound(generation.model)
    # A completion longer than the whole context can never fit: refuse it here, before the
    # engine queues or tokenizes anything (the engine checks prompt + completion itself).
    wanted = generation.params.max_tokens
    if wanted is not None:
        context = next((m.context_length for m in engine.models() if m.id == served), None)
        if context is not None and wanted >= context:
            raise ContextLengthExceeded(
                f"max_tokens is {wanted}, but this model's context is {context} tokens in all"
                " (prompt and completion).",
                param="max_tokens",
            )
    return replace(generation, model=served)


# ------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Rendered:
    """A wire body rendered from a generating engine's result (status 200)."""

    body: dict[str, Any]
    result: GenerationResult


@dataclass(frozen=True, slots=True)
class Relayed:
    """An upstream's answer: its status and body exactly as it sent them."""

    response: ForwardResponse


@dataclass(frozen=True, slots=True)
class Streamed:
    """A 200 answer whose body is these SSE chunks, sent with ``headers``."""

    chunks: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


# -------------------------------------------------------------------- OpenAI


@dataclass(frozen=True, slots=True)
class Forward:
    """An OpenAI body to pass through to the upstream engine serving its model."""

    upstream: PassthroughEngine
    request: ForwardRequest
    stream: bool


@dataclass(frozen=True, slots=True)
class Generate:
    """An OpenAI body turned into a request for a generating engine."""

    endpoint: str
    parsed: (
        oa_bodies.ChatCompletionRequest
        | oa_bodies.CompletionRequest
        | oa_responses.ResponsesRequest
    )
    request: GenerationRequest
    service_tier: str = "default"  # the tier that serves it, echoed in the response

    @property
    def stream(self) -> bool:
        return bool(self.parsed.stream)


@dataclass(frozen=True, slots=True)
class Embed:
    """An OpenAI embeddings body for a model the engine embeds with in-process."""

    parsed: oa_bodies.EmbeddingRequest
    request: EmbedRequest


def plan_openai(
    engine: Engine, endpoint: str, body: Any, priority: Priority, deadline: float | None = None
) -> Forward | Generate | Embed:
    """How ``body`` (for ``endpoint``) runs on ``engine``; raises a ``BatchdError`` for a body
    that cannot run at all."""
    if endpoint == oa_responses.RESPONSES_ENDPOINT:
        return _plan_response(engine, body, priority, deadline)
    checked = oa_bodies.check_body(endpoint, body)
    served = engine.resolve_model(checked.model)
    if served is None:
        # Before the embedded engine's own checks (no embeddings, no penalties...): a model
        # nobody serves is a 404 whatever else the body asks for.
        raise ModelNotFound(checked.model)
    upstream = engine.passthrough(served)
    if upstream is not None:
        forwarded = ForwardRequest(served, endpoint, body, priority, deadline=deadline)
        return Forward(upstream, forwarded, stream=body.get("stream") is True)
    if isinstance(checked, oa_bodies.EmbeddingRequest):
        return Embed(checked, replace(checked.to_embedding(priority), model=served))
    parsed = oa_bodies.parse_body(endpoint, body)
    generation = resolve(engine, parsed.to_generation(priority))
    return Generate(endpoint, parsed, replace(generation, deadline=deadline))


def _plan_response(
    engine: Engine, body: Any, priority: Priority, deadline: float | None
) -> Forward | Generate:
    """A Responses body goes as it is to an upstream configured with ``responses = "native"``;
    otherwise it becomes a generation request: the embedded engine runs it, and an upstream
    engine sends it on as a chat completion."""
    parsed = oa_responses.parse_request(body)
    served = engine.resolve_model(parsed.model)
    if served is None:
        raise ModelNotFound(parsed.model)
    upstream = engine.passthrough(served)
    if upstream is not None and upstream.native_responses:
        forwarded = ForwardRequest(
            served, oa_responses.RESPONSES_ENDPOINT, body, priority, deadline=deadline
        )
        return Forward(upstream, forwarded, stream=body.get("stream") is True)
    generation = resolve(engine, parsed.to_generation(priority))
    return Generate(oa_responses.RESPONSES_ENDPOINT, parsed, replace(generation, deadline=deadline))


async def complete_openai(engine: Engine, plan: Forward | Generate | Embed) -> Rendered | Relayed:
    """The whole answer at once (a batch row's, or a realtime request not streamed)."""
    if isinstance(plan, Forward):
        return Relayed(await plan.upstream.forward(plan.request))
    if isinstance(plan, Embed):
        embedded = await engine.embed(plan.request)
        body = oa_embeddings.embeddings_body(
            plan.parsed.model, embedded, plan.parsed.encoding_format
        )
        tokens = embedded.prompt_tokens
        return Rendered(body, GenerationResult("", "stop", tokens, completion_tokens=0))
    result = await engine.generate(plan.request)
    tier = plan.service_tier
    if isinstance(plan.parsed, oa_responses.ResponsesRequest):
        body = oa_responses.response_body(plan.parsed, plan.request.model, result, tier)
        return Rendered(body, result)
    # The served model's id, not the alias the body named (plan.request is resolved).
    body = oa_results.response_body(plan.endpoint, plan.request.model, result, tier)
    return Rendered(body, result)


async def stream_openai(engine: Engine, plan: Forward | Generate) -> Streamed | Relayed:
    if isinstance(plan, Generate):
        if isinstance(plan.parsed, oa_responses.ResponsesRequest):
            return await _stream_response(engine, plan.parsed, plan.request, plan.service_tier)
        # Answered 200 at once: a late refusal by the engine becomes an error chunk.
        chunks = sse.openai_chunks(
            engine, plan.endpoint, plan.parsed, plan.request, plan.service_tier
        )
        return Streamed(chunks)
    answer = await plan.upstream.forward_stream(plan.request)
    if answer.status_code != 200:
        # The upstream refused before streaming: its error goes back as a plain JSON answer.
        body = b"".join([chunk async for chunk in answer.chunks])
        return Relayed(ForwardResponse(answer.status_code, body, answer.attempts))
    return Streamed(answer.chunks, dict(_NO_CACHE))


async def _stream_response(
    engine: Engine,
    parsed: oa_responses.ResponsesRequest,
    request: GenerationRequest,
    service_tier: str,
) -> Streamed:
    stream = engine.stream(request)
    try:
        # Wait for the first piece before answering 200, so a request the engine refuses
        # (context too long, say) still gets a proper HTTP error rather than an error event.
        first = await anext(stream)
    except BaseException:
        await sse.aclose(stream)
        raise
    events = sse.responses_events(parsed, request.model, first, stream, service_tier)
    return Streamed(events, dict(_NO_CACHE))


async def answer_realtime_openai(
    engine: Engine,
    endpoint: str,
    body: Any,
    *,
    priority_allowed: bool = True,
    flex_timeout: float = 540.0,
    max_output_tokens: int | None = None,
    max_context: int | None = None,
) -> Rendered | Relayed | Streamed:
    """A realtime request's answer, streamed if the body asks for it, at the service tier
    the body asks for and the tenant may have (service_tiers.py)."""
    realtime_limits.check_realtime_output(body, max_output_tokens)
    tier: service_tiers.Tier = "default"
    if endpoint != oa_bodies.EMBEDDINGS_ENDPOINT:  # embeddings have no service tiers
        tier = service_tiers.served_tier(body, priority_allowed)
    plan = plan_openai(engine, endpoint, body, Priority.REALTIME)
    if isinstance(plan, Generate):
        request = service_tiers.apply_tier(plan.request, tier, flex_timeout)
        plan = replace(plan, request=replace(request, max_context=max_context), service_tier=tier)
    elif isinstance(plan, Forward):
        plan = replace(plan, request=service_tiers.apply_tier(plan.request, tier, flex_timeout))
    started = time.monotonic()
    outcome = "error"
    try:
        if tier != "flex":
            answer = await _answer(engine, plan)
        else:
            try:
                # A flex request waits for batch capacity at most this long.
                async with asyncio.timeout(flex_timeout):
                    answer = await _answer(engine, plan, until_first_piece=True)
            except TimeoutError:
                outcome = "flex_timeout"
                raise service_tiers.flex_timed_out(flex_timeout) from None
        outcome = "answered"
        metrics.REALTIME_ANSWER_SECONDS.labels(tier=tier).observe(time.monotonic() - started)
        return answer
    finally:
        metrics.REALTIME_REQUESTS.labels(tier=tier, outcome=outcome).inc()


async def _answer(
    engine: Engine, plan: Forward | Generate | Embed, until_first_piece: bool = False
) -> Rendered | Relayed | Streamed:
    if isinstance(plan, Embed) or not plan.stream:
        return await complete_openai(engine, plan)
    answer = await stream_openai(engine, plan)
    if until_first_piece and isinstance(answer, Streamed):
        # Hold the answer until the engine's first piece, so a flex stream that waits past
        # its timeout is still refused with a status, not cut off inside a 200. A chat
        # stream of ours opens with a role chunk sent before the engine has started.
        opening = 1 if isinstance(plan, Generate) and plan.endpoint == sse.CHAT_ENDPOINT else 0
        answer = await _chunks_in_hand(answer, opening + 1)
    return answer


# ----------------------------------------------------------------- Anthropic


@dataclass(frozen=True, slots=True)
class MessagePlan:
    """An Anthropic Messages body turned into a request for the engine."""

    params: am.MessageCreateRequest
    request: GenerationRequest
    service_tier: str


def plan_message(
    engine: Engine, body: Any, priority: Priority, deadline: float | None = None
) -> MessagePlan:
    """How a Messages body runs on ``engine``; raises a ``BatchdError`` for a body that
    cannot run at all."""
    # A batch request's params may not ask for a stream, and its message names the batch tier.
    in_batch = priority is Priority.BATCH
    params = am.parse_params(body, in_batch=in_batch)
    generation = resolve(engine, params.to_generation(priority))
    tier = BATCH_SERVICE_TIER if in_batch else REALTIME_SERVICE_TIER
    return MessagePlan(params, replace(generation, deadline=deadline), tier)


async def complete_message(engine: Engine, plan: MessagePlan) -> Rendered:
    result = await engine.generate(plan.request)
    body = am.message_body(plan.request.model, result, service_tier=plan.service_tier)
    return Rendered(body, result)


async def stream_message(engine: Engine, plan: MessagePlan) -> Streamed:
    stream = engine.stream(plan.request)
    try:
        # Wait for the first piece before answering 200, so a request the engine refuses
        # (context too long, say) still gets a proper HTTP error rather than an error event.
        first = await anext(stream)
    except BaseException:
        await sse.aclose(stream)
        raise
    events = sse.anthropic_events(plan.request.model, plan.service_tier, first, stream)
    return Streamed(events, dict(_NO_CACHE))


async def answer_realtime_message(
    engine: Engine,
    body: Any,
    max_output_tokens: int | None = None,
    max_context: int | None = None,
) -> Rendered | Streamed:
    """A realtime message's answer: streamed if the body asks for it."""
    realtime_limits.check_realtime_output(body, max_output_tokens)
    plan = plan_message(engine, body, Priority.REALTIME)
    plan = replace(plan, request=replace(plan.request, max_context=max_context))
    if plan.params.stream:
        return await stream_message(engine, plan)
    return await complete_message(engine, plan)


async def _chunks_in_hand(answer: Streamed, count: int) -> Streamed:
    """``answer`` once its first ``count`` chunks have come; they are sent first."""
    held: list[bytes] = []
    chunks = answer.chunks
    try:
        async for chunk in chunks:
            held.append(chunk)
            if len(held) >= count:
                break
    except BaseException:
        await sse.aclose(chunks)
        raise

    async def replay() -> AsyncIterator[bytes]:
        try:
            for chunk in held:
                yield chunk
            async for chunk in chunks:
                yield chunk
        finally:
            await sse.aclose(chunks)

    return Streamed(replay(), answer.headers)
