"""The executor for Anthropic batch requests (endpoint ``/v1/messages``).

The stored result is the full Anthropic ``message`` for a success, and a full ``ErrorResponse``
for a request only execution can judge wrong (its params, its model, its context length);
siblings are unaffected.
"""

from __future__ import annotations

import orjson

from batchd.engines.base import Engine, Priority, RetryLater
from batchd.errors import BatchdError, UpstreamError
from batchd.inference.dispatch import complete_message, plan_message
from batchd.inference.executors.base import RunContext
from batchd.protocol import anthropic as am
from batchd.store.records import RequestOutcome, RequestState


async def execute_message(
    engine: Engine, endpoint: str, body: bytes, context: RunContext
) -> RequestOutcome:
    try:
        plan = plan_message(engine, orjson.loads(body), Priority.BATCH, context.deadline)
        answer = await complete_message(engine, plan)
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
    upstream = engine.resolve_model(plan.params.model) or ""
    return RequestOutcome(
        RequestState.SUCCEEDED,
        200,
        orjson.dumps(answer.body),
        prompt_tokens=answer.result.prompt_tokens,
        completion_tokens=answer.body["usage"]["output_tokens"],
        cached_tokens=answer.result.cached_tokens,
        upstream_attempts=(
            context.prior_attempts + answer.result.attempts
            if engine.passthrough(upstream) is not None
            else 0
        ),
    )
