"""API keys -> tenants. Keys are compared in constant time and never stored or logged:
a tenant is named by a hash of its key."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from batchd.errors import Unauthorized

PUBLIC_TENANT = "public"


def tenant_of(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    bearer = None
    if header and header[:7].lower() == "bearer ":
        bearer = header[7:].strip()
    api_key = request.headers.get("x-api-key")
    if bearer and api_key and not hmac.compare_digest(bearer, api_key):
        raise Unauthorized("Authorization and x-api-key carry different keys.")
    return bearer or api_key


def authenticate(request: Request) -> str:
    keys: list[str] = request.app.state.services.settings.api_keys
    presented = _presented_key(request)
    if not keys:
        return PUBLIC_TENANT
    if not presented:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
    match = False
    for key in keys:  # no early exit: the time taken must not depend on which key matched
        match |= hmac.compare_digest(presented.encode(), key.encode())
    if not match:
        raise Unauthorized("Incorrect API key provided.")
    return tenant_of(presented)


Tenant = Annotated[str, Depends(authenticate)]
