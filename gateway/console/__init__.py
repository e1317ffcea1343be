"""The web console at /ui/: server-rendered pages over the same service functions as the admin API.

`mount(app)` adds it to the gateway as a sub-application with its own middlewares (security
headers, sessions and CSRF: see `security`), so nothing of it runs on the chat path. It is mounted
only while GATEWAY_ADMIN_TOKEN is set and GATEWAY_UI is not `off`. Pages read through `store.read`
and change through `store.run` with the same `services`, `access`, `budgeting`, `adjustments`
units of work as the admin API and the CLI, audited as `console <client address>`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.console import render, routes
from gateway.console.overview_cache import OverviewCache
from gateway.console.security import Throttle, headers_middleware, session_middleware
from gateway.console.state import OVERVIEW, THROTTLE
from gateway.ops.settings import Settings

HERE = Path(__file__).parent


def enabled(settings: Settings) -> bool:
    """Whether the gateway serves the console."""
    return settings.admin_token is not None and settings.ui != "off"


async def _overview_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[OVERVIEW].close()


def console_app() -> web.Application:
    """The console as an aiohttp application, to be mounted at /ui/."""
    app = web.Application(middlewares=[headers_middleware, session_middleware])
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters=render.FILTERS,
        default_helpers=False,
    )
    env.globals.update(render.GLOBALS)
    app[THROTTLE] = Throttle()
    app[OVERVIEW] = OverviewCache()
    app.cleanup_ctx.append(_overview_ctx)
    routes.add_routes(app.router)
    app.router.add_static("/static/", HERE / "static", name="static")
    return app


def mount(app: web.Application) -> None:
    """Serve the console at /ui/ (and /ui redirecting there)."""
    app.add_subapp("/ui", console_app())
