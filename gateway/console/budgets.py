"""Budgets: every budget (end users' defaults too, and with ?expand=1 the end users' own budgets
made from them) with its progress and reset time; set, change, delete, soft, alert thresholds."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from gateway.console.render import change, done, filters, form_errors, page, read, slice_page
from gateway.core.metering import now_us
from gateway.core.windows import PERIODS
from gateway.errors import GatewayError
from gateway.ops import budgeting
from gateway.web.state import SETTINGS

FIELDS = ("scope", "subject", "period", "limit", "alert_at", "timezone", "week_starts", "month_starts_on")


async def budgets_page(
    request: web.Request, status: int = 200, errors: dict[str, str] | None = None, values: Any = None
) -> web.Response:
    """GET /ui/budgets[?scope=&subject=&expand=1]."""
    wanted = filters(request, ("scope", "subject", "expand"))
    expand = wanted.get("expand") == "1"
    listing = functools.partial(budgeting.list_budgets, expand=expand)
    try:
        budgets = await read(request, listing, wanted.get("scope"), wanted.get("subject"))
    except GatewayError as exc:
        budgets = []
        errors = {**{f"filter_{k}": v for k, v in form_errors(exc, "subject").items()}, **(errors or {})}
    shown, pager = slice_page(budgets, request)
    return page(
        request,
        "budgets.html",
        "budgets",
        status=status,
        budgets=shown,
        paging=pager,
        wanted=wanted,
        scopes=budgeting.SCOPES,
        periods=PERIODS,
        errors=errors or {},
        values=values or {"scope": wanted.get("scope", ""), "subject": wanted.get("subject", "")},
    )


async def set_budget(request: web.Request) -> web.StreamResponse:
    """POST /ui/budgets: set or change one (`soft` ticked: never refuses; `alert_at` e.g. 50,90,100)."""
    form = await request.post()
    values = {name: str(form.get(name, "")).strip() for name in FIELDS}
    values["soft"] = "1" if form.get("soft") else ""
    try:
        await change(
            request,
            budgeting.set_budget,
            values["scope"],
            values["subject"],
            values["period"],
            values["limit"],
            now_us(),
            enforce=not values["soft"],
            alert_at=values["alert_at"] or None,
            timezone=values["timezone"] or None,
            week_starts=values["week_starts"] or None,
            month_starts_on=values["month_starts_on"] or None,
            rule_defaults=request.config_dict[SETTINGS].window_rule,
        )
    except GatewayError as exc:
        return await budgets_page(request, exc.status, form_errors(exc, "subject"), values)
    raise done("/ui/budgets", "budget")


async def delete_budget(request: web.Request) -> web.StreamResponse:
    """POST /ui/budgets/delete (scope, subject, period)."""
    form = await request.post()
    scope, subject, period = (str(form.get(name, "")) for name in ("scope", "subject", "period"))
    try:
        await change(request, budgeting.delete_budget, scope, subject, period, now_us())
    except GatewayError as exc:
        return await budgets_page(request, exc.status, {"delete": exc.message})
    raise done("/ui/budgets", "budget-deleted")
