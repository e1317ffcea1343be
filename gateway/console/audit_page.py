"""The audit log: every administrative change (console, API, CLI), filtered by action and time."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.console.render import cursor_link, filters, form_errors, page, read
from gateway.errors import GatewayError
from gateway.ops import audit

PAGE_SIZE = 50
ACTIONS = (
    "team.create",
    "team.set",
    "user.create",
    "user.set",
    "key.create",
    "key.set",
    "key.block",
    "key.unblock",
    "key.rotate",
    "key.revoke",
    "budget.set",
    "budget.delete",
    "ledger.adjust",
)


async def audit_page(request: web.Request) -> web.Response:
    """GET /ui/audit?action=&from=&to=&cursor=: oldest first, as `gateway audit list`."""
    wanted = filters(request, ("action", "from", "to", "cursor"))
    errors: dict[str, str] = {}
    listing: dict[str, Any] = {"entries": [], "next_cursor": None}
    try:
        query = audit.parse_query(
            action=wanted.get("action"),
            start=wanted.get("from"),
            end=wanted.get("to"),
            limit=PAGE_SIZE,
            cursor=wanted.get("cursor"),
        )
        listing = await read(request, audit.list_entries, query)
    except GatewayError as exc:
        errors = form_errors(exc, "action")
    return page(
        request,
        "audit.html",
        "audit",
        status=400 if errors else 200,
        entries=listing["entries"],
        next_page=cursor_link(request, listing["next_cursor"]),
        actions=ACTIONS,
        wanted=wanted,
        errors=errors,
    )
