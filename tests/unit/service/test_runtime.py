"""The process runtime: ``running`` starts and stops what each role needs (the same code for
the app's lifespan and the worker), and ``run_blocking`` is where a route's blocking work
leaves the event loop. On the fake engine and a temporary SQLite store."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import cast

import pytest

from batchd import runtime
from batchd.api.deps import run_blocking
from batchd.engines.fake import FakeEngine
from batchd.scheduler.runner import Scheduler
from batchd.service.services import Services
from tests.unit.service.conftest import MakeServices


class LifecycleEngine(FakeEngine):
    """The fake engine, noting its start and close; ``local``: as the embedded engine, it
    computes on this machine (so the loop may be paced beside it)."""

    def __init__(self, *, local: bool = False) -> None:
        super().__init__()
        self.computes_locally = local
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")


@pytest.fixture(autouse=True)
def _no_process_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    # The gauges register once per process, in the global registry: not from a unit test.
    monkeypatch.setattr(runtime, "install_metrics", lambda services: None)


def role_services(
    make_services: MakeServices, role: runtime.Role, *, local: bool = False
) -> Services:
    services = make_services(shutdown_grace_seconds=0.0, poll_interval_seconds=0.05)
    services.engine = LifecycleEngine(local=local)
    if role != "api":
        services.scheduler = Scheduler(
            services.store, services.blobs, services.engine, services.settings
        )
    return services


def events(services: Services) -> list[str]:
    return cast(LifecycleEngine, services.engine).events


async def _run_until_exit(services: Services, role: runtime.Role) -> runtime.Running:
    async with runtime.running(services, role) as parts:
        assert events(services) == ["start"]
        await asyncio.sleep(0.1)  # the scheduler ticks meanwhile
        if parts.scheduling is not None:
            assert not parts.scheduling.done()  # it runs until the context exits
    return parts


def test_all_in_one_runs_the_scheduler_until_it_exits(make_services: MakeServices) -> None:
    services = role_services(make_services, "all", local=True)
    parts = asyncio.run(_run_until_exit(services, "all"))
    assert parts.services is services
    assert parts.scheduling is not None and parts.scheduling.done()
    assert events(services) == ["start", "close"]
    # The embedded engine computes beside the API: the loop was paced, and is no longer.
    assert services.pacer is not None and services.pacer._handle is None


def test_an_api_process_starts_the_engine_only(make_services: MakeServices) -> None:
    services = role_services(make_services, "api", local=True)
    parts = asyncio.run(_run_until_exit(services, "api"))
    assert parts.scheduling is None and services.pacer is None
    assert events(services) == ["start", "close"]


def test_a_worker_is_never_paced_and_drains(make_services: MakeServices) -> None:
    services = role_services(make_services, "worker", local=True)

    async def drain() -> None:
        async with runtime.running(services, "worker", drain=True) as parts:
            assert parts.scheduling is not None
            await asyncio.wait_for(parts.scheduling, timeout=10)  # no work: it ends by itself

    asyncio.run(drain())
    assert services.pacer is None
    assert events(services) == ["start", "close"]
    # `batchd worker --drain` itself: the same, then it returns (the process exits 0).
    worker = role_services(make_services, "worker", local=True)
    asyncio.run(asyncio.wait_for(runtime._run_worker(worker, drain=True), timeout=10))
    assert worker.pacer is None and events(worker) == ["start", "close"]


def test_the_engine_closes_when_the_start_fails_after_it(make_services: MakeServices) -> None:
    services = role_services(make_services, "all")
    assert services.scheduler is not None

    async def broken_recover() -> None:
        raise RuntimeError("recovery failed")

    services.scheduler.recover = broken_recover  # type: ignore[method-assign]

    async def start() -> None:
        async with runtime.running(services, "all"):
            raise AssertionError("not reached")

    with pytest.raises(RuntimeError, match="recovery failed"):
        asyncio.run(start())
    assert events(services) == ["start", "close"]


def _stub(dialect: str) -> Services:
    return cast(
        Services,
        SimpleNamespace(
            store=SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name=dialect)))
        ),
    )


@pytest.mark.parametrize(
    ("dialect", "poll_read", "on_the_loop"),
    [
        ("sqlite", True, True),  # a poll's read of a local file: cheaper than the hop
        ("sqlite", False, False),
        ("postgresql", True, False),  # a round trip: in a thread, the loop serves others
        ("postgresql", False, False),
    ],
)
def test_run_blocking_leaves_the_loop_but_for_sqlite_poll_reads(
    dialect: str, poll_read: bool, on_the_loop: bool
) -> None:
    async def where() -> bool:
        loop_thread = threading.get_ident()
        ran_in = await run_blocking(_stub(dialect), threading.get_ident, poll_read=poll_read)
        return ran_in == loop_thread

    assert asyncio.run(where()) is on_the_loop
