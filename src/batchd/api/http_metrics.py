"""Request latency per route for Prometheus, and the ``GET /metrics`` endpoint.

The route label is the matched route's template (``/v1/batches/{batch_id}``), never the raw
path: ids in labels would grow the series without bound. Requests that matched no route
(refused before routing, 404s) share the label ``unmatched``."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import metrics

# (method, route, status) -> the histogram's child: ``labels()`` validates and locks on every
# call. Bounded like the series themselves: methods, route templates, statuses.
_children: dict[tuple[str, str, int], Any] = {}


def observe(method: str, route: str, status: int, seconds: float) -> None:
    """One request served: ``route`` is the matched route's template, or ``unmatched``."""
    key = (method, route, status)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metrics.HTTP_SECONDS.labels(method, route, str(status))
    child.observe(seconds)


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            observe(scope["method"], route, status[0], time.perf_counter() - started)


def metrics_endpoint(request: Request) -> Response:
    """Aggregate figures only (no tenant, batch or prompt in any label). Behind the API keys
    like every route but ``/healthz`` (see ``api/auth.py``): any tenant's key may scrape."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
