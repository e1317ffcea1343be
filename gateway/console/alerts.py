"""Alerts: budget events with their delivery state and attempts, and a test event to every webhook."""

from __future__ import annotations

import functools

from aiohttp import web

from gateway.console.render import cursor_link, filters, form_errors, page, read
from gateway.errors import GatewayError
from gateway.ops import events, webhooks
from gateway.web.state import SETTINGS

PAGE_SIZE = 50


async def alerts_page(request: web.Request, results: list[dict[str, object]] | None = None) -> web.Response:
    """GET /ui/alerts?from=&to=&cursor=: events, oldest first, with each endpoint's delivery."""
    wanted = filters(request, ("from", "to", "cursor"))
    settings = request.config_dict[SETTINGS]
    errors: dict[str, str] = {}
    listing: dict[str, object] = {"events": [], "next_cursor": None}
    try:
        query = events.parse_query(
            start=wanted.get("from"), end=wanted.get("to"), limit=PAGE_SIZE, cursor=wanted.get("cursor")
        )
        names = webhooks.endpoint_names(settings.webhooks)
        listing = await read(request, functools.partial(events.list_events, names=names), query)
    except GatewayError as exc:
        errors = form_errors(exc, "from")
    return page(
        request,
        "alerts.html",
        "alerts",
        status=400 if errors else 200,
        events=listing["events"],
        next_page=cursor_link(request, listing["next_cursor"]),  # type: ignore[arg-type]
        hooks=[webhooks.shown(hook.url) for hook in settings.webhooks],
        results=results,
        wanted=wanted,
        errors=errors,
    )


async def test_webhooks(request: web.Request) -> web.Response:
    """POST /ui/alerts/test: a `webhook.test` event to every webhook, and each one's answer."""
    settings = request.config_dict[SETTINGS]
    async with webhooks.new_session() as session:
        results = await webhooks.send_test(session, settings.webhooks, settings.webhook_timeout_seconds)
    return await alerts_page(request, results)
