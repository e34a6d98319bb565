"""Rows for the store contract suite, built the way the service and validation build them."""

from __future__ import annotations

from typing import Any

from batchd.clock import now
from batchd.store.records import (
    BatchStatus,
    FileRecord,
    IdempotencyKey,
    RequestLine,
    RequestOutcome,
    RequestState,
)
from batchd.store.store import Store

TENANT = "t"
CHAT = "/v1/chat/completions"
DAY = 24 * 3600

OK = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)


def batch_values(
    batch_id: str,
    *,
    tenant: str = TENANT,
    surface: str = "openai",
    status: BatchStatus = BatchStatus.VALIDATING,
    input_file_id: str | None = "file-x",
    expires_in: int = 3600,
    **extra: Any,
) -> dict[str, Any]:
    """The values of a batch row as the service inserts it."""
    return {
        "id": batch_id,
        "tenant": tenant,
        "surface": surface,
        "endpoint": "/v1/messages" if surface == "anthropic" else CHAT,
        "input_file_id": input_file_id,
        "completion_window": "24h",
        "status": status.value,
        "created_at": now(),
        "expires_at": now() + expires_in,
        **extra,
    }


def lines(count: int, *, model: str = "m", prefix: str = "k") -> list[RequestLine]:
    return [RequestLine(i + 1, f"c{i}", b"{}", model, prefix) for i in range(count)]


def add_batch(
    store: Store,
    batch_id: str,
    rows: int,
    *,
    tenant: str = TENANT,
    model: str = "m",
    **values: Any,
) -> None:
    """A running batch of ``rows`` pending rows: created validating, filled, then started."""
    store.create_batch(batch_values(batch_id, tenant=tenant, **values))
    store.insert_requests(batch_id, lines(rows, model=model))
    assert store.transition(batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)


def file_record(
    file_id: str,
    *,
    tenant: str = TENANT,
    purpose: str = "batch",
    expires_at: int | None = None,
) -> FileRecord:
    return FileRecord(file_id, tenant, "in.jsonl", purpose, 9, now(), expires_at, f"blob-{file_id}")


def key(name: str = "k", *, tenant: str = TENANT, scope: str = "files") -> IdempotencyKey:
    return IdempotencyKey(tenant, scope, name, "fp", DAY)


def finish_all(store: Store, owner: str = "w") -> None:
    """Lease and succeed every pending row."""
    while leased := store.lease(owner, 100, lease_seconds=30):
        for item in leased:
            assert store.complete(item, owner, OK)
