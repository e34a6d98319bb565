"""Assembling the FastAPI app: routers, error translation, request ids, and the lifespan that
starts the engine and the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from fastapi import FastAPI

from batchd.api import (
    anthropic_batches,
    anthropic_realtime,
    errors,
    openai_batches,
    openai_files,
    openai_realtime,
)
from batchd.api.auth import AuthMiddleware
from batchd.api.http_metrics import HttpMetricsMiddleware, metrics_endpoint
from batchd.api.keyring import KeyRing
from batchd.api.poll_fast_path import PollingFastPath
from batchd.api.request_id import RequestIdMiddleware
from batchd.api.responses import JSONResponse
from batchd.engines.base import LocalComputeEngine
from batchd.loop_pacing import LoopPacer
from batchd.service import retention
from batchd.service.core import Services, install_metrics

log = logging.getLogger(__name__)


def _pacer(services: Services) -> LoopPacer | None:
    """The loop's wake-up moderation (loop_pacing.py), where this process runs an engine on
    its own CPUs: never in an API-only process, nor for engines upstream."""
    engine = services.engine
    interval = services.settings.loop_pacing_ms / 1000
    if services.scheduler is None or interval <= 0 or not isinstance(engine, LocalComputeEngine):
        return None
    return LoopPacer(engine.decoding_batch_only, interval)


def create_app(services: Services) -> FastAPI:
    settings = services.settings
    # Built here, before serving, so a bad keys file stops start-up with its line named.
    keyring = KeyRing(settings.api_keys, settings.keys_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.keys_file is not None:
            # SIGHUP re-reads the keys file: rotate keys without dropping in-flight work.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keyring.reload)
        install_metrics(services)
        await services.engine.start()
        scheduler = services.scheduler  # None in an API-only process: workers run batches
        background: list[asyncio.Task[None]] = []
        if scheduler is not None:
            await scheduler.recover()
            background.append(asyncio.create_task(scheduler.run()))
            background.append(
                asyncio.create_task(retention.run_forever(services.store, services.blobs, settings))
            )
        pacer = _pacer(services)
        if pacer is not None:
            pacer.start()
            services.pacer = pacer
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            if pacer is not None:
                pacer.stop()
            if scheduler is not None:
                await scheduler.stop(settings.shutdown_grace_seconds)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await services.engine.close()

    app = FastAPI(
        title="batchd",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.keyring = keyring
    app.state.ready = False
    errors.install(app)
    # Innermost first. The polling routes are answered ahead of all this: see asgi_app.
    app.add_middleware(AuthMiddleware, keyring=keyring)
    app.add_middleware(RequestIdMiddleware)  # a refused request gets an id too
    app.add_middleware(HttpMetricsMiddleware)  # outermost: refusals are timed as well
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    @app.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
    def healthz() -> JSONResponse:
        ready = bool(app.state.ready)
        return JSONResponse({"status": "ok" if ready else "starting"}, 200 if ready else 503)

    app.include_router(openai_files.router)
    app.include_router(openai_batches.router)
    app.include_router(openai_realtime.router)
    app.include_router(anthropic_batches.router)
    app.include_router(anthropic_realtime.router)
    return app


def asgi_app(services: Services) -> PollingFastPath:
    """What the server serves: the app behind the polling fast path (api/poll_fast_path.py)."""
    return PollingFastPath(create_app(services))
