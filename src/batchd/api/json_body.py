"""Reading request bodies: under a byte limit, and never waiting forever for the next chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import Request

from batchd.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from batchd.protocol.jsonstrict import duplicate_key, nesting_depth

# Bodies up to this size are parsed on the event loop; larger ones in a thread, so one big
# create does not stall every other request for the duration of the parse.
INLINE_PARSE_BYTES = 1024 * 1024


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is {size} bytes; this endpoint accepts at most {limit} bytes.",
        param="body",
    )


async def iter_body(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks, giving up with a 408 when the client sends nothing for
    ``body_idle_timeout_seconds``: uvicorn waits for a body forever, so a client that stalls
    mid-upload (or declares more bytes than it sends) would otherwise hold its upload open
    for good. Only this request waits; the event loop serves everyone else meanwhile."""
    idle = float(request.app.state.services.settings.body_idle_timeout_seconds)
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), idle)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"The request body stopped arriving: nothing was received for {idle:g} seconds.",
                param="body",
            ) from None
        yield chunk


def depth_limit(request: Request) -> int:
    return int(request.app.state.services.settings.max_json_depth)


def check_depth(value: Any, max_depth: int) -> Any:
    """Refuse JSON nested deeper than ``max_depth``, naming the depth it has.
    Deep nesting is never a real request, and orjson serializes only 254 levels, so a body
    it parsed could otherwise fail when it is stored."""
    depth = nesting_depth(value)
    if depth > max_depth:
        raise InvalidRequest(
            f"The request body is nested {depth} levels deep; more than {max_depth} levels"
            " is refused (max_json_depth).",
            param="body",
        )
    return value


async def read_bytes(request: Request, limit: int) -> bytearray:
    """The whole body. Refuse by Content-Length up front, and count while reading: a chunked
    body (or one whose header lies) is cut off at ``limit`` bytes rather than read to its
    end."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(declared, limit)
    buffer = bytearray()
    async for chunk in iter_body(request):
        buffer += chunk
        if len(buffer) > limit:
            raise _too_large(f"at least {len(buffer)}", limit)  # what arrived so far
    return buffer


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON, at most ``limit`` bytes of it (read_bytes)."""
    buffer = await read_bytes(request, limit)
    depth = depth_limit(request)
    if len(buffer) <= INLINE_PARSE_BYTES:
        return _parse(buffer, depth)
    return await asyncio.to_thread(_parse, buffer, depth)


def _parse(buffer: bytes | bytearray, max_depth: int) -> Any:
    try:
        value = orjson.loads(buffer)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", param="body") from None
    check_depth(value, max_depth)
    duplicated = duplicate_key(buffer)
    if duplicated is not None:
        raise InvalidRequest(
            f"The request body names the key {duplicated[:100]!r} twice in one object.",
            param=duplicated[:100],
        )
    return value
