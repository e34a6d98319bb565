"""The console's views: batches of both surfaces in one shape, a batch's page (timeline,
counts, usage, cost, progress, first failures), the engines for an operator. The page renders
these; downloads and cancels go through the surfaces' own endpoints."""

from __future__ import annotations

import time
from typing import Any

import orjson

from batchd.engine_activity import ACTIVITY
from batchd.errors import InvalidRequest, NotFound
from batchd.service import costs
from batchd.service.services import Services
from batchd.store.records import BatchRecord, BatchStatus

MAX_FAILURES_SHOWN = 10
# The order a batch goes through its states, for its timeline.
_TIMELINE = (
    ("created", "created_at"),
    ("in_progress", "in_progress_at"),
    ("finalizing", "finalizing_at"),
    ("cancelling", "cancelling_at"),
    ("completed", "completed_at"),
    ("failed", "failed_at"),
    ("expired", "expired_at"),
    ("cancelled", "cancelled_at"),
)


def parse_statuses(value: str | None) -> list[str] | None:
    """``status=in_progress,completed`` as a list; an unknown status is a 400 naming it."""
    if not value:
        return None
    statuses = [part.strip() for part in value.split(",") if part.strip()]
    known = {status.value for status in BatchStatus}
    for status in statuses:
        if status not in known:
            raise InvalidRequest(
                f"Unknown status {status[:40]!r}: use one of {', '.join(sorted(known))}.",
                param="status",
            )
    return statuses


def progress(record: BatchRecord, now: float) -> dict[str, Any]:
    """How far the batch is: share of requests done, output tokens per second since it
    started, the time it will still take at the pace so far, and the time left in its
    completion window."""
    counts = record.counts
    done = counts.total - counts.unfinished
    started = record.in_progress_at
    elapsed = ((record.ended_at or now) - started) if started is not None else 0.0
    tokens_per_second = record.usage.output_tokens / elapsed if elapsed > 0 else 0.0
    eta = None
    if not record.status.terminal and started is not None and done and counts.unfinished:
        eta = round(elapsed / done * counts.unfinished, 1)
    return {
        "done": done,
        "total": counts.total,
        "fraction": round(done / counts.total, 4) if counts.total else 0.0,
        "output_tokens_per_second": round(tokens_per_second, 1),
        "eta_seconds": eta,
        "window_left_seconds": (
            None if record.status.terminal else max(0, int(record.expires_at - now))
        ),
    }


def batch_view(services: Services, record: BatchRecord, now: float) -> dict[str, Any]:
    counts = record.counts
    usage = record.usage
    return {
        "id": record.id,
        "surface": record.surface,
        "tenant": record.tenant,
        "endpoint": record.endpoint,
        "model": record.model,
        "status": record.status.value,
        "completion_window": record.completion_window,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "ended": record.status.terminal,
        "request_counts": {
            "total": counts.total,
            "pending": counts.pending,
            "running": counts.running,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        },
        "usage": {
            "input_tokens": usage.input_tokens,
            "cached_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens,
        },
        "cost": costs.batch_cost(services, record).to_wire(),
        "progress": progress(record, now),
        "input_file_id": record.input_file_id,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "metadata": record.metadata,
    }


def list_batches(
    services: Services,
    tenant: str | None,
    statuses: list[str] | None,
    limit: int,
    older_than: str | None,
) -> dict[str, Any]:
    """A page of batches, newest first: ``tenant``'s, or every tenant's (None; admins)."""
    records, has_more = services.store.console_batches(
        tenant,
        statuses=statuses,
        limit=limit,
        older_than=older_than,
        stats_max_age=services.settings.batch_counts_max_age_seconds,
    )
    now = time.time()
    return {
        "object": "list",
        "data": [batch_view(services, record, now) for record in records],
        "has_more": has_more,
    }


def _failure(row: dict[str, Any]) -> dict[str, Any]:
    """A failed request as the page shows it: its line, custom_id and error message."""
    message = row["state"]
    try:
        stored = orjson.loads(row["result"]) if row["result"] else None
    except orjson.JSONDecodeError:
        stored = None
    if isinstance(stored, dict):
        inner = stored.get("error")
        error: dict[str, Any] = inner if isinstance(inner, dict) else stored
        message = str(error.get("message") or message)
    return {
        "line": row["line"],
        "custom_id": row["custom_id"],
        "state": row["state"],
        "status_code": row["status_code"],
        "message": message[:500],
    }


def batch_page(services: Services, tenant: str | None, batch_id: str) -> dict[str, Any]:
    """Everything the batch's page shows. ``tenant`` None: an admin, who sees any batch."""
    record = services.store.get_batch(
        batch_id, tenant, stats_max_age=services.settings.batch_counts_max_age_seconds
    )
    if record is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    view = batch_view(services, record, time.time())
    view["timeline"] = [
        {"status": status, "at": getattr(record, attribute)}
        for status, attribute in _TIMELINE
        if getattr(record, attribute) is not None
    ]
    view["validation_errors"] = record.errors or []
    view["failures"] = [
        _failure(row) for row in services.store.first_failures(record.id, MAX_FAILURES_SHOWN)
    ]
    return view


def engines_view(services: Services) -> dict[str, Any]:
    """For operators: the models served, work running and queued (by tenant), and how this
    process's engines split their output between realtime and batch over the last hour."""
    engine = services.engine
    unavailable = set(engine.unavailable_models())
    queue = services.store.queue_by_tenant()
    return {
        "models": [
            {
                "id": info.id,
                "engine": info.kind or engine.kind,
                "context_length": info.context_length,
                "aliases": list(info.aliases),
                "available": info.id not in unavailable,
            }
            for info in engine.models()
        ],
        "engine_kind": engine.kind,
        "batch_capacity": engine.capacity(),
        "running": sum(q["running"] for q in queue.values()),
        "queued": sum(q["pending"] for q in queue.values()),
        "queue_by_tenant": [
            {"tenant": tenant, **counts} for tenant, counts in sorted(queue.items())
        ],
        "activity": ACTIVITY.last_hour(),
        "prices": services.prices.describe(),
    }
