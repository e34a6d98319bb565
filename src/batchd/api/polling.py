"""The polling fast path: ``GET /v1/batches/{id}``, ``GET /v1/batches`` and their Anthropic
equivalents, the requests a fleet of clients sends every second, served without FastAPI's
per-request routing and dependency solving.

Profiled under 200 pollers, routing a request through the included routers and solving its
dependencies cost about as much CPU as reading the batch and rendering it. This middleware sits
inside authentication (the tenant is already in the scope) and outside FastAPI's router: for
one of the four polling routes with plain parameters it calls that route's own endpoint
function with the parameters FastAPI would have bound, and sends the response it returns. So
the handler code, the store read and the bytes sent are the same ones; only the dispatch is
shorter. Anything else goes down the normal path: another method or path, a query FastAPI
would validate or reject (a ``limit`` that is not a plain in-range number, a repeated or
unknown parameter), and any error the endpoint raises (the full path then runs the request
again and renders the error exactly as before; a 404 costs two cheap reads).

The route label of ``batchd_http_request_duration_seconds`` is the matched route's template,
as it is for every other route: the middleware puts the route in the scope like the router
does.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from batchd.api import anthropic_batches, openai_batches
from batchd.service import Services

# (the request, its path match, the tenant, the services) -> the endpoint's response, or None
# when the request needs FastAPI's own handling.
Handler = Callable[[Request, "re.Match[str]", str, Services], Awaitable[Response | None]]
_PLAIN_LIMIT = re.compile(r"[1-9][0-9]{0,3}")


def _plain_query(request: Request, allowed: frozenset[str]) -> dict[str, str] | None:
    """The query's parameters if each is one of ``allowed`` and given once, else None."""
    items = request.query_params.multi_items()
    params = dict(items)
    if len(params) != len(items) or not params.keys() <= allowed:
        return None
    return params


def _limit(params: dict[str, str], maximum: int) -> int | None:
    """The page size, default 20; None unless FastAPI would take it as it stands."""
    raw = params.get("limit")
    if raw is None:
        return 20
    if not _PLAIN_LIMIT.fullmatch(raw) or int(raw) > maximum:
        return None
    return int(raw)


async def _openai_retrieve(
    request: Request, match: re.Match[str], tenant: str, services: Services
) -> Response | None:
    if request.scope["query_string"]:
        return None
    return await openai_batches.retrieve_batch(match["batch_id"], tenant, services)


_OPENAI_LIST_PARAMS = frozenset({"after", "limit"})


async def _openai_list(
    request: Request, match: re.Match[str], tenant: str, services: Services
) -> Response | None:
    params = _plain_query(request, _OPENAI_LIST_PARAMS)
    if params is None or (limit := _limit(params, 100)) is None:
        return None
    return await openai_batches.list_batches(tenant, services, params.get("after"), limit)


async def _anthropic_retrieve(
    request: Request, match: re.Match[str], tenant: str, services: Services
) -> Response | None:
    if request.scope["query_string"]:
        return None
    return await anthropic_batches.retrieve_message_batch(
        match["message_batch_id"], request, tenant, services
    )


_ANTHROPIC_LIST_PARAMS = frozenset({"before_id", "after_id", "limit"})


async def _anthropic_list(
    request: Request, match: re.Match[str], tenant: str, services: Services
) -> Response | None:
    params = _plain_query(request, _ANTHROPIC_LIST_PARAMS)
    if params is None or (limit := _limit(params, 1000)) is None:
        return None
    return await anthropic_batches.list_message_batches(
        request, tenant, services, params.get("before_id"), params.get("after_id"), limit
    )


@dataclass(frozen=True)
class _Poll:
    route: APIRoute
    handler: Handler


def _route_of(endpoint: Callable[..., object], *routers: object) -> APIRoute:
    for router in routers:
        for route in getattr(router, "routes", []):
            if isinstance(route, APIRoute) and route.endpoint is endpoint:
                return route
    raise LookupError(f"no route serves {endpoint.__name__}")


def _polls() -> list[_Poll]:
    routers = (openai_batches.router, anthropic_batches.router)
    table: list[tuple[Callable[..., object], Handler]] = [
        (openai_batches.retrieve_batch, _openai_retrieve),
        (openai_batches.list_batches, _openai_list),
        (anthropic_batches.retrieve_message_batch, _anthropic_retrieve),
        (anthropic_batches.list_message_batches, _anthropic_list),
    ]
    polls = []
    for endpoint, handler in table:
        route = _route_of(endpoint, *routers)
        if route.methods != {"GET"}:
            raise LookupError(f"{route.path} is not a GET route")
        polls.append(_Poll(route, handler))
    return polls


class PollingFastPath:
    """ASGI middleware; install it inside authentication (see the module's docstring)."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.polls = _polls()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            response = await self._try(scope)
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _try(self, scope: Scope) -> Response | None:
        path = scope["path"]
        for poll in self.polls:
            match = poll.route.path_regex.match(path)
            if match is None:
                continue
            tenant = scope.get("state", {}).get("tenant")
            if tenant is None:
                return None
            try:
                response = await poll.handler(Request(scope), match, tenant, self.services)
            except Exception:  # the full path runs it again and renders whatever this was
                return None
            if response is not None:
                scope["route"] = poll.route  # the metrics' route label
            return response
        return None
