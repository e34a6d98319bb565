"""Typed dependency aliases shared by the routers, and the one way a route runs a use case.

The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in the
thread pool, a hop (and a fight for the GIL) that cost more CPU than the dependency itself on
every poll."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from batchd.service.services import Services

T = TypeVar("T")


async def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(get_services)]


async def run_blocking(services: Services, call: Callable[[], T], *, poll_read: bool = False) -> T:
    """Run ``call``, a use case that blocks on the database or the blob store, for a route:
    in the thread pool (Starlette's, the one FastAPI runs ``def`` routes in), so that the
    loop serves other requests meanwhile. Every route of both surfaces crosses here; what
    must happen on the loop (waking the scheduler) the route does once this has returned.

    The thread runs ``call`` to its end even if the client goes away meanwhile (a thread
    cannot be interrupted): a create either commits or fails whole, never half-way because
    its caller was cancelled.

    One exception, ``poll_read``: a poll's short read (retrieve or list a batch). On SQLite
    (a local file, WAL: a reader never waits for the writer) it takes tens of microseconds,
    less than handing it to a thread and back costs, so it runs right here on the event loop
    (a running batch's recount, at most once per ``batch_counts_max_age_seconds``, takes
    longer: ~10 ms for 50,000 rows). Over a network (PostgreSQL) a read waits on a round trip,
    so it goes to the thread pool like everything else."""
    if poll_read and services.store.engine.dialect.name == "sqlite":
        return call()
    return await run_in_threadpool(call)
