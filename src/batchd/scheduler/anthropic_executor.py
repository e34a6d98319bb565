"""The executor for Anthropic batch requests (endpoint ``/v1/messages``).

It registers itself in ``execute.EXECUTORS`` as any surface would. The stored result is the
full Anthropic ``message`` for a success, and a full ``ErrorResponse`` for a request only
execution can judge wrong (its params, its model, its context length); siblings are unaffected.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from batchd.engines.base import Engine, Priority, RetryLater, passthrough_engine
from batchd.errors import BatchdError, UpstreamError
from batchd.protocol import anthropic as am
from batchd.scheduler.execute import EXECUTORS, RunContext, resolve
from batchd.store.records import RequestOutcome, RequestState


async def execute_message(
    engine: Engine, endpoint: str, body: bytes, context: RunContext
) -> RequestOutcome:
    try:
        params = am.parse_params(orjson.loads(body), in_batch=True)
        generation = resolve(engine, params.to_generation(Priority.BATCH))
        generation = replace(generation, deadline=context.deadline)
        result = await engine.generate(generation)
    except RetryLater as later:
        later.attempts += context.prior_attempts
        raise
    except UpstreamError as exc:
        # Final upstream answer: its status, and its message inside Anthropic's shape.
        error = am.error_body(exc.anthropic_type, exc.message)
        return RequestOutcome(
            RequestState.ERRORED,
            exc.status_code,
            orjson.dumps(error),
            upstream_attempts=context.prior_attempts + exc.attempts,
        )
    except BatchdError as exc:
        error = am.error_body(exc.anthropic_type, exc.message)
        return RequestOutcome(RequestState.ERRORED, exc.status_code, orjson.dumps(error))
    message = am.message_body(params.model, result, service_tier="batch")
    upstream = engine.resolve_model(params.model) or ""
    return RequestOutcome(
        RequestState.SUCCEEDED,
        200,
        orjson.dumps(message),
        prompt_tokens=result.prompt_tokens,
        completion_tokens=message["usage"]["output_tokens"],
        cached_tokens=result.cached_tokens,
        upstream_attempts=(
            context.prior_attempts + result.attempts if _is_upstream(engine, upstream) else 0
        ),
    )


def _is_upstream(engine: Engine, model: str) -> bool:
    return passthrough_engine(engine, model) is not None


EXECUTORS[am.MESSAGES_ENDPOINT] = execute_message
