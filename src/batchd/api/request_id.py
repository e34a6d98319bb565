"""Every response carries an ``x-request-id`` (both SDKs surface it in errors and logs).

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each
request in an extra task with memory streams, a cost every poll would pay."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import ids


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
                headers = list(message.get("headers", ()))
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", ids.request_id().encode("latin-1")))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
