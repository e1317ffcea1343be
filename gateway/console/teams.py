"""Teams and users: lists with this month's spend, creation, allow-lists, each one's budgets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.console.overview_cache import CREDITS, month_start
from gateway.console.render import change, done, form_errors, page, priced_models, read, slice_page
from gateway.console.state import OVERVIEW
from gateway.core.metering import now_us
from gateway.core.pricing import credits_json
from gateway.errors import GatewayError, NotFound
from gateway.ops import access, budgeting, services
from gateway.web.state import STORE


def _lists(conn: Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return services.list_teams(conn), services.list_users(conn)


async def _spend(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """This month's credits by team name and by user name."""
    at = now_us()
    month = await request.app[OVERVIEW].month(request.config_dict[STORE], at)
    from_day = _iso_day(month_start(at - at % 86_400_000_000))
    teams: dict[Any, int] = {}
    for (team, day), sums in month.by_team_day.items():
        if day >= from_day:
            teams[team] = teams.get(team, 0) + sums[CREDITS]
    users = {name: sums[CREDITS] for name, sums in month.top.get("user", {}).items()}
    return (
        {k: credits_json(v) for k, v in teams.items()},
        {k: credits_json(v) for k, v in users.items()},
    )


def _iso_day(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).date().isoformat()


async def teams_page(
    request: web.Request, status: int = 200, errors: dict[str, str] | None = None, values: Any = None
) -> web.Response:
    """GET /ui/teams: every team, and the users (of one team with ?team=), paginated."""
    teams, users = await read(request, _lists)
    team_filter = request.query.get("team", "").strip()
    if team_filter:
        users = [u for u in users if u["team"] == team_filter]
    members: dict[str | None, int] = {}
    for user in users:
        members[user["team"]] = members.get(user["team"], 0) + 1
    team_spend, user_spend = await _spend(request)
    shown, pager = slice_page(users, request)
    return page(
        request,
        "teams.html",
        "teams",
        status=status,
        teams=teams,
        members=members,
        users=shown,
        paging=pager,
        team_filter=team_filter,
        team_spend=team_spend,
        user_spend=user_spend,
        errors=errors or {},
        values=values or {},
    )


async def create_team(request: web.Request) -> web.StreamResponse:
    """POST /ui/teams: a new team (the API's errors beside the name field)."""
    form = await request.post()
    name = str(form.get("name", "")).strip()
    try:
        await change(request, services.create_team, name, now_us())
    except GatewayError as exc:
        return await teams_page(request, exc.status, form_errors(exc, "name"), {"name": name, "form": "team"})
    raise done("/ui/team", "team", name=name)


async def create_user(request: web.Request) -> web.StreamResponse:
    """POST /ui/users (user_name, team): a new user, in a team or none."""
    form = await request.post()
    name = str(form.get("user_name", "")).strip()
    team = str(form.get("team", "")).strip() or None
    try:
        await change(request, services.create_user, name, team, now_us())
    except GatewayError as exc:
        errors = form_errors(exc, "user_name")
        if "name" in errors:
            errors["user_name"] = errors.pop("name")
        values = {"user_name": name, "team": team or "", "form": "user"}
        return await teams_page(request, exc.status, errors, values)
    raise done("/ui/user", "user", name=name)


def _team_detail(conn: Connection, name: str) -> dict[str, Any]:
    found = services.list_teams(conn, name)
    if not found:
        raise NotFound(f"No team named {name!r}.")
    users = [u for u in services.list_users(conn) if u["team"] == name]
    return {"team": found[0], "users": users, "budgets": budgeting.list_budgets(conn, "team", name)}


def _user_detail(conn: Connection, name: str) -> dict[str, Any]:
    found = services.list_users(conn, name)
    if not found:
        raise NotFound(f"No user named {name!r}.")
    end_user_budgets = [
        b for b in budgeting.list_budgets(conn, "end_user") if b["subject"].startswith(name + "/")
    ]
    return {
        "user": found[0],
        "keys": services.list_keys(conn, name),
        "budgets": budgeting.list_budgets(conn, "user", name) + end_user_budgets,
    }


async def _detail(
    request: web.Request,
    kind: str,
    status: int = 200,
    errors: dict[str, str] | None = None,
    name: str | None = None,
) -> web.Response:
    name = request.query.get("name", "") if name is None else name
    try:
        detail = await read(request, _team_detail if kind == "team" else _user_detail, name)
    except NotFound as exc:
        raise web.HTTPNotFound(text=exc.message) from None
    team_spend, user_spend = await _spend(request)
    spend = (team_spend if kind == "team" else user_spend).get(name, 0)
    return page(
        request,
        f"{kind}.html",
        "teams",
        status=status,
        kind=kind,
        name=name,
        spend=spend,
        user_spend=user_spend,
        priced=priced_models(request),
        errors=errors or {},
        **detail,
    )


async def team_page(request: web.Request) -> web.Response:
    """GET /ui/team?name=."""
    return await _detail(request, "team")


async def user_page(request: web.Request) -> web.Response:
    """GET /ui/user?name=."""
    return await _detail(request, "user")


async def set_models(request: web.Request) -> web.StreamResponse:
    """POST /ui/models (kind, name, models or all): a team's or user's allow-list."""
    form = await request.post()
    kind, name = str(form.get("kind", "")), str(form.get("name", ""))
    if kind not in ("team", "user"):
        raise web.HTTPNotFound()
    try:
        chosen = None if form.get("all") else [str(m) for m in form.getall("models", [])]
        models = access.parse_models(chosen, priced_models(request))
        await change(request, access.set_models, kind, name, models, now_us())
    except GatewayError as exc:
        return await _detail(request, kind, exc.status, form_errors(exc, "models"), name)
    raise done(f"/ui/{kind}", "models", name=name)
