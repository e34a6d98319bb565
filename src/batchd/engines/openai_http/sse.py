"""OpenAI server-sent event streams: the events of one, and the ``usage`` it reports.

A ``usage`` a stream reports (OpenAI's ``stream_options.include_usage``, vLLM's and SGLang's
final chunk) settles the token budget as a full response's does; a stream without one
(llama-cpp-python's server ignores ``stream_options``) stays charged the estimate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from batchd.engines.openai_http.bodies import usage_counts
from batchd.errors import UpstreamError


class StreamUsage:
    """Watches an OpenAI SSE stream go by (chunks cut anywhere) for the last ``usage`` it
    reports, without parsing any event that does not mention one."""

    MAX_LINE_BYTES = 1 << 20  # a longer line is not an event we need to read

    def __init__(self) -> None:
        self.partial = b""
        self.found = False
        self.prompt = 0
        self.completion = 0

    def feed(self, chunk: bytes) -> None:
        data = self.partial + chunk
        *lines, self.partial = data.split(b"\n")
        if len(self.partial) > self.MAX_LINE_BYTES:
            self.partial = b""
        for line in lines:
            if b'"usage"' in line:
                self._read(line.strip())

    def _read(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        try:
            event = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        usage = event.get("usage")
        if usage is None and isinstance(event.get("response"), dict):
            usage = event["response"].get("usage")  # a Responses stream's response.completed
        prompt, completion, _ = usage_counts(usage)
        if prompt or completion:
            self.found = True
            self.prompt, self.completion = prompt, completion


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON ``data:`` events of an OpenAI stream, up to ``[DONE]``. An error event in
    place of a chunk raises ``UpstreamError``."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                if "error" in event and "choices" not in event:
                    raise UpstreamError(500, data)
                yield event
