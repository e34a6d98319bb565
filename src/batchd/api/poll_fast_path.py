"""The polling fast path: ``GET /v1/batches/{id}``, ``GET /v1/batches`` and their Anthropic
equivalents, the requests a fleet of clients sends every second, served ahead of the whole
FastAPI application.

Under 200 pollers with a batch running on the same two cores, every poll runs with caches
the engine has just flushed, and costs about five times what it costs back to back (measured:
0.1 ms warm, 0.5 ms under the engine); what it costs is taken from the engine. So the poll
takes the shortest way there is: this ASGI app wraps the FastAPI app and answers the four
polling routes itself, with plain parameters and a key that authenticates, by calling that
route's own endpoint function with the parameters FastAPI would have bound. It does what the
layers it skips would have done for such a request: authentication (``auth.presented_key``
and ``auth.tenant_of_key``, the same code), the request id headers, and the latency
histogram under the route's template. So the handler code, the store read and the bytes sent
are the same ones; only the dispatch is shorter: Starlette's error and exception layers,
FastAPI's routing and dependency solving, and four middleware layers, each wrapping ``send``.

While a batch decodes on the embedded engine, polls are what loop pacing moderates
(loop_pacing.py); every request that takes the full path runs with the loop unpaced.

Anything else goes down the full path: another method or path, a query FastAPI would validate
or reject (a ``limit`` that is not a plain in-range number, a repeated or unknown parameter),
a request the key check refuses (the full path renders the 401 in the surface's shape), and
any error the endpoint raises (the full path runs the request again and renders the error
exactly as before; a 404 costs two cheap reads).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from batchd.api import anthropic_batches, http_metrics, openai_batches
from batchd.api.auth import presented_key, tenant_of_key
from batchd.api.keyring import KeyRing
from batchd.api.request_id import with_request_id
from batchd.errors import Unauthorized
from batchd.service.services import Services

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


# Every polling route's path starts with one of these: anything else skips the regexes.
_PREFIXES = ("/v1/batches", "/v1/messages/batches")


def _tenant(scope: Scope, keyring: KeyRing) -> str | None:
    """The request's tenant, or None when the key check refuses it (the full path answers)."""
    authorization = x_api_key = None
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1")
    try:
        return tenant_of_key(presented_key(authorization, x_api_key), keyring)
    except Unauthorized:
        return None


class PollingFastPath:
    """The ASGI app to serve: the polling routes answered here, everything else by ``app``."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.services: Services = app.state.services
        self.keyring: KeyRing = app.state.keyring  # the one SIGHUP reloads
        self.polls = _polls()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(_PREFIXES)
            and not scope.get("root_path")
        ):
            started = time.perf_counter()
            served = await self._serve(scope, send)
            if served is not None:
                route, status = served
                http_metrics.observe("GET", route, status, time.perf_counter() - started)
                return
        pacer = self.services.pacer
        if pacer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Not a poll: the loop must not moderate its wake-ups while this is in flight (an
        # upload or a download would get one read or write per interval; loop_pacing.py).
        with pacer.unpaced():
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, send: Send) -> tuple[str, int] | None:
        """(route template, status) once the response is sent; None to take the full path."""
        path = scope["path"]
        for poll in self.polls:
            match = poll.route.path_regex.match(path)
            if match is None:
                continue
            tenant = _tenant(scope, self.keyring)
            if tenant is None:
                return None
            try:
                response = await poll.handler(Request(scope), match, tenant, self.services)
            except Exception:  # the full path runs it again and renders whatever this was
                return None
            if response is None:
                return None
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": with_request_id(path, list(response.raw_headers)),
                }
            )
            await send({"type": "http.response.body", "body": response.body})
            return poll.route.path, response.status_code
        return None
