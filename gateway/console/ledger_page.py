"""The ledger: filtered, cursor-paginated rows; a row's details with its adjustments, and the adjust form."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.console.render import change, cursor_link, done, filters, form_errors, page, read
from gateway.core.metering import now_us
from gateway.errors import GatewayError, NotFound
from gateway.ops import adjustments, ledger

FILTERS = ("team", "user", "key", "model", "end_user", "tag", "outcome", "from", "to")
PAGE_SIZE = 50


async def ledger_page(request: web.Request) -> web.Response:
    """GET /ui/ledger?team=&user=&key=&model=&end_user=&tag=&outcome=&from=&to=&cursor=."""
    wanted = filters(request, (*FILTERS, "cursor"))
    errors: dict[str, str] = {}
    result: dict[str, Any] = {"entries": [], "next_cursor": None}
    try:
        query = ledger.parse_query(
            user=wanted.get("user"),
            team=wanted.get("team"),
            key=wanted.get("key"),
            model=wanted.get("model"),
            outcome=wanted.get("outcome"),
            end_user=wanted.get("end_user"),
            tag=wanted.get("tag"),
            start=wanted.get("from"),
            end=wanted.get("to"),
            limit=PAGE_SIZE,
            cursor=wanted.get("cursor"),
        )
        result = await read(request, ledger.list_entries, query)
    except GatewayError as exc:
        errors = form_errors(exc, "team")
    return page(
        request,
        "ledger.html",
        "ledger",
        status=400 if errors else 200,
        entries=result["entries"],
        next_page=cursor_link(request, result["next_cursor"]),
        first_page=cursor_link(request, "") if "cursor" in wanted else None,
        wanted=wanted,
        outcomes=ledger.OUTCOMES,
        errors=errors,
    )


def _entry(conn: Connection, request_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return ledger.entry(conn, request_id), adjustments.list_for(conn, request_id)


async def entry_page(
    request: web.Request, status: int = 200, errors: dict[str, str] | None = None, values: Any = None
) -> web.Response:
    """GET /ui/ledger/{request_id}: the row, its adjustments and the adjust form."""
    request_id = request.match_info["request_id"]
    try:
        row, adjusted = await read(request, _entry, request_id)
    except NotFound as exc:
        raise web.HTTPNotFound(text=exc.message) from None
    return page(
        request,
        "ledger_entry.html",
        "ledger",
        status=status,
        row=row,
        adjusted=adjusted,
        errors=errors or {},
        values=values or {},
    )


async def adjust(request: web.Request) -> web.StreamResponse:
    """POST /ui/ledger/{request_id}/adjust (credits, reason): a correction, never an edit."""
    request_id = request.match_info["request_id"]
    form = await request.post()
    values = {name: str(form.get(name, "")).strip() for name in ("credits", "reason")}
    try:
        await change(request, adjustments.adjust, request_id, values["credits"], values["reason"], now_us())
    except GatewayError as exc:
        return await entry_page(request, exc.status, form_errors(exc, "credits"), values)
    raise done(f"/ui/ledger/{request_id}", "adjusted")
