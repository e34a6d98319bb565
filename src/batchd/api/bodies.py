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


def depth_limit(request: Request) -> int:
    return int(request.app.state.services.settings.max_json_depth)


def check_depth(value: Any, max_depth: int) -> Any:
    """Refuse JSON nested deeper than ``max_depth`` (iteratively: no recursion to exhaust).
    Deep nesting is never a real request, and orjson serializes only 254 levels, so a body
    it parsed could otherwise fail when it is stored."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    raise InvalidRequest(
                        f"The request body is nested more than {max_depth} levels deep.",
                        param="body",
                    )
                stack.append((child, depth + 1))
    return value


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
    depth = depth_limit(request)
    try:
        if len(buffer) <= INLINE_PARSE_BYTES:
            return check_depth(orjson.loads(buffer), depth)
        return await asyncio.to_thread(lambda: check_depth(orjson.loads(buffer), depth))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", param="body") from None
