"""``Idempotency-Key`` on creates (file upload, OpenAI batch, Anthropic message batch).

A client that retries a create after a timeout cannot know whether the first attempt landed.
With a key, the retry returns the object the first attempt made instead of making a second
one; the same key with a different request is a 409. Keys belong to the tenant and are
remembered for 24 hours.

The key row is written in the same transaction as the object it names (the store's create
methods take it), so there is no claim to release: a create that fails or a process killed at
any point leaves the key unused, and a retry runs the create afresh. Two creates racing with
one key both do their work; the store lets exactly one commit, and the other answers with the
winner's object.

"The same request" means the same content: the JSON body (key order ignored) or, for an
upload, the purpose, the filename and the bytes (their SHA-256).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson

from batchd import failpoints
from batchd.errors import IdempotencyConflict, IdempotencyKeyTaken, InvalidRequest
from batchd.store.records import EarlierCreate, IdempotencyKey
from batchd.store.store import Store

HEADER = "idempotency-key"
TTL_SECONDS = 24 * 3600
MAX_KEY_LENGTH = 255

SCOPE_FILES = "files"
SCOPE_BATCHES = "batches"
SCOPE_MESSAGE_BATCHES = "message_batches"

T = TypeVar("T")


def key_of(headers: Mapping[str, str]) -> str | None:
    """The request's Idempotency-Key, checked; None without one."""
    key = headers.get(HEADER)
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


def fingerprint_upload(
    purpose: str, filename: str, content_sha256: str, expires_after: int | None = None
) -> str:
    form: dict[str, object] = {"purpose": purpose, "filename": filename, "sha256": content_sha256}
    if expires_after is not None:  # absent otherwise: fingerprints from before it stay valid
        form["expires_after"] = expires_after
    return fingerprint_json(form)


def create_once(
    store: Store,
    *,
    tenant: str,
    scope: str,
    key: str | None,
    fingerprint: str,
    create: Callable[[IdempotencyKey | None], T],
    fetch: Callable[[str], T],
) -> T:
    """``create(idempotency)``, unless ``key`` was used before: then the earlier object
    (``fetch``). ``create`` must hand ``idempotency`` to the store method that commits its
    object, which records the key in that same transaction."""
    if key is None:
        return create(None)
    earlier = store.find_idempotency_key(tenant, scope, key, TTL_SECONDS)
    if earlier is not None:
        return fetch(_same_request(earlier, fingerprint))
    try:
        made = create(IdempotencyKey(tenant, scope, key, fingerprint, TTL_SECONDS))
    except Exception as exc:
        # Another create with this key committed first (IdempotencyKeyTaken), or this one
        # failed (say, a limit) while another with the key succeeded: answer as a retry
        # arriving now would be answered.
        earlier = store.find_idempotency_key(tenant, scope, key, TTL_SECONDS)
        if earlier is None:
            if isinstance(exc, IdempotencyKeyTaken):  # taken, then forgotten: vanishingly rare
                raise IdempotencyConflict(
                    "Another request with this Idempotency-Key was being processed; retry.",
                    param="Idempotency-Key",
                ) from None
            raise
        return fetch(_same_request(earlier, fingerprint))
    failpoints.hit("create.committed")  # committed, not yet answered
    return made


def _same_request(earlier: EarlierCreate, fingerprint: str) -> str:
    if earlier.fingerprint != fingerprint:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request; use a new "
            "key for a new request.",
            param="Idempotency-Key",
        )
    return earlier.object_id
