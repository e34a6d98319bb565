"""Every response carries an ``x-request-id`` (both SDKs surface it in errors and logs), and
on the Anthropic surface (paths under ``/v1/messages``) the same id as ``request-id`` too,
the header Anthropic sends and its SDK reads into ``_request_id``.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each
request in an extra task with memory streams, a cost every poll would pay."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import ids

_ANTHROPIC_PATH = re.compile(r"^/+v1/+messages")


def is_anthropic_path(path: str) -> bool:
    """Whether ``path`` is on the Anthropic surface (repeated slashes collapsed)."""
    return _ANTHROPIC_PATH.match(path) is not None


def with_request_id(path: str, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with the response's request id added: ``x-request-id`` (kept if already
    set, as an error body's ``request_id`` sets it) and, on the Anthropic surface,
    ``request-id`` with the same value."""
    current = next((value for name, value in headers if name == b"x-request-id"), None)
    if current is None:
        current = ids.request_id().encode("latin-1")
        headers = [*headers, (b"x-request-id", current)]
    if is_anthropic_path(path) and not any(name == b"request-id" for name, _ in headers):
        headers = [*headers, (b"request-id", current)]
    return headers


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The raw header list, as MutableHeaders would edit it, without building one.
                message["headers"] = with_request_id(
                    scope["path"], list(message.get("headers", ()))
                )
            await send(message)

        await self.app(scope, receive, send_with_id)
