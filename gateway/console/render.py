"""What every console page shares: rendering with the session's CSRF token, form errors, paging, formats."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from gateway.console.state import SESSION, session_of
from gateway.errors import GatewayError
from gateway.ops import audit
from gateway.web.state import GAUGES, KEYS, SETTINGS, STORE

PAGE_SIZE = 50
NAV = (
    ("overview", "/ui/", "Overview"),
    ("teams", "/ui/teams", "Teams & users"),
    ("keys", "/ui/keys", "Keys"),
    ("budgets", "/ui/budgets", "Budgets"),
    ("ledger", "/ui/ledger", "Ledger"),
    ("reports", "/ui/reports", "Reports"),
    ("alerts", "/ui/alerts", "Alerts"),
    ("audit", "/ui/audit", "Audit"),
)
# Messages after a change (Post/Redirect/Get): `?done=CODE`, so a link cannot put words on a page.
DONE = {
    "team": "Team created.",
    "user": "User created.",
    "models": "Allow-list saved.",
    "block": "Key blocked: it is refused on every replica within a few seconds.",
    "unblock": "Key unblocked: it works again.",
    "revoke": "Key revoked.",
    "key": "Key changed.",
    "budget": "Budget saved.",
    "budget-deleted": "Budget deleted.",
    "adjusted": "Adjustment recorded.",
    "signed-out": "Signed out.",
}


def page(
    request: web.Request, template: str, section: str, status: int = 200, **context: Any
) -> web.Response:
    """A page of the console, with the navigation and the session's CSRF token for its forms."""
    session = request.get(SESSION)
    done = DONE.get(request.query.get("done", ""))
    context.update(
        nav=NAV,
        section=section,
        csrf=session.csrf if session is not None else None,
        done=context.get("done", done),
        errors=context.get("errors", {}),
        values=context.get("values", {}),
    )
    return aiohttp_jinja2.render_template(template, request, context, status=status)


def form_errors(exc: GatewayError, default_field: str) -> dict[str, str]:
    """The API's error message, keyed by the field it names (so the form shows it beside that field)."""
    return {str(exc.details.get("field") or default_field): exc.message}


def done(location: str, code: str, **query: str) -> web.HTTPSeeOther:
    """The redirect after a change, naming what was done."""
    params = {"done": code, **query}
    return web.HTTPSeeOther(f"{location}?{urlencode(params)}")


async def read(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """A read unit of work (beside the writes on SQLite)."""
    return await request.config_dict[STORE].read(fn, *args)


async def change(request: web.Request, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a change, audited as made by `console <client address>`; this process's caches forget."""
    actor = audit.console_actor(request.remote)
    result = await request.config_dict[STORE].run(functools.partial(fn, actor=actor, **kwargs), *args)
    request.config_dict[KEYS].clear()
    request.config_dict[GAUGES].mark_dirty()
    return result


def priced_models(request: web.Request) -> list[str]:
    """The models the pricing table prices (what allow-lists may name)."""
    return request.config_dict[SETTINGS].pricing.models()


def slice_page(
    rows: Sequence[Any], request: web.Request, size: int = PAGE_SIZE
) -> tuple[list[Any], dict[str, Any]]:
    """One page of an in-memory list (`?page=N`), and what the pager shows."""
    try:
        number = max(int(request.query.get("page", "1")), 1)
    except ValueError:
        number = 1
    pages = max((len(rows) + size - 1) // size, 1)
    number = min(number, pages)
    params = {k: v for k, v in request.query.items() if k not in ("page", "done")}

    def link(n: int) -> str:
        return request.path + "?" + urlencode({**params, "page": str(n)})

    pager = {
        "number": number,
        "pages": pages,
        "total": len(rows),
        "prev": link(number - 1) if number > 1 else None,
        "next": link(number + 1) if number < pages else None,
    }
    return list(rows[(number - 1) * size : number * size]), pager


def cursor_link(request: web.Request, cursor: str | None) -> str | None:
    """The page after `cursor` of a cursor-paginated list, with the same filters ("": the first)."""
    if cursor is None:
        return None
    params = {k: v for k, v in request.query.items() if k not in ("cursor", "done") and v}
    if cursor:
        params["cursor"] = cursor
    return request.path + "?" + urlencode(params)


def filters(request: web.Request, names: Sequence[str]) -> dict[str, str]:
    """The non-empty query parameters among `names` (a form's empty fields mean no filter)."""
    return {name: request.query[name].strip() for name in names if request.query.get(name, "").strip()}


def credits(value: Any) -> str:
    """Credits for people: up to 6 decimals, thousands separated."""
    if value is None:
        return ""
    number = Decimal(str(value))
    text = f"{number:,.6f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def when(value: str | None) -> str:
    """An ISO 8601 time as `2026-12-07 15:04 UTC`, or in its own offset (a budget's zone's) as
    `2026-12-08 00:00 UTC-08:00`."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    offset = moment.isoformat()[-6:] if moment.utcoffset() else ""
    return moment.strftime("%Y-%m-%d %H:%M UTC") + offset


def percent(part: Any, whole: Any) -> float:
    """`part` as a percentage of `whole`, 0-100 (for bars)."""
    whole_f = float(whole or 0)
    if whole_f <= 0:
        return 100.0 if float(part or 0) > 0 else 0.0
    return max(min(float(part or 0) / whole_f * 100, 100.0), 0.0)


FILTERS = {"credits": credits, "when": when}
GLOBALS = {"percent": percent}

__all__ = [
    "change",
    "cursor_link",
    "done",
    "filters",
    "form_errors",
    "page",
    "priced_models",
    "read",
    "session_of",
    "slice_page",
]
