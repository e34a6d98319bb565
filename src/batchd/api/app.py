"""Assembling the FastAPI app: routers, error translation, request ids, and the lifespan that
runs what the process needs while it serves (``runtime.running``, handed in by the runtime:
the API layer sits below it)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from batchd.api import (
    anthropic_batches,
    anthropic_realtime,
    console,
    errors,
    openai_batches,
    openai_files,
    openai_realtime,
    webhooks,
)
from batchd.api.auth import AuthMiddleware
from batchd.api.http_metrics import HttpMetricsMiddleware, metrics_endpoint
from batchd.api.keyring import KeyRing
from batchd.api.poll_fast_path import PollingFastPath
from batchd.api.request_id import RequestIdMiddleware
from batchd.api.responses import JSONResponse
from batchd.service.services import Services

# What the lifespan enters: starts the engine, the scheduler and the rest on entry, stops them
# on exit (``runtime.running`` for this process's role).
WhileServing = Callable[[], AbstractAsyncContextManager[object]]


def create_app(services: Services, running: WhileServing | None = None) -> FastAPI:
    """The app for ``services``; its lifespan enters ``running`` while it serves. Without it
    the lifespan starts nothing: an app built for its OpenAPI document, never served."""
    settings = services.settings
    # Built here, before serving, so a bad keys file stops start-up with its line named.
    keyring = KeyRing(settings.api_keys, settings.keys_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if running is not None:
            # The tenants' weights go to the database, where every worker's leasing reads them.
            await asyncio.to_thread(services.store.set_tenant_weights, keyring.weights())
        if settings.keys_file is not None:

            def reload_keys() -> None:
                # SIGHUP re-reads the keys file: rotate keys and weights without dropping
                # in-flight work.
                if keyring.reload() and running is not None:
                    loop.run_in_executor(None, services.store.set_tenant_weights, keyring.weights())

            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, reload_keys)
        async with running() if running is not None else contextlib.nullcontext():
            app.state.ready = True
            try:
                yield
            finally:
                app.state.ready = False

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
    app.include_router(console.router)
    app.include_router(webhooks.router)
    return app


def asgi_app(services: Services, running: WhileServing) -> PollingFastPath:
    """What the server serves: the app behind the polling fast path (api/poll_fast_path.py),
    running what ``running`` starts while it serves."""
    return PollingFastPath(create_app(services, running))
