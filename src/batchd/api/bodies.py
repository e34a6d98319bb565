"""Reading a JSON request body under a byte limit."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import Request

from batchd.errors import InvalidRequest, PayloadTooLarge

# Bodies up to this size are parsed on the event loop; larger ones in a thread, so one big
# create does not stall every other request for the duration of the parse.
INLINE_PARSE_BYTES = 1024 * 1024


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is {size} bytes; this endpoint accepts at most {limit} bytes.",
        param="body",
    )


async def read_json(request: Request, limit: int) -> Any:
    """Refuse by Content-Length up front, and count while reading: a chunked body (or one
    whose header lies) is cut off at ``limit`` bytes rather than read to its end."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > limit:
            raise _too_large(f"more than {limit}", limit)
    try:
        if len(buffer) <= INLINE_PARSE_BYTES:
            return orjson.loads(buffer)
        return await asyncio.to_thread(orjson.loads, buffer)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", param="body") from None
