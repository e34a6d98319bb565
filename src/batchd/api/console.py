"""The web console: ``/console`` (one page, its script and styles) and the JSON it reads
under ``/console/api``. The page holds no data and needs no key to load; it asks for a key
once per browser session (kept in the tab's sessionStorage, never in a URL or a cookie) and
sends it as ``Authorization: Bearer`` on every call, here and to the surfaces' own endpoints
(downloads, cancel), so the console can do nothing the key could not do through the SDKs.
Errors are OpenAI-shaped, like every path outside ``/v1/messages``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response

from batchd.api.auth import Admin, Tenant, is_admin
from batchd.api.deps import ServicesDep, run_blocking
from batchd.errors import Forbidden, NotFound
from batchd.service import console, costs

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).with_name("console_static")
_ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
# The page runs only its own script and styles, and talks only to this origin.
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


@router.get("/console")
@router.get("/console/")
async def console_page() -> Response:
    return FileResponse(STATIC / "console.html", media_type="text/html", headers=_PAGE_HEADERS)


@router.get("/console/static/{name}")
async def console_asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"No console asset named '{name[:64]}'.")
    return FileResponse(STATIC / name, media_type=media_type, headers=_PAGE_HEADERS)


AdminFlag = Annotated[bool, Depends(is_admin)]


def _check_all_tenants(all_tenants: bool, admin: bool) -> None:
    if all_tenants and not admin:
        raise Forbidden("all_tenants needs an admin key (a keys-file line marked 'admin').")


@router.get("/console/api/me")
async def me(tenant: Tenant, admin: AdminFlag) -> dict[str, Any]:
    """Who the key is: its tenant (a keys-file tenant by its name) and whether it is an
    admin."""
    return {"tenant": tenant.removeprefix("t_"), "admin": admin}


@router.get("/console/api/batches")
async def batches(
    tenant: Tenant,
    admin: AdminFlag,
    services: ServicesDep,
    status: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    all_tenants: bool = False,
) -> dict[str, Any]:
    """Batches of both surfaces, newest first; ``status`` filters (comma-separated);
    ``all_tenants`` (admins only) shows every tenant's."""
    _check_all_tenants(all_tenants, admin)
    statuses = console.parse_statuses(status)
    owner = None if all_tenants else tenant
    return await run_blocking(
        services, lambda: console.list_batches(services, owner, statuses, limit, after)
    )


@router.get("/console/api/batches/{batch_id}")
async def batch(
    batch_id: str, tenant: Tenant, admin: AdminFlag, services: ServicesDep
) -> dict[str, Any]:
    """The batch's page; an admin may open any tenant's."""
    return await run_blocking(
        services, lambda: console.batch_page(services, None if admin else tenant, batch_id)
    )


@router.get("/console/api/usage")
async def usage(
    tenant: Tenant,
    admin: AdminFlag,
    services: ServicesDep,
    days: Annotated[int, Query(ge=1, le=costs.MAX_USAGE_DAYS)] = 14,
    all_tenants: bool = False,
) -> dict[str, Any]:
    """The tenant's (or, for admins asking, everyone's) batch usage, cost and saving per day."""
    _check_all_tenants(all_tenants, admin)
    owner = None if all_tenants else tenant
    data = await run_blocking(services, lambda: costs.daily_totals(services, owner, days))
    return {"object": "list", "data": data, "prices": services.prices.describe()}


@router.get("/console/api/engines", dependencies=[Admin])
async def engines(services: ServicesDep) -> dict[str, Any]:
    return await run_blocking(services, lambda: console.engines_view(services))
