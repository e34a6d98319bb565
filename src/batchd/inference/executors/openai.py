"""The executor for OpenAI batch requests (/v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/responses).

A body only the engine can judge wrong (unknown model, context overflow, malformed messages)
becomes an errored outcome in OpenAI's error shape for that line alone. A model served by an
upstream engine gets the body as it is, and the upstream's final status and body become the
outcome; an upstream that keeps failing raises ``RetryLater`` through to the scheduler.
"""

from __future__ import annotations

import orjson

from batchd.engines.base import Engine, ForwardResponse, Priority, RetryLater
from batchd.errors import BatchdError
from batchd.inference.dispatch import Relayed, complete_openai, plan_openai
from batchd.inference.executors.base import RunContext
from batchd.protocol.openai import results as oa_results
from batchd.store.records import RequestOutcome, RequestState


def _errored(exc: BatchdError, attempts: int = 0) -> RequestOutcome:
    error = oa_results.error_body(
        exc.message, type_=exc.openai_type, param=exc.param, code=exc.code
    )
    return RequestOutcome(
        RequestState.ERRORED, exc.status_code, orjson.dumps(error), upstream_attempts=attempts
    )


async def execute_openai(
    engine: Engine, endpoint: str, body: bytes, context: RunContext | None = None
) -> RequestOutcome:
    context = context or RunContext()
    try:
        plan = plan_openai(engine, endpoint, orjson.loads(body), Priority.BATCH, context.deadline)
        answer = await complete_openai(engine, plan)
    except RetryLater as later:
        # The scheduler releases the row and records the attempts made so far.
        later.attempts += context.prior_attempts
        raise
    except BatchdError as exc:
        return _errored(exc, context.prior_attempts)
    if isinstance(answer, Relayed):
        return _relayed(answer.response, context)
    return RequestOutcome(
        RequestState.SUCCEEDED,
        200,
        orjson.dumps(answer.body),
        prompt_tokens=answer.result.prompt_tokens,
        completion_tokens=answer.result.completion_tokens,
        cached_tokens=answer.result.cached_tokens,
        # A Responses line for an upstream model is sent on as a chat completion.
        upstream_attempts=(
            context.prior_attempts + answer.result.attempts
            if engine.passthrough(plan.request.model) is not None
            else 0
        ),
    )


def _relayed(response: ForwardResponse, context: RunContext) -> RequestOutcome:
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
            oa_results.error_body(
                f"The upstream server answered {status} with a body that is not JSON: {text}",
                type_="server_error" if status >= 500 else "invalid_request_error",
                param=None,
                code="upstream_error",
            )
        )
