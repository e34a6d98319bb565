"""The processes: ``batchd serve`` (HTTP API, scheduler and engine in one), and for a shared
PostgreSQL database ``batchd api`` (HTTP only, any number) and ``batchd worker`` (scheduler and
engine, no HTTP, one per engine)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Literal

import prometheus_client
import uvicorn

from batchd.api.app import asgi_app
from batchd.api.http_limits import bounded_http_protocol
from batchd.blobs.base import BlobStore
from batchd.blobs.local import DirectoryBlobStore
from batchd.config import Settings
from batchd.engines.factory import build_engine
from batchd.engines.openai_http.shared_limits import SharedLimits
from batchd.errors import DataDirLocked, InsecureBind, NeedsSharedDatabase
from batchd.loop_pacing import LoopPacer
from batchd.scheduler.runner import Scheduler
from batchd.service import retention
from batchd.service.services import Services, install_metrics, price_table
from batchd.service.webhook_sender import WebhookSender
from batchd.store import database
from batchd.store.store import Store

log = logging.getLogger("batchd")


Role = Literal["all", "api", "worker"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or a wildcard like '0.0.0.0' / '::' may be reachable


def lock_data_dir(settings: Settings) -> IO[str]:
    """One serving process per data dir: it requeues every running row at start, which is
    only safe if no other process is running them."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    handle = (settings.data_dir / "batchd.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DataDirLocked(
            f"another batchd process is already serving {settings.data_dir}"
        ) from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def open_blobs(settings: Settings) -> BlobStore:
    """The file-byte store the settings name: a directory, or an S3-compatible bucket."""
    if settings.files_url is None:
        return DirectoryBlobStore(settings.files_dir)
    from batchd.blobs.s3 import S3BlobStore

    s3 = S3BlobStore(settings.files_url, endpoint_url=settings.s3_endpoint_url)
    s3.check_reachable()
    return s3


def build_services(settings: Settings, role: Role = "all") -> Services:
    prices = price_table(settings)  # a wrong prices file stops start-up before anything loads
    engine_db = database.open_database(
        settings.database_url,
        settings.database_path,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
    )
    database.upgrade(engine_db)
    store = Store(engine_db)
    blobs = open_blobs(settings)
    engine = build_engine(settings)  # an API process keeps one too: realtime requests
    scheduler = Scheduler(store, blobs, engine, settings) if role != "api" else None
    return Services(
        settings=settings,
        store=store,
        blobs=blobs,
        engine=engine,
        scheduler=scheduler,
        prices=prices,
    )


def _shared_database(settings: Settings) -> bool:
    url = settings.database_url
    return bool(url and not url.startswith("sqlite"))


def _pacer(services: Services, role: Role) -> LoopPacer | None:
    """The loop's wake-up moderation (loop_pacing.py): only where one process serves the
    polls and runs an engine on its own CPUs (``batchd serve``). An API-only process runs no
    batch work, a worker serves no polls, and an upstream engine computes elsewhere."""
    engine = services.engine
    interval = services.settings.loop_pacing_ms / 1000
    if role != "all" or interval <= 0 or not engine.computes_locally:
        return None
    return LoopPacer(engine.decoding_batch_only, interval)


@dataclass(frozen=True)
class Running:
    """What ``running`` started."""

    services: Services
    # The scheduler's loop (None in an API-only process). It ends by itself only when
    # draining (``batchd worker --drain``); otherwise it runs until ``running`` exits.
    scheduling: asyncio.Task[None] | None


async def _share_upstream_limits(services: Services, stack: contextlib.AsyncExitStack) -> None:
    """On a shared database, upstream limits hold for the whole deployment: every process
    takes its slots and rates from the database too (engines/openai_http/shared_limits.py).
    Alone on SQLite, this process's own limits are the deployment's."""
    share = getattr(services.engine, "share_limits", None)
    if share is None or services.store.engine.dialect.name == "sqlite":
        return
    holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    shared = SharedLimits(services.store, holder)
    share(shared)
    await shared.start()
    stack.push_async_callback(shared.close)


@contextlib.asynccontextmanager
async def running(services: Services, role: Role, *, drain: bool = False) -> AsyncIterator[Running]:
    """Start what a process of ``role`` runs beside (or instead of) its HTTP API, and stop it
    on exit: the gauges, the engine, the scheduler (recovered first) with the retention loop,
    and the loop pacer. On exit, the scheduler leases nothing more, gives the requests in
    hand ``shutdown_grace_seconds`` to finish and hands the rest back to the queue; then the
    engine closes. ``drain``: the scheduler returns once no work is left (a worker's
    ``--drain``). The app's lifespan and the worker both enter this."""
    settings = services.settings
    scheduler = services.scheduler  # None in an API-only process: workers run batches
    install_metrics(services)
    if role == "worker" and settings.metrics_port is not None:
        # The worker has no HTTP API: prometheus_client's own server (a daemon thread).
        prometheus_client.start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics on http://%s:%s/metrics", settings.metrics_host, settings.metrics_port)
    async with contextlib.AsyncExitStack() as stack:  # stops in the reverse order of starts
        await _share_upstream_limits(services, stack)
        await services.engine.start()
        stack.push_async_callback(services.engine.close)
        scheduling: asyncio.Task[None] | None = None
        if scheduler is not None:
            await scheduler.recover()
            scheduling = asyncio.create_task(scheduler.run(drain=drain))
            background = [
                scheduling,
                asyncio.create_task(
                    retention.run_forever(services.store, services.blobs, settings)
                ),
            ]
            stack.push_async_callback(_stop_scheduling, scheduler, background, settings)
        # Webhooks: every process runs a sender; a lease in the database lets one send.
        sending = asyncio.create_task(WebhookSender(services.store, settings).run_forever())
        stack.push_async_callback(_cancel, sending)
        pacer = _pacer(services, role)
        if pacer is not None:
            pacer.start()
            services.pacer = pacer
            stack.callback(pacer.stop)
        yield Running(services, scheduling)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _stop_scheduling(
    scheduler: Scheduler, background: list[asyncio.Task[None]], settings: Settings
) -> None:
    await scheduler.stop(settings.shutdown_grace_seconds)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)


async def _run_worker(services: Services, *, drain: bool = False) -> None:
    """A worker: the scheduler and the engine until SIGTERM or SIGINT (or, with ``drain``,
    until no work is left), then a clean stop (``running``'s)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scheduler = services.scheduler
    assert scheduler is not None
    try:
        async with running(services, "worker", drain=drain) as parts:
            assert parts.scheduling is not None
            log.info(
                "worker %s running%s",
                scheduler.owner,
                " (draining: exits when no work is left)" if drain else "",
                extra={"action": "worker_started"},
            )
            signalled = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait(
                    {signalled, parts.scheduling}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                signalled.cancel()
                await asyncio.gather(signalled, return_exceptions=True)
    finally:
        log.info("worker %s stopped", scheduler.owner, extra={"action": "worker_stopped"})


def serve(settings: Settings, role: Role = "all", *, drain: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    shared = _shared_database(settings)
    if role != "all" and not shared:
        raise NeedsSharedDatabase(
            f"`batchd {role}` shares its work with other processes through PostgreSQL: set"
            " --database-url postgresql+psycopg://... (`batchd serve` runs everything in one"
            " process on SQLite)"
        )
    if role == "worker":
        asyncio.run(_run_worker(build_services(settings, role), drain=drain))
        return
    exposed = not is_loopback(settings.host)
    if exposed and not settings.auth_enabled and not settings.insecure_no_auth:
        raise InsecureBind(
            f"refusing to serve {settings.host} with no API keys: anyone who can reach it "
            "could read every batch. Set BATCHD_API_KEYS or --keys-file, bind 127.0.0.1, "
            "or pass --insecure-no-auth if this network is trusted."
        )
    # On SQLite one process owns the data dir; on PostgreSQL the database coordinates.
    lock = lock_data_dir(settings) if not shared else None
    if not settings.auth_enabled:
        log.warning(
            "NO API KEYS CONFIGURED: every request is accepted and shares one tenant. "
            "Set BATCHD_API_KEYS (comma-separated) or --keys-file before exposing this server."
        )
    services = build_services(settings, role)
    app = asgi_app(services, lambda: running(services, role))
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            http=bounded_http_protocol(settings.max_header_bytes, settings.max_headers),
        )
    finally:
        if lock is not None:
            lock.close()
