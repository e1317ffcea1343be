"""Sign-in with the admin token, and sign-out: a server-side session in a cookie."""

from __future__ import annotations

import asyncio
import secrets

from aiohttp import web

from gateway.console import sessions
from gateway.console.render import page
from gateway.console.security import (
    COOKIE,
    PRE_COOKIE,
    PREFIX,
    admin_token,
    check_signin_csrf,
    forget_cookie,
    same,
    set_cookie,
)
from gateway.console.state import THROTTLE, session_of
from gateway.core.metering import now_us
from gateway.web.state import STORE

PRE_COOKIE_SECONDS = 3600


def _form(request: web.Request, status: int = 200, **context: object) -> web.Response:
    """The sign-in form, with a fresh double-submit token in its cookie and its hidden field."""
    token = secrets.token_urlsafe(24)
    context.setdefault("signed_out", False)
    response = page(request, "signin.html", "signin", status=status, signin_csrf=token, **context)
    set_cookie(request, response, PRE_COOKIE, token, PRE_COOKIE_SECONDS)
    return response


async def signin_form(request: web.Request) -> web.Response:
    """GET /ui/signin."""
    return _form(request, signed_out=request.query.get("done") == "signed-out")


async def signin(request: web.Request) -> web.StreamResponse:
    """POST /ui/signin: the admin token opens a session; a wrong one is slowed down."""
    form = await request.post()
    if not check_signin_csrf(request, form.get("csrf")):
        return web.Response(
            status=403,
            text="403: the sign-in form's token is missing or wrong. Reload the page and try again.",
        )
    address = request.remote or "unknown"
    throttle = request.app[THROTTLE]
    wait = throttle.wait(address)
    if wait > 0:
        message = f"Too many wrong tokens from your address: wait {wait:.0f} s and try again."
        return _form(request, status=429, errors={"token": message})
    expected = admin_token(request)
    if not same(form.get("token"), expected):
        throttle.failed(address)
        await asyncio.sleep(throttle.base)
        return _form(request, status=401, errors={"token": "That is not the gateway's admin token."})
    throttle.succeeded(address)
    session_id = sessions.new_id()
    await request.config_dict[STORE].run(sessions.open_session, session_id, expected, address, now_us())
    response = web.HTTPSeeOther(PREFIX)
    set_cookie(request, response, COOKIE, session_id, sessions.LIFETIME_US // 1_000_000)
    forget_cookie(response, PRE_COOKIE)
    raise response


async def signout(request: web.Request) -> web.StreamResponse:
    """POST /ui/signout: the session ends on every process."""
    session_of(request)
    session_id = request.cookies.get(COOKIE, "")
    await request.config_dict[STORE].run(sessions.close_session, session_id)
    response = web.HTTPSeeOther(f"{PREFIX}signin?done=signed-out")
    forget_cookie(response, COOKIE)
    raise response
