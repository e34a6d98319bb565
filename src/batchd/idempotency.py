"""``Idempotency-Key`` on creates (file upload, OpenAI batch, Anthropic message batch).

A client that retries a create after a timeout cannot know whether the first attempt landed.
With a key, the retry returns the object the first attempt made instead of making a second
one; the same key with a different request is a 409, and so is a retry that arrives while the
first attempt is still running. Keys belong to the tenant and are remembered for 24 hours.

"The same request" means the same content: the JSON body (key order ignored) or, for an
upload, the purpose, the filename and the bytes (their SHA-256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request

from batchd.errors import BatchdError, InvalidRequest
from batchd.store.store import Store

HEADER = "idempotency-key"
TTL_SECONDS = 24 * 3600
MAX_KEY_LENGTH = 255

SCOPE_FILES = "files"
SCOPE_BATCHES = "batches"
SCOPE_MESSAGE_BATCHES = "message_batches"

T = TypeVar("T")


class IdempotencyConflict(BatchdError):
    status_code = 409
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "idempotency_key_conflict"


def key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
            param="Idempotency-Key",
        )
    return key


def fingerprint_json(body: Any) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def fingerprint_upload(purpose: str, filename: str, content_sha256: str) -> str:
    return fingerprint_json({"purpose": purpose, "filename": filename, "sha256": content_sha256})


def create_once(
    store: Store,
    *,
    tenant: str,
    scope: str,
    key: str | None,
    fingerprint: str,
    create: Callable[[], T],
    fetch: Callable[[str], T],
    object_id: Callable[[T], str],
) -> T:
    """``create()``, unless ``key`` was used before: then the earlier object (``fetch``)."""
    if key is None:
        return create()
    earlier = store.claim_idempotency_key(tenant, scope, key, fingerprint, TTL_SECONDS)
    if earlier is not None:
        if earlier.fingerprint != fingerprint:
            raise IdempotencyConflict(
                "This Idempotency-Key was already used with a different request; use a new "
                "key for a new request.",
                param="Idempotency-Key",
            )
        if earlier.object_id is None:
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still being processed; retry shortly.",
                param="Idempotency-Key",
            )
        return fetch(earlier.object_id)
    try:
        made = create()
    except BaseException:
        store.settle_idempotency_key(tenant, scope, key, None)  # let the retry run
        raise
    store.settle_idempotency_key(tenant, scope, key, object_id(made))
    return made
