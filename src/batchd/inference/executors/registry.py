"""The endpoint -> executor table the scheduler runs batch rows through.

Built here, explicitly: a surface's executor runs once it is listed below, with no import
needed elsewhere to register it.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from batchd.engines.base import Engine
from batchd.inference.executors.anthropic import execute_message
from batchd.inference.executors.base import Executor, RunContext
from batchd.inference.executors.openai import execute_openai
from batchd.protocol import anthropic as am
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai import results as oa_results
from batchd.store.records import RequestOutcome, RequestState

EXECUTORS: Mapping[str, Executor] = {
    **dict.fromkeys(oa_bodies.SUPPORTED_BATCH_ENDPOINTS, execute_openai),
    am.MESSAGES_ENDPOINT: execute_message,
}


async def execute(
    engine: Engine, endpoint: str, body: bytes, context: RunContext | None = None
) -> RequestOutcome:
    """Run one stored request line on ``engine`` by the endpoint it was written for."""
    executor = EXECUTORS.get(endpoint)
    if executor is None:
        error = oa_results.error_body(
            f"Endpoint {endpoint} is not supported.", param="url", code="unsupported_endpoint"
        )
        return RequestOutcome(RequestState.ERRORED, 400, orjson.dumps(error))
    return await executor(engine, endpoint, body, context or RunContext())
