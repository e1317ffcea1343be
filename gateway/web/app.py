"""Application wiring: `create_app(settings)` with every resource in `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import console
from gateway.core import expiry
from gateway.errors import LedgerUnavailable
from gateway.ops import webhooks, workers
from gateway.ops.gauges import BudgetGauges
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.store import Store, open_store
from gateway.web import access_log, admin, limits, models, openapi, readiness, shutdown, usage
from gateway.web.access_log import AccessLog
from gateway.web.auth import KeyCache, last_used_forever, lookup_caller, write_last_used
from gateway.web.chat import chat
from gateway.web.limits import Gate
from gateway.web.middlewares import error_middleware
from gateway.web.readiness import Readiness
from gateway.web.state import (
    ACCESS_LOG,
    BACKGROUND,
    DEADLINES,
    GATE,
    GAUGES,
    INSTANCE_ID,
    KEYS,
    METRICS,
    READINESS,
    SETTINGS,
    SETTLING,
    STORE,
    UPSTREAM,
    UPSTREAM_CAPS,
)
from gateway.web.upstream import Deadlines, new_session, open_connections

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while the database accepts writes; 503 with the reason otherwise (see `readiness`)."""
    app = request.app
    document, status = readiness.body(await app[READINESS].check(app[STORE], app[INSTANCE_ID]))
    return web.json_response(document, status=status)


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's metrics."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def server_args(settings: Settings) -> dict[str, float]:
    """aiohttp server settings that keep slow or idle clients from piling up.

    aiohttp has no timeout of its own for reading request headers, but its keep-alive timer (in
    3.14, which tests/test_hostile.py checks) runs from the moment a connection opens and closes
    any connection still waiting for a complete request when it fires: it bounds both idle
    connections and dribbled headers. After an error answer, the rest of an unread body is drained
    for at most `lingering_time`, then the connection is closed.
    """
    timeout = settings.client_read_timeout_seconds
    return {"keepalive_timeout": timeout, "lingering_time": min(timeout, 10.0)}


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    metrics: Metrics | None = None,
    worker: workers.Worker | None = None,
) -> web.Application:
    """The gateway application; `store` and `metrics` may be injected (tests share them).

    As one `worker` of several (`gateway serve --workers`), it answers /metrics for the whole
    server, names its process in a header, and leaves hold expiry and the budget gauges of the
    server to worker 0.
    """
    access = AccessLog(settings.access_log)
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args=server_args(settings),
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()
    app[INSTANCE_ID] = secrets.token_hex(8)
    app[BACKGROUND] = set()
    app[SETTLING] = set()
    app[GAUGES] = BudgetGauges(app[METRICS])
    shutdown.setup(app)
    app[GATE] = Gate(limits.fit_open_files(settings.max_concurrent_requests))
    app[UPSTREAM_CAPS] = limits.UpstreamCaps(settings.upstream_max_concurrent, settings.upstream_rpm)
    app[ACCESS_LOG] = access
    app[READINESS] = Readiness()
    sweeper = worker is None or worker.sweeper
    scrape = metrics_view
    if worker is not None:
        files = workers.MetricsFiles(worker, app[METRICS])
        # First in, so last out: its final write comes after every request has been counted.
        app.cleanup_ctx.append(files.ctx)
        scrape = files.view
        workers.tag_responses(app)
    if access.on:
        app.cleanup_ctx.append(access.ctx)
    app.cleanup_ctx.append(_store_ctx(store))
    app.cleanup_ctx.append(_last_used_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_expiry_ctx(sweeper))
    if sweeper:
        app.cleanup_ctx.append(_gauges_ctx)
    app.cleanup_ctx.append(_webhooks_ctx)
    app.router.add_post("/api/v1/chat", chat)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    for module in (usage, models, openapi):
        module.add_routes(app.router)
    # Admin calls are logged by their handlers' wrapper; LoggedRoutes has the `add_*` of a router.
    admin_router = access_log.LoggedRoutes(app.router, access) if access.on else app.router
    admin.add_routes(cast(web.UrlDispatcher, admin_router))
    if console.enabled(settings):
        # A sub-application with its own middlewares: nothing of it runs on any other path.
        console.mount(app)
    return app


def _store_ctx(injected: Store | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        store = injected or open_store(settings.database_url, pool_size=settings.db_pool_size)
        app[STORE] = store
        app[KEYS] = KeyCache(lambda digest: store.read(lookup_caller, digest), settings.cache_ttl_seconds)
        yield
        # `shutdown.drain` gave settlements still retrying the shutdown grace; the TTL covers the rest.
        background: set[asyncio.Task[Any]] = app[BACKGROUND]
        for task in list(background):
            task.cancel()
        if background:
            await asyncio.wait(set(background))
        if injected is None:
            await store.close()

    return ctx


async def _last_used_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keys' `last_used_at`, written from the key cache in the background, and once more at the end."""
    keys, store = app[KEYS], app[STORE]
    task = asyncio.get_running_loop().create_task(last_used_forever(keys, store.run))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(LedgerUnavailable):
        await write_last_used(keys, store.run)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    async with new_session(app[GATE].limit) as session:
        app[UPSTREAM] = session
        app[DEADLINES] = Deadlines()
        app[METRICS].upstream_connections.source = lambda: open_connections(session)
        yield
        app[METRICS].upstream_connections.source = None


def _expiry_ctx(sweeper: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """Heartbeats, and (for the `sweeper`) release of dead processes' holds (see `expiry`)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store, metrics, instance, settling = app[STORE], app[METRICS], app[INSTANCE_ID], app[SETTLING]
        ttl = app[SETTINGS].hold_ttl_seconds
        try:
            await expiry.beat_and_sweep(store, metrics, instance, ttl, sweeper=sweeper)
        except LedgerUnavailable:
            log.warning("database unavailable at start-up; hold expiry will retry")
        task = asyncio.get_running_loop().create_task(
            expiry.run_forever(store, metrics, instance, ttl, settling, sweeper=sweeper)
        )
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if shutdown.unsettled(app):
            # Retired, its holds could be swept at once: these would be recorded expired.
            return
        with contextlib.suppress(LedgerUnavailable):
            await store.run(expiry.retire, instance)

    return ctx


async def _gauges_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(app[GAUGES].run_forever(app[STORE]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Alert events: the default thresholds stored, then delivery in the background (every process,
    each claiming its share under a lease; see gateway/ops/webhooks.py)."""
    deliverer = webhooks.Deliverer(app[SETTINGS], app[STORE], app[METRICS], app[INSTANCE_ID])
    task = asyncio.get_running_loop().create_task(deliverer.run_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
