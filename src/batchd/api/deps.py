"""Typed dependency aliases shared by the routers, and how a route runs a store read.

The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the
thread pool, a hop (and a fight for the GIL) that cost more CPU than the dependency itself on
every poll."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from batchd.service.core import Services

P = ParamSpec("P")
T = TypeVar("T")


async def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def read(services: Services, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a short store read for a route. On SQLite (a local file, WAL: a reader never waits
    for the writer) a poll's read takes tens of microseconds, less than handing it to a thread
    and back costs, so it runs right here on the event loop (a running batch's recount, at most
    once per ``batch_counts_max_age_seconds``, takes longer: ~10 ms for 50,000 rows). Over a
    network (PostgreSQL) a read waits on a round trip, so it runs in the thread pool and the
    loop serves others meanwhile."""
    if services.store.engine.dialect.name == "sqlite":
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)
