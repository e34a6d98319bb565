"""What a batch cost and saved, and a tenant's totals per day (costs/ does the arithmetic)."""

from __future__ import annotations

import datetime
import time
from typing import Any

from batchd.costs.cost import Cost, ModelUsage, cost_of
from batchd.protocol.openai.objects import COMPLETION_WINDOW_MAX_SECONDS
from batchd.service.services import Services
from batchd.store.records import BatchRecord

MAX_USAGE_DAYS = 366


def _served(services: Services, model: str | None) -> str | None:
    """The served id of a model named in a body (an alias resolves), for its prices."""
    if model is None:
        return None
    return services.engine.resolve_model(model) or model


def batch_cost(services: Services, record: BatchRecord) -> Cost:
    """The batch's cost at batch prices and at realtime prices, from its succeeded requests'
    usage. A batch of one model (the usual case) is priced from the usage it already carries;
    one of several models reads its usage per model (one grouped query)."""
    usage = record.usage
    if usage.input_tokens == 0 and usage.output_tokens == 0:
        usages: list[ModelUsage] = []
    elif record.model is None or "," not in record.model:
        # An Anthropic batch keeps the model as its requests name it (an alias, maybe).
        served = _served(services, record.model)
        usages = [ModelUsage(served, usage.input_tokens, usage.cached_tokens, usage.output_tokens)]
    else:
        usages = [
            ModelUsage(_served(services, model), prompt, cached, completion)
            for model, prompt, cached, completion in services.store.usage_by_model(record.id)
        ]
    return cost_of(usages, services.prices)


def batch_extension(services: Services, record: BatchRecord) -> dict[str, Any]:
    """The ``batchd`` object added to both surfaces' batch objects (the SDKs keep fields they
    do not know): the cost, and for Anthropic's objects, which carry none, the usage."""
    usage = record.usage
    return {
        "usage": {
            "input_tokens": usage.input_tokens,
            "cached_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens,
        },
        "cost": batch_cost(services, record).to_wire(),
    }


def daily_totals(
    services: Services, tenant: str | None, days: int, now: float | None = None
) -> list[dict[str, Any]]:
    """Per UTC day of the last ``days`` (today included), the tenant's (None: everyone's)
    succeeded batch requests: batches, requests, tokens, and their cost and saving. Days with
    nothing are left out."""
    days = max(1, min(days, MAX_USAGE_DAYS))
    today = int((time.time() if now is None else now) // 86400)
    since = (today - days + 1) * 86400
    rows = services.store.daily_usage(tenant, since, since - COMPLETION_WINDOW_MAX_SECONDS)
    by_day: dict[int, dict[str, Any]] = {}
    usages: dict[int, list[ModelUsage]] = {}
    for day, model, batches, requests, prompt, cached, completion in rows:
        total = by_day.setdefault(
            day,
            {
                "date": (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)).isoformat(),
                "batches": 0,
                "requests": 0,
                "input_tokens": 0,
                "cached_tokens": 0,
                "output_tokens": 0,
            },
        )
        # A batch of several models counts once per model here: a day's batch count is an
        # upper bound then, its requests and tokens exact.
        total["batches"] += batches
        total["requests"] += requests
        total["input_tokens"] += prompt
        total["cached_tokens"] += cached
        total["output_tokens"] += completion
        usages.setdefault(day, []).append(
            ModelUsage(_served(services, model), prompt, cached, completion)
        )
    for day, total in by_day.items():
        total["cost"] = cost_of(usages[day], services.prices).to_wire()
    return [by_day[day] for day in sorted(by_day)]
