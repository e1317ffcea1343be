"""The overview page: spend today and this month, refusals, credits per day by team, budgets near
their limits, and the top users, end users and models of the month."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.console import charts
from gateway.console.overview_cache import CREDITS, REQUESTS, TOP, day_start, days_shown, merge
from gateway.console.render import page
from gateway.console.state import OVERVIEW
from gateway.core.metering import now_us
from gateway.core.pricing import credits_json
from gateway.ops import budgeting
from gateway.web.state import METRICS, STORE

TOP_ROWS = 10
ALERT_ROWS = 10
NOT_REFUSALS = ("charged",)


def _budgets(conn: Connection, at: int) -> list[dict[str, Any]]:
    """Unit of work: every budget (end users' included) with its current window."""
    return budgeting.list_budgets(conn, at=at, expand=True)


def near_limits(budgets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The budgets whose spending has reached their lowest alert threshold, fullest first."""
    near = []
    for budget in budgets:
        limit = float(budget["limit"])
        used = float(budget["spent"]) + float(budget["held"])
        threshold = min(budget["alert_at"] or [100])
        share = used / limit * 100 if limit > 0 else (100.0 if used > 0 else 0.0)
        if share >= threshold:
            near.append({**budget, "share": share})
    near.sort(key=lambda b: (-b["share"], b["scope"], b["subject"]))
    return near


def refusals(request: web.Request) -> list[tuple[str, int]]:
    """Chat requests refused or failed, by outcome, as this process's metrics counted them."""
    counts: dict[str, int] = {}
    for metric in request.config_dict[METRICS].requests.collect():
        for sample in metric.samples:
            outcome = sample.labels.get("outcome", "")
            if sample.name.endswith("_total") and outcome not in NOT_REFUSALS:
                counts[outcome] = counts.get(outcome, 0) + int(sample.value)
    return sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1])


def _top(sums: dict[Any, list[int]]) -> list[dict[str, Any]]:
    rows = sorted(sums.items(), key=lambda kv: (-kv[1][CREDITS], str(kv[0])))[:TOP_ROWS]
    return [{"name": name, "credits": credits_json(s[CREDITS]), "requests": s[REQUESTS]} for name, s in rows]


async def overview(request: web.Request) -> web.Response:
    """GET /ui/."""
    store = request.config_dict[STORE]
    at = now_us()
    today = day_start(at)
    cache = request.app[OVERVIEW]
    past, now_figures = await cache.past(store, today), await cache.today(store, today)
    budgets = await store.read(_budgets, at)
    month = merge(past, now_figures)
    days = days_shown(today)
    per_team: dict[tuple[str, str], Any] = {}
    team_totals: dict[str, int] = {}
    for (team, day), sums in month.by_team_day.items():
        name = team if team is not None else "(no team)"
        per_team[(name, day)] = credits_json(sums[CREDITS])
        if day in days:
            team_totals[name] = team_totals.get(name, 0) + sums[CREDITS]
    names = sorted(team_totals, key=lambda n: -team_totals[n])
    chart = charts.stacked_days(days, per_team, names)
    near = near_limits(budgets)
    return page(
        request,
        "overview.html",
        "overview",
        today={
            "credits": credits_json(now_figures.totals[CREDITS]),
            "requests": now_figures.totals[REQUESTS],
        },
        month={"credits": credits_json(month.totals[CREDITS]), "requests": month.totals[REQUESTS]},
        refusals=refusals(request),
        chart=chart,
        near=near[:ALERT_ROWS],
        near_count=len(near),
        budgets_count=len(budgets),
        top={name: _top(month.top.get(name, {})) for name in TOP},
    )
