"""Self-service usage, `GET /api/v1/usage`: what the caller's own gateway key may still spend.

The answer is about the calling key only, found from its `Authorization: Bearer` header; it can
name no one else. It may name one of the key's user's end users (the `X-Gateway-End-User` header,
as on a chat request, or the `end_user` query parameter). It holds:

- `key`: the key's id, its user and the user's team;
- `budgets`: every budget that applies to the key (the key's, its user's, its team's, and with an
  end user named, that end user's, or the defaults they would get theirs from), in the admin API's
  shape (`scope, subject, period, limit, spent, held, remaining, window_start, resets_at`). A team
  budget's `spent` is the whole team's: that is what limits this key;
- `limits`: every rate and concurrency limit that applies to the key (its own, its user's, its
  team's, and its user's end-user defaults), in the admin API's shape, with what each has left now
  (`remaining` and `reset` for a rate; `in_flight` for `concurrent`);
- `usage`: for the current UTC `daily`, `weekly` and `monthly` windows, the charged `requests`,
  `messages` and `credits` of this key (`key`) and of its user across all their keys (`user`),
  counted as the billing report counts them (charged ledger rows, by admission time; `credits`
  with the adjustments of the window's rows, whatever their outcome).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import Connection, text

from gateway.core.metering import Caller, now_us
from gateway.core.pricing import credits_json
from gateway.core.windows import UTC_RULE, Rule, bounds, iso_key
from gateway.jsonout import json_response
from gateway.ops.budgeting import end_user_budgets, list_budgets
from gateway.ops.limiting import caller_limits
from gateway.web import attribution
from gateway.web.admin_request import query_params
from gateway.web.state import KEYS, SETTINGS, STORE

PERIODS = ("daily", "weekly", "monthly")


def add_routes(router: web.UrlDispatcher) -> None:
    """Register GET /api/v1/usage."""
    router.add_get("/api/v1/usage", my_usage)


async def my_usage(request: web.Request) -> web.Response:
    """GET /api/v1/usage: the calling key's budgets and usage this window."""
    caller = await request.app[KEYS].caller(request.headers.get("Authorization"))
    params = query_params(request, ("end_user",))
    end_user = None
    if "end_user" in params:
        end_user = attribution.checked_end_user(params["end_user"], "The `end_user` query parameter")
    end_user = attribution.end_user(request.headers.get(attribution.END_USER_HEADER), end_user)
    rule = request.app[SETTINGS].window_rule
    return json_response(await request.app[STORE].read(key_usage, caller, now_us(), end_user, rule))


_USAGE = text(
    "SELECT COUNT(*), COALESCE(SUM(message_count), 0), COALESCE(SUM(credits_micros), 0), "
    "COALESCE(SUM(CASE WHEN key_id = :key THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN key_id = :key THEN message_count ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN key_id = :key THEN credits_micros ELSE 0 END), 0) "
    "FROM ledger WHERE user_id = :user AND outcome = 'charged' "
    "AND admitted_at >= :start AND admitted_at < :end"
)


# The adjustments of the user's rows admitted in the window: all of them, and the key's.
_ADJUSTED = text(
    "SELECT COALESCE(SUM(a.credits_micros), 0), "
    "COALESCE(SUM(CASE WHEN l.key_id = :key THEN a.credits_micros ELSE 0 END), 0) "
    "FROM ledger_adjustments a JOIN ledger l ON l.request_id = a.request_id "
    "WHERE l.user_id = :user AND l.admitted_at >= :start AND l.admitted_at < :end"
)


def _sums(requests: int, messages: int, credits: int) -> dict[str, Any]:
    return {"requests": int(requests), "messages": int(messages), "credits": credits_json(int(credits))}


def key_usage(
    conn: Connection, caller: Caller, at: int, end_user: str | None = None, rule: Rule = UTC_RULE
) -> dict[str, Any]:
    """Unit of work: the budgets that apply to the caller's key (and to `end_user`, one of its
    user's end users), each in its own windows, and its usage in the windows of `rule` (the
    gateway's: GATEWAY_TIMEZONE, GATEWAY_WEEK_STARTS)."""
    budgets = list_budgets(conn, "key", caller.key_id, at) + list_budgets(conn, "user", caller.user_name, at)
    if caller.team_name is not None:
        budgets += list_budgets(conn, "team", caller.team_name, at)
    if end_user is not None:
        budgets += end_user_budgets(conn, caller.user_id, end_user, at)
    usage = []
    for period in PERIODS:
        start, end = bounds(period, at, rule)
        assert end is not None
        params = {
            "key": caller.key_id,
            "user": caller.user_id,
            "start": start * 1_000_000,
            "end": end * 1_000_000,
        }
        row = conn.execute(_USAGE, params).one()
        user_adjusted, key_adjusted = conn.execute(_ADJUSTED, params).one()
        usage.append(
            {
                "period": period,
                "window_start": iso_key(start, rule.zone),
                "resets_at": iso_key(end, rule.zone),
                "key": _sums(row[3], row[4], int(row[5]) + int(key_adjusted)),
                "user": _sums(row[0], row[1], int(row[2]) + int(user_adjusted)),
            }
        )
    return {
        "key": {"id": caller.key_id, "user": caller.user_name, "team": caller.team_name},
        "budgets": budgets,
        "limits": caller_limits(conn, caller, at),
        "usage": usage,
    }
