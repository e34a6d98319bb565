"""Authentication of every request, before routing.

It is ASGI middleware rather than a route dependency so that nothing escapes it: odd
spellings of paths (``//v1/batches``, trailing slashes), unknown paths, ``HEAD`` and
``OPTIONS`` all need a key, and an unauthenticated caller learns nothing about which routes
exist. ``GET /healthz`` alone is open (it says whether the server accepts work, nothing
else). ``GET /metrics`` needs a key like every other path, any tenant's (its figures are
aggregates over all tenants, but they still tell a stranger how busy the service is and how
many batches it holds; Prometheus sends the key with ``authorization: credentials``); with no
keys configured it is as open as everything else (loopback only, unless
``--insecure-no-auth``). A worker's ``--metrics-port`` is its own server, outside this. Keys
travel as ``Authorization: Bearer <key>`` (OpenAI) or ``x-api-key`` (Anthropic); when both
are sent they must be the same key.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from batchd.api.errors import error_response
from batchd.api.keyring import PUBLIC_TENANT, KeyRing
from batchd.errors import Forbidden, Unauthorized

OPEN_PATHS = frozenset({"/healthz"})  # no tenant data, no figures
# The console's page and its script and styles: no data in them (the page asks for a key and
# sends it with each of its API calls), so they load before a key is entered.
CONSOLE_PAGES = frozenset({"/console", "/console/"})
CONSOLE_STATIC = "/console/static/"


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path in CONSOLE_PAGES or path.startswith(CONSOLE_STATIC)


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents, from its ``Authorization`` and ``x-api-key`` headers (the
    first of each); Unauthorized when they carry different keys."""
    bearer = None
    if authorization and authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip()
    if bearer and x_api_key and not hmac.compare_digest(bearer.encode(), x_api_key.encode()):
        raise Unauthorized("Authorization and x-api-key carry different keys.")
    return bearer or x_api_key


def tenant_of_key(presented: str | None, keyring: KeyRing) -> str:
    """The tenant of a presented key; Unauthorized when there is none or it is unknown."""
    if not keyring.enabled:
        return PUBLIC_TENANT
    if not presented:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
            "or 'x-api-key: <key>'."
        )
    tenant = keyring.tenant_for(presented)
    if tenant is None:
        raise Unauthorized("Incorrect API key provided.")
    return tenant


def tenant_of_request(request: Request, keyring: KeyRing) -> str:
    headers = request.headers
    presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
    return tenant_of_key(presented, keyring)


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (_open(scope["path"]) and scope["method"] in ("GET", "HEAD")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            tenant = tenant_of_request(request, self.keyring)
        except Unauthorized as exc:
            response = error_response(
                request,
                exc.status_code,
                exc.message,
                openai_type=exc.openai_type,
                anthropic_type=exc.anthropic_type,
                code=exc.code,
            )
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"] = tenant
        headers = request.headers
        state["admin"] = self.keyring.is_admin(
            presented_key(headers.get("authorization"), headers.get("x-api-key"))
        )
        await self.app(scope, receive, send)


async def authenticate(request: Request) -> str:  # async: a sync one would run in a thread
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # only if the middleware was not installed: refuse, never default
        raise Unauthorized("Request was not authenticated.")
    return str(tenant)


Tenant = Annotated[str, Depends(authenticate)]


async def is_admin(request: Request) -> bool:
    return bool(getattr(request.state, "admin", False))


async def require_admin(request: Request) -> None:
    if not await is_admin(request):
        raise Forbidden("This view needs an admin key (a keys-file line marked 'admin').")


Admin = Depends(require_admin)
