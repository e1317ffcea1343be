"""What every admin handler shares: the token check, strict parameters and JSON bodies, units of work."""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from gateway.errors import AdminDisabled, InvalidRequest, Unauthorized
from gateway.ops import audit
from gateway.web.auth import bearer_token
from gateway.web.body import read_body
from gateway.web.state import GAUGES, KEYS, SETTINGS, STORE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorize(request: web.Request) -> None:
    """Raise AdminDisabled or Unauthorized unless the request carries the admin token."""
    token = request.app[SETTINGS].admin_token
    if token is None:
        raise AdminDisabled(
            "The admin HTTP API is disabled: set GATEWAY_ADMIN_TOKEN to enable it, or administer "
            "with the `gateway` command on the database."
        )
    given = bearer_token(request.headers.get("Authorization"))
    if given is None or not hmac.compare_digest(given.encode(), str(token).encode()):
        raise Unauthorized("The admin API needs 'Authorization: Bearer <GATEWAY_ADMIN_TOKEN>'.")


def admin_only(handler: Handler) -> Handler:
    """The handler, run only once `authorize` lets the request through."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        authorize(request)
        return await handler(request)

    return checked


def query_params(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters; InvalidRequest naming one this endpoint does not take."""
    for name in request.query:
        if name not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no query parameters"
            raise InvalidRequest(
                f"Unknown query parameter `{name[:100]}`; this endpoint {takes}.", field=name[:100]
            )
    return {name: request.query[name] for name in allowed if name in request.query}


async def json_body(
    request: web.Request, allowed: tuple[str, ...], *, optional: bool = False
) -> dict[str, Any]:
    """The body's JSON object; InvalidRequest for anything else or a field not in `allowed`."""
    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    if optional and not body.strip():
        return {}
    try:
        # A Decimal, not a float, so that a limit of 123456789012.345678 stays exactly that.
        payload = json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        raise InvalidRequest(f"The request body must be a JSON object with {', '.join(allowed)}.")
    for name in payload:
        if name not in allowed:
            raise InvalidRequest(
                f"Unknown field `{name[:100]}`; this endpoint takes {', '.join(allowed)}.", field=name[:100]
            )
    return payload


async def run(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a unit of work unaudited (a GET's as a read: it changes nothing)."""
    store = request.app[STORE]
    # GETs change nothing: on SQLite they read beside the writes instead of queueing with them.
    return await (store.read(fn, *args) if request.method == "GET" else store.run(fn, *args))


async def change(request: web.Request, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a change, audited as made by `admin-api <client address>`; this process's key cache forgets."""
    actor = audit.api_actor(request.remote)
    result = await request.app[STORE].run(functools.partial(fn, actor=actor, **kwargs), *args)
    request.app[KEYS].clear()
    return result


def priced_models(request: web.Request) -> list[str]:
    """The models the pricing table prices: an allow-list may name only these."""
    return request.app[SETTINGS].pricing.models()


def budgets_changed(request: web.Request) -> None:
    """This process sees an admin change at once (other replicas within their cache TTL)."""
    request.app[KEYS].clear()
    request.app[GAUGES].mark_dirty()
