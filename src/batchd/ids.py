"""Prefixed, time-sortable ids: readable in logs, newest-first by plain string order."""

from __future__ import annotations

import base64
import secrets
import time

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(_BASE62[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def _sortable_hex(random_bytes: int) -> str:
    # 48-bit millisecond timestamp first, so ids sort by creation time.
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(random_bytes)}"


def file_id() -> str:
    return "file-" + _base62(time.time_ns() // 1_000_000, 8) + _base62(secrets.randbits(80), 14)


def batch_id() -> str:
    return "batch_" + _sortable_hex(10)


def message_batch_id() -> str:
    return "msgbatch_" + _base62(time.time_ns() // 1_000_000, 8) + _base62(secrets.randbits(96), 17)


def message_batch_created_ms(message_batch_id: str) -> int | None:
    """When a message batch id was made (epoch milliseconds), or None for another kind of id."""
    prefix = "msgbatch_"
    stamp = message_batch_id[len(prefix) : len(prefix) + 8]
    if not message_batch_id.startswith(prefix) or len(stamp) != 8:
        return None
    value = 0
    for digit in stamp:
        if digit not in _BASE62:
            return None
        value = value * 62 + _BASE62.index(digit)
    return value


def batch_request_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def request_id() -> str:
    return "req_" + secrets.token_hex(16)


def chat_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


def message_id() -> str:
    return "msg_" + _base62(secrets.randbits(128), 22)


def response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def response_item_id() -> str:
    """An output item of a Responses API ``response`` (its assistant message)."""
    return "msg_" + secrets.token_hex(24)


def webhook_endpoint_id() -> str:
    return "we_" + _sortable_hex(10)


def webhook_event_id() -> str:
    return "evt_" + _sortable_hex(10)


def webhook_secret() -> str:
    """``whsec_`` and 32 random bytes in base64: the Standard Webhooks form the SDKs decode."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
