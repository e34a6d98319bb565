"""Running one request line on the engine, by the endpoint it was written for.

Each surface registers an executor for its endpoints; an executor turns a stored body into a
``RequestOutcome`` (the wire body to store, plus token usage). A body only the engine can judge
wrong (unknown model, context overflow, malformed messages) becomes an errored outcome for that
line alone; its siblings are unaffected.

Models served by an upstream (``openai-http``) engine take OpenAI bodies as they are: only
types, ranges and routing fields are checked here, the embedded engine's own limits (``n=1``,
no ``logit_bias``...) are not applied, and the upstream's status and body become the outcome.
An upstream that keeps failing raises ``RetryLater`` through the executor to the scheduler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import orjson

from batchd.engines.base import (
    Engine,
    ForwardRequest,
    GenerationRequest,
    PassthroughEngine,
    Priority,
    RetryLater,
    passthrough_engine,
)
from batchd.errors import BatchdError, ContextLengthExceeded, ModelNotFound
from batchd.protocol import openai as oa
from batchd.store.records import RequestOutcome, RequestState


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the scheduler knows about a row beyond its body."""

    deadline: float | None = None  # the batch's expires_at (epoch seconds)
    prior_attempts: int = 0  # upstream attempts made under earlier leases


Executor = Callable[[Engine, str, bytes, RunContext], Awaitable[RequestOutcome]]

EXECUTORS: dict[str, Executor] = {}


def resolve(engine: Engine, generation: GenerationRequest) -> GenerationRequest:
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


def _errored(exc: BatchdError, attempts: int = 0) -> RequestOutcome:
    error = oa.error_body(exc.message, type_=exc.openai_type, param=exc.param, code=exc.code)
    return RequestOutcome(
        RequestState.ERRORED, exc.status_code, orjson.dumps(error), upstream_attempts=attempts
    )


async def execute_openai(
    engine: Engine, endpoint: str, body: bytes, context: RunContext | None = None
) -> RequestOutcome:
    context = context or RunContext()
    try:
        obj = orjson.loads(body)
        checked = oa.check_body(endpoint, obj)
        served = engine.resolve_model(checked.model)
        if served is None:
            # Before the embedded engine's own checks (no embeddings, no penalties...): a
            # model nobody serves is a 404 whatever else the body asks for.
            raise ModelNotFound(checked.model)
        upstream = passthrough_engine(engine, served)
        if upstream is not None:
            return await _forward(upstream, served, endpoint, obj, context)
        parsed = oa.parse_body(endpoint, obj)
        generation = resolve(engine, parsed.to_generation(Priority.BATCH))
        result = await engine.generate(generation)
    except BatchdError as exc:
        return _errored(exc, context.prior_attempts)
    response = oa.response_body(endpoint, parsed.model, result)
    return RequestOutcome(
        RequestState.SUCCEEDED,
        200,
        orjson.dumps(response),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.cached_tokens,
    )


async def _forward(
    upstream: PassthroughEngine,
    served: str,
    endpoint: str,
    body: dict[str, object],
    context: RunContext,
) -> RequestOutcome:
    try:
        response = await upstream.forward(
            ForwardRequest(served, endpoint, body, Priority.BATCH, deadline=context.deadline)
        )
    except RetryLater as later:
        # The scheduler releases the row and records the attempts made so far.
        later.attempts += context.prior_attempts
        raise
    ok = 200 <= response.status_code < 300
    return RequestOutcome(
        RequestState.SUCCEEDED if ok else RequestState.ERRORED,
        response.status_code,
        _compact_json(response.body, response.status_code),
        prompt_tokens=response.prompt_tokens if ok else 0,
        completion_tokens=response.completion_tokens if ok else 0,
        cached_tokens=response.cached_tokens if ok else 0,
        upstream_attempts=context.prior_attempts + response.attempts,
    )


def _compact_json(body: bytes, status: int) -> bytes:
    """The upstream's body as one line of JSON (result files splice stored bodies into JSONL
    lines): re-serialized if it is JSON, else wrapped in an OpenAI error object."""
    try:
        return orjson.dumps(orjson.loads(body))
    except orjson.JSONDecodeError:
        text = body[:4096].decode("utf-8", "replace")
        return orjson.dumps(
            oa.error_body(
                f"The upstream server answered {status} with a body that is not JSON: {text}",
                type_="server_error" if status >= 500 else "invalid_request_error",
                param=None,
                code="upstream_error",
            )
        )


for _endpoint in oa.SUPPORTED_BATCH_ENDPOINTS:
    EXECUTORS[_endpoint] = execute_openai


async def execute(
    engine: Engine, endpoint: str, body: bytes, context: RunContext | None = None
) -> RequestOutcome:
    executor = EXECUTORS.get(endpoint)
    if executor is None:
        error = oa.error_body(
            f"Endpoint {endpoint} is not supported.", param="url", code="unsupported_endpoint"
        )
        return RequestOutcome(RequestState.ERRORED, 400, orjson.dumps(error))
    return await executor(engine, endpoint, body, context or RunContext())


# Built-in surfaces beyond OpenAI register their executors exactly as an outside one would.
import batchd.scheduler.anthropic_executor  # noqa: E402, F401
