"""The OpenAI objects we return for files and batches, and the batch create's own fields
(completion_window, metadata)."""

from __future__ import annotations

from typing import Any

from batchd.errors import InvalidRequest

COMPLETION_WINDOW_MIN_SECONDS = 60
COMPLETION_WINDOW_MAX_SECONDS = 7 * 24 * 3600
_WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}
METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512


def parse_completion_window(value: object) -> int:
    """Seconds for ``24h`` or, as our extension, any ``<n>m|h|d`` from 1m to 7d."""
    if isinstance(value, str) and len(value) >= 2 and value[:-1].isdigit():
        unit = _WINDOW_UNITS.get(value[-1])
        if unit is not None:
            seconds = int(value[:-1]) * unit
            if COMPLETION_WINDOW_MIN_SECONDS <= seconds <= COMPLETION_WINDOW_MAX_SECONDS:
                return seconds
    raise InvalidRequest(
        f"Invalid completion_window {value!r}: use '24h' or a duration from '1m' to '7d' "
        "written as <n>m, <n>h or <n>d.",
        param="completion_window",
    )


def check_metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "metadata must be an object of string keys and values.", param="metadata"
        )
    if len(value) > METADATA_MAX_KEYS:
        raise InvalidRequest(
            f"metadata has {len(value)} keys; at most {METADATA_MAX_KEYS} are allowed.",
            param="metadata",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidRequest(
                f"metadata[{key[:80]!r}] must be a string.", param=f"metadata.{key[:80]}"
            )
        if "\x00" in key or "\x00" in item:
            # No text column (PostgreSQL's least) can store NUL; refuse rather than mangle.
            raise InvalidRequest(
                f"metadata[{key[:80]!r}] contains a NUL character.", param=f"metadata.{key[:80]}"
            )
        if len(key) > METADATA_MAX_KEY_CHARS:
            raise InvalidRequest(
                f"metadata key {key[:80]!r} has {len(key)} characters; at most "
                f"{METADATA_MAX_KEY_CHARS} are allowed.",
                param="metadata",
            )
        if len(item) > METADATA_MAX_VALUE_CHARS:
            raise InvalidRequest(
                f"metadata[{key!r}] has {len(item)} characters; at most "
                f"{METADATA_MAX_VALUE_CHARS} are allowed.",
                param=f"metadata.{key}",
            )
    return value


def file_object(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(record: Any) -> dict[str, Any]:
    counts = record.counts
    usage = record.usage
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status.value,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.expires_at,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": record.expired_at,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": counts.total,
            "completed": counts.succeeded,
            # Every line that ended without a 2xx response: errored, cancelled or expired.
            # So completed + failed == total once the batch has ended.
            "failed": counts.errored + counts.canceled + counts.expired,
        },
        "usage": {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens,
        },
        "metadata": record.metadata,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
