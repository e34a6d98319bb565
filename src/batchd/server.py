"""``batchd serve``: one process with the HTTP API, the scheduler and the engine."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
from typing import IO

import uvicorn

from batchd.api.app import create_app
from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.engines.factory import build_engine
from batchd.errors import BatchdError
from batchd.scheduler.runner import Scheduler
from batchd.service import Services
from batchd.store import database
from batchd.store.store import Store

log = logging.getLogger("batchd")


class DataDirLocked(BatchdError):
    pass


class InsecureBind(BatchdError):
    pass


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


def build_services(settings: Settings) -> Services:
    engine_db = database.open_sqlite(settings.database_path)
    database.upgrade(engine_db)
    store = Store(engine_db)
    blobs = BlobStore(settings.files_dir)
    engine = build_engine(settings)
    scheduler = Scheduler(store, blobs, engine, settings)
    return Services(settings=settings, store=store, blobs=blobs, engine=engine, scheduler=scheduler)


def serve(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    exposed = not is_loopback(settings.host)
    if exposed and not settings.auth_enabled and not settings.insecure_no_auth:
        raise InsecureBind(
            f"refusing to serve {settings.host} with no API keys: anyone who can reach it "
            "could read every batch. Set BATCHD_API_KEYS or --keys-file, bind 127.0.0.1, "
            "or pass --insecure-no-auth if this network is trusted."
        )
    lock = lock_data_dir(settings)
    if not settings.auth_enabled:
        log.warning(
            "NO API KEYS CONFIGURED: every request is accepted and shares one tenant. "
            "Set BATCHD_API_KEYS (comma-separated) or --keys-file before exposing this server."
        )
    services = build_services(settings)
    app = create_app(services)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    finally:
        lock.close()
