"""Typed keys of the console's sub-application and of its requests."""

from __future__ import annotations

from aiohttp import web

from gateway.console.overview_cache import OverviewCache
from gateway.console.security import Throttle
from gateway.console.sessions import Session

THROTTLE = web.AppKey("console_throttle", Throttle)
OVERVIEW = web.AppKey("console_overview", OverviewCache)
# The signed-in session of a request (set by `security.session_middleware`).
SESSION = web.RequestKey("console_session", Session)


def session_of(request: web.Request) -> Session:
    """The request's session; every page but sign-in runs behind the session middleware."""
    session = request.get(SESSION)
    if not isinstance(session, Session):
        raise web.HTTPSeeOther("/ui/signin")
    return session
