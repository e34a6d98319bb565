"""Running one request line on the engine, by the endpoint it was written for.

Each surface registers an executor for its endpoints; an executor turns a stored body into a
``RequestOutcome`` (the wire body to store, plus token usage). A body only the engine can judge
wrong (unknown model, context overflow, malformed messages) becomes an errored outcome for that
line alone; its siblings are unaffected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import orjson

from batchd.engines.base import Engine, GenerationRequest, Priority
from batchd.errors import BatchdError, ModelNotFound
from batchd.protocol import openai as oa
from batchd.store.records import RequestOutcome, RequestState

Executor = Callable[[Engine, str, bytes], Awaitable[RequestOutcome]]

EXECUTORS: dict[str, Executor] = {}


def resolve(engine: Engine, generation: GenerationRequest) -> GenerationRequest:
    served = engine.resolve_model(generation.model)
    if served is None:
        raise ModelNotFound(generation.model)
    return replace(generation, model=served)


async def execute_openai(engine: Engine, endpoint: str, body: bytes) -> RequestOutcome:
    try:
        parsed = oa.parse_body(endpoint, orjson.loads(body))
        generation = resolve(engine, parsed.to_generation(Priority.BATCH))
        result = await engine.generate(generation)
    except BatchdError as exc:
        error = oa.error_body(exc.message, type_=exc.openai_type, param=exc.param, code=exc.code)
        return RequestOutcome(RequestState.ERRORED, exc.status_code, orjson.dumps(error))
    response = oa.response_body(endpoint, parsed.model, result)
    return RequestOutcome(
        RequestState.SUCCEEDED,
        200,
        orjson.dumps(response),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.cached_tokens,
    )


for _endpoint in oa.SUPPORTED_BATCH_ENDPOINTS:
    EXECUTORS[_endpoint] = execute_openai


async def execute(engine: Engine, endpoint: str, body: bytes) -> RequestOutcome:
    executor = EXECUTORS.get(endpoint)
    if executor is None:
        error = oa.error_body(
            f"Endpoint {endpoint} is not supported.", param="url", code="unsupported_endpoint"
        )
        return RequestOutcome(RequestState.ERRORED, 400, orjson.dumps(error))
    return await executor(engine, endpoint, body)


# Built-in surfaces beyond OpenAI register their executors exactly as an outside one would.
import batchd.scheduler.anthropic_executor  # noqa: E402, F401
