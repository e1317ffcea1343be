"""What keeps the console safe: headers on every answer, sessions, CSRF checks, slowed sign-in.

- Every answer of /ui/ carries a Content-Security-Policy that allows no inline script or style and
  no framing (`frame-ancestors 'none'`, and `X-Frame-Options: DENY` for older browsers),
  `Cache-Control: no-store`, `Referrer-Policy: same-origin` and `X-Content-Type-Options: nosniff`.
- Pages other than sign-in and the static files need a session cookie (HttpOnly, SameSite=Strict,
  Secure when the request came over HTTPS, path /ui/); without one a page redirects to sign-in.
- Every POST must carry its session's CSRF token in the form field `csrf` (the sign-in form its
  pre-session cookie's), else 403 and nothing is done.
- Wrong admin tokens are slowed down per client address (`Throttle`), in bounded memory.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.console import sessions
from gateway.core.metering import now_us
from gateway.errors import GatewayError
from gateway.web.state import SETTINGS, STORE

log = logging.getLogger(__name__)

PREFIX = "/ui/"
COOKIE = "gw_console"
PRE_COOKIE = "gw_console_signin"
PUBLIC = ("/ui/signin", "/ui/static/")
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def is_https(request: web.Request) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through a proxy that says so).

    Trusting X-Forwarded-Proto here only ever adds the Secure flag: a client that lies about it
    only keeps its own cookie from being sent over plain HTTP.
    """
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    """A console cookie: HttpOnly, SameSite=Strict, path /ui/, Secure behind HTTPS."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def forget_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path=PREFIX)


def admin_token(request: web.Request) -> str:
    """The configured admin token (the console is only mounted while there is one)."""
    token = request.config_dict[SETTINGS].admin_token
    if token is None:
        raise web.HTTPNotFound()
    return str(token)


def same(given: object, expected: str) -> bool:
    """Constant-time equality of a submitted token with the expected one."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The security headers on every answer of the console, errors and redirects included.

    Errors are answered here as plain text (the gateway's JSON error middleware would drop the
    headers); redirects go on with the headers added.
    """
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(HEADERS)
            raise
        response = web.Response(status=exc.status, text=exc.text or exc.reason)
    except GatewayError as exc:
        response = web.Response(status=exc.status, text=f"{exc.status}: {exc.message}")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = web.Response(
            status=500, text="500: the console failed unexpectedly; see the gateway's log."
        )
    response.headers.update(HEADERS)
    return response


def _forbidden() -> web.Response:
    return web.Response(
        status=403,
        text="403: this form's CSRF token is missing or wrong, so nothing was changed. "
        "Reload the page and try again.",
    )


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No session: to sign-in. A POST without its session's CSRF token: 403, before any handler."""
    if request.path == PREFIX.rstrip("/"):
        raise web.HTTPMovedPermanently(PREFIX)
    if request.path.startswith(PUBLIC):
        return await handler(request)
    from gateway.console.state import SESSION  # (state imports this module)

    session_id = request.cookies.get(COOKIE)
    session = None
    if session_id:
        store = request.config_dict[STORE]
        session = await store.read(sessions.find_session, session_id, admin_token(request), now_us())
    if session is None:
        # A POST too: nothing is done without a session, the form is simply not taken.
        raise web.HTTPSeeOther(f"{PREFIX}signin")
    if request.method == "POST":
        form = await request.post()
        if not same(form.get("csrf"), session.csrf):
            return _forbidden()
    request[SESSION] = session
    return await handler(request)


def check_signin_csrf(request: web.Request, form_token: object) -> bool:
    """The sign-in form's token equals its pre-session cookie's (double submit)."""
    cookie = request.cookies.get(PRE_COOKIE)
    return bool(cookie) and same(form_token, str(cookie))


class Throttle:
    """Per-address slowing of wrong admin tokens, in bounded memory.

    Each wrong answer is delayed by `base` seconds; after the n-th wrong token in a row from one
    address, that address may not try again for `base × 2^(n-1)` seconds more (at most `cap`),
    and an attempt meanwhile is refused unchecked. A right token clears the address. At most `max_addresses`
    are remembered (the oldest forgotten first), so a flood of addresses costs bounded memory.
    """

    def __init__(self, base: float = 0.5, cap: float = 60.0, max_addresses: int = 10_000) -> None:
        self.base, self.cap, self.max_addresses = base, cap, max_addresses
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait(self, address: str, now: float | None = None) -> float:
        """Seconds this address must still wait before its next attempt (0: it may try now)."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        moment = time.monotonic() if now is None else now
        return max(entry[1] - moment, 0.0)

    def failed(self, address: str, now: float | None = None) -> float:
        """Record a wrong token; the lockout it earned, in seconds."""
        moment = time.monotonic() if now is None else now
        count = self._failures.pop(address, (0, 0.0))[0] + 1
        lockout = float(min(self.base * 2.0 ** min(count - 1, 30), self.cap))
        self._failures[address] = (count, moment + self.base + lockout)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return lockout

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def __len__(self) -> int:
        return len(self._failures)
