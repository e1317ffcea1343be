"""Budget windows in a time zone and billing cycle (contract §14; issue 27 item 1)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from gateway.core import admission, holding
from gateway.core.metering import Admission, Caller, Charge
from gateway.core.windows import (
    MAX_MONTH_DAY,
    UTC_RULE,
    WEEKDAYS,
    Rule,
    WindowBook,
    bounds,
    check_zone,
    shown,
    window_keys,
)
from gateway.errors import BudgetExceeded
from gateway.ops import budgeting, services
from gateway.ops.events import sentence
from gateway.ops.settings import ConfigError, Settings
from gateway.store import migrate

from .admin_helpers import error, ok
from .conftest import Backend, World, counters_equal_ledger_sql

LA = Rule("America/Los_Angeles")
BERLIN = Rule("Europe/Berlin")
SECOND = 1_000_000


def _us(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp()) * SECOND


def _utc(seconds: int | None) -> str:
    assert seconds is not None
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def test_los_angeles_resets_at_08_utc_in_winter_and_07_in_summer() -> None:
    winter = bounds("daily", _us("2026-12-07T20:00:00+00:00"), LA)
    summer = bounds("daily", _us("2026-07-07T20:00:00+00:00"), LA)
    assert (_utc(winter[0]), _utc(winter[1])) == ("2026-12-07T08:00:00+00:00", "2026-12-08T08:00:00+00:00")
    assert (_utc(summer[0]), _utc(summer[1])) == ("2026-07-07T07:00:00+00:00", "2026-07-08T07:00:00+00:00")
    # Before 08:00 UTC it is still the 6th in California.
    assert _utc(bounds("daily", _us("2026-12-07T07:59:59+00:00"), LA)[0]) == "2026-12-06T08:00:00+00:00"
    assert shown("daily", winter[0], LA) == ("2026-12-07T00:00:00-08:00", "2026-12-08T00:00:00-08:00")
    assert shown("daily", summer[0], LA) == ("2026-07-07T00:00:00-07:00", "2026-07-08T00:00:00-07:00")


def test_berlin_dst_days_last_23_and_25_hours() -> None:
    spring = bounds("daily", _us("2026-03-29T12:00:00+00:00"), BERLIN)
    autumn = bounds("daily", _us("2026-10-25T12:00:00+00:00"), BERLIN)
    assert spring[1] is not None and autumn[1] is not None
    assert (spring[1] - spring[0], autumn[1] - autumn[0]) == (23 * 3600, 25 * 3600)
    assert shown("daily", spring[0], BERLIN) == ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00")
    assert shown("daily", autumn[0], BERLIN) == ("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00")
    # The week and the month across a change are an hour short or long, never reset twice.
    march = bounds("monthly", _us("2026-03-29T12:00:00+00:00"), BERLIN)
    assert march[1] is not None and march[1] - march[0] == 31 * 86_400 - 3600


def test_a_weekly_budget_from_sunday() -> None:
    sunday = Rule("UTC", "sunday")
    # Monday 7 December 2026: the week began on Sunday the 6th and ends on Sunday the 13th.
    start, end = bounds("weekly", _us("2026-12-07T10:00:00+00:00"), sunday)
    assert (_utc(start), _utc(end)) == ("2026-12-06T00:00:00+00:00", "2026-12-13T00:00:00+00:00")
    # A Sunday is the first day of its week, a Saturday the last.
    assert _utc(bounds("weekly", _us("2026-12-13T00:00:00+00:00"), sunday)[0]) == "2026-12-13T00:00:00+00:00"
    assert _utc(bounds("weekly", _us("2026-12-12T23:59:59+00:00"), sunday)[0]) == "2026-12-06T00:00:00+00:00"
    # The default, monday, as before.
    assert _utc(bounds("weekly", _us("2026-12-07T10:00:00+00:00"))[0]) == "2026-12-07T00:00:00+00:00"
    tokyo = Rule("Asia/Tokyo", "sunday")
    assert shown("weekly", bounds("weekly", _us("2026-12-07T10:00:00+00:00"), tokyo)[0], tokyo)[0] == (
        "2026-12-06T00:00:00+09:00"
    )


def test_a_billing_cycle_on_the_15th_across_february() -> None:
    cycle = Rule("UTC", "monday", 15)
    cases = {
        "2027-01-20T00:00:00+00:00": ("2027-01-15", "2027-02-15"),
        "2027-02-14T23:59:59+00:00": ("2027-01-15", "2027-02-15"),
        "2027-02-15T00:00:00+00:00": ("2027-02-15", "2027-03-15"),
        "2027-03-01T00:00:00+00:00": ("2027-02-15", "2027-03-15"),
        "2026-12-31T12:00:00+00:00": ("2026-12-15", "2027-01-15"),
        "2026-01-02T12:00:00+00:00": ("2025-12-15", "2026-01-15"),
    }
    for at, (start, end) in cases.items():
        window = bounds("monthly", _us(at), cycle)
        assert (_utc(window[0])[:10], _utc(window[1])[:10]) == (start, end), at
    february = bounds("monthly", _us("2027-03-01T00:00:00+00:00"), cycle)
    assert february[1] is not None and february[1] - february[0] == 28 * 86_400
    # In a zone: the 15th's local midnight, across the change to summer time.
    la_cycle = Rule("America/Los_Angeles", "monday", 15)
    march = bounds("monthly", _us("2027-03-20T00:00:00+00:00"), la_cycle)
    assert shown("monthly", march[0], la_cycle) == ("2027-03-15T00:00:00-07:00", "2027-04-15T00:00:00-07:00")
    feb = bounds("monthly", _us("2027-03-01T00:00:00+00:00"), la_cycle)
    assert shown("monthly", feb[0], la_cycle) == ("2027-02-15T00:00:00-08:00", "2027-03-15T00:00:00-07:00")


def test_a_midnight_that_does_not_exist_begins_the_day_at_the_jump() -> None:
    # Santiago moves its clocks from 00:00 to 01:00 on 6 September 2026.
    santiago = Rule("America/Santiago")
    start, end = bounds("daily", _us("2026-09-06T12:00:00+00:00"), santiago)
    assert shown("daily", start, santiago) == ("2026-09-06T01:00:00-03:00", "2026-09-07T00:00:00-03:00")
    assert end is not None and end - start == 23 * 3600
    # The previous day ends where this one begins.
    assert bounds("daily", start * SECOND - 1, santiago)[1] == start


ZONES = sorted(z for z in available_timezones() if "/" in z and not z.startswith(("Etc/", "SystemV/")))
RULES = st.builds(Rule, st.sampled_from(ZONES), st.sampled_from(WEEKDAYS), st.integers(1, MAX_MONTH_DAY))
INSTANTS = st.integers(_us("1975-01-01T00:00:00+00:00"), _us("2100-01-01T00:00:00+00:00"))


@given(INSTANTS, RULES, st.sampled_from(("daily", "weekly", "monthly")))
@settings(max_examples=400, deadline=None)
def test_windows_tile_time(us: int, rule: Rule, period: str) -> None:
    """Any instant lies in exactly one window; the one before ends where it begins, the one after
    begins where it ends; no window is empty; each begins on its local date's midnight or later."""
    start, end = bounds(period, us, rule)
    assert end is not None
    assert start * SECOND <= us < end * SECOND
    assert bounds(period, start * SECOND, rule) == (start, end)
    assert bounds(period, end * SECOND - 1, rule) == (start, end)
    before = bounds(period, start * SECOND - 1, rule)
    after = bounds(period, end * SECOND, rule)
    assert before[1] == start and after[0] == end
    assert before[0] < start < end < (after[1] or 0)
    local = datetime.fromtimestamp(start, ZoneInfo(rule.zone))
    earlier = datetime.fromtimestamp(start - 1, ZoneInfo(rule.zone))
    assert local.date() > earlier.date(), "a window begins where the local date changes"
    if period == "weekly":
        assert local.weekday() == WEEKDAYS.index(rule.week_starts)
    if period == "monthly":
        assert local.day == rule.month_starts_on


@given(INSTANTS, st.sets(RULES, max_size=3), st.integers(0, 40 * 86_400 * SECOND))
@settings(max_examples=200, deadline=None)
def test_a_book_of_windows_is_each_rules_own(us: int, rules: set[Rule], later: int) -> None:
    """`WindowBook.at` is what `bounds` says for every rule it knows, however its cache is hit."""
    book = WindowBook()
    book.learn(rules)
    for moment in (us, us + later, us):
        windows = book.at(moment)
        assert windows.lo <= moment < windows.hi
        assert windows.utc == window_keys(moment) == {p: bounds(p, moment)[0] for p in windows.utc}
        for rule in rules - {UTC_RULE}:
            for period in ("daily", "weekly", "monthly", "total"):
                assert f'"{rule.label()} {period}":{bounds(period, moment, rule)[0]}' in windows.json


def test_bad_zones_and_days_are_refused() -> None:
    for name in ("Mars/Olympus", "", "../etc/passwd", "/usr/share/zoneinfo/UTC", "UTC\x00", 5):
        with pytest.raises(ValueError, match="time zone"):
            check_zone(name)
    with pytest.raises(ConfigError, match="^GATEWAY_TIMEZONE: unknown time zone 'Mars/Olympus'"):
        Settings.load(environ={"GATEWAY_TIMEZONE": "Mars/Olympus"})
    with pytest.raises(ConfigError, match="^GATEWAY_WEEK_STARTS: 'funday' is not a week day"):
        Settings.load(environ={"GATEWAY_WEEK_STARTS": "funday"})
    loaded = Settings.load(environ={"GATEWAY_TIMEZONE": "Asia/Tokyo", "GATEWAY_WEEK_STARTS": "Sunday"})
    assert loaded.window_rule == Rule("Asia/Tokyo", "sunday", 1)
    assert Settings.load(environ={}).window_rule == UTC_RULE


# -- on both databases ---------------------------------------------------------------------------

# 22:00 on 6 December in California: 06:00 UTC on the 7th; two minutes before and after midnight.
LA_MIDNIGHT = _us("2026-12-07T08:00:00+00:00")
PRICE = 100_000  # 0.1 credits


def _forget_rules() -> None:  # (tests only: a fresh process's book)
    """This process knows only UTC/monday/1 again, as a replica that never met another rule."""
    holding.WINDOWS.rules = frozenset({UTC_RULE})
    holding.WINDOWS._recent = ()


async def _callers(store: Any, at: int) -> list[Caller]:
    def make(conn: Any) -> list[Caller]:
        team = services.create_team(conn, "eng", at)
        users = [services.create_user(conn, name, "eng", at) for name in ("alice", "bob")]
        keys = [services.create_key(conn, user["name"], None, at) for user in users]
        return [
            Caller(key["id"], user["id"], user["name"], team["id"], "eng")
            for key, user in zip(keys, users, strict=True)
        ]

    return list(await store.run(make))


async def _set(store: Any, *args: Any, **options: Any) -> Any:
    return await store.run(lambda conn: budgeting.set_budget(conn, *args, **options))


async def _admit_all(store: Any, calls: list[tuple[Charge, int]]) -> list[Any]:
    return list(
        await asyncio.gather(
            *(store.run(admission.admit, c, "i1", at) for c, at in calls), return_exceptions=True
        )
    )


@pytest.mark.parametrize("forget", [True, False], ids=["rule-unknown", "rule-known"])
async def test_admission_across_a_local_midnight_stays_exact(store: Any, forget: bool) -> None:
    """A California daily team budget of 0.5 credits, and requests from two minutes before to two
    minutes after its midnight (08:00 UTC: no UTC boundary) all at once: exactly 5 admitted before
    and 5 after, each window's counter keyed at its own start; a UTC user budget alongside is one
    window for all of them. Whether or not this process has met the rule before (a replica that
    has not learns it from the statement that meets it)."""
    before = LA_MIDNIGHT - 120 * SECOND
    alice, bob = await _callers(store, before)
    await _set(store, "team", "eng", "daily", "0.5", before, timezone="America/Los_Angeles")
    await _set(store, "user", "alice", "daily", "100", before)
    if forget:
        _forget_rules()
    else:
        holding.WINDOWS.learn({LA})
    calls = [
        (Charge(f"r{i:02d}", (alice, bob)[i % 2], "m", 1, PRICE, PRICE, False), before + i * 6 * SECOND)
        for i in range(40)
    ]
    results = await _admit_all(store, calls)
    admitted = Counter(
        at < LA_MIDNIGHT for (_, at), r in zip(calls, results, strict=True) if isinstance(r, Admission)
    )
    assert admitted == {True: 5, False: 5}
    refused = [r for r in results if not isinstance(r, Admission)]
    assert all(isinstance(r, BudgetExceeded) for r in refused), refused
    assert {r.details["resets_at"] for r in refused} == {
        "2026-12-07T00:00:00-08:00",
        "2026-12-08T00:00:00-08:00",
    }
    assert LA in holding.WINDOWS.rules

    def counters(conn: Any) -> list[Any]:
        return list(
            conn.execute(
                text(
                    "SELECT b.scope, c.window_start, c.held_micros FROM budget_counters c "
                    "JOIN budgets b ON b.id = c.budget_id ORDER BY b.scope, c.window_start"
                )
            ).all()
        )

    la_days = [bounds("daily", before, LA)[0], bounds("daily", LA_MIDNIGHT, LA)[0]]
    utc_day = bounds("daily", before)[0]
    alice_admitted = sum(
        1 for (c, _), r in zip(calls, results, strict=True) if isinstance(r, Admission) and c.caller == alice
    )
    assert await store.run(counters) == [
        ("team", la_days[0], 5 * PRICE),
        ("team", la_days[1], 5 * PRICE),
        ("user", utc_day, alice_admitted * PRICE),
    ]
    assert la_days[1] - la_days[0] == 86_400 and _utc(la_days[1]) == "2026-12-07T08:00:00+00:00"
    budgets = await store.run(budgeting.list_budgets, "team", "eng", LA_MIDNIGHT + 60 * SECOND)
    assert (budgets[0]["held"], budgets[0]["window_start"], budgets[0]["resets_at"]) == (
        0.5,
        "2026-12-07T00:00:00-08:00",
        "2026-12-08T00:00:00-08:00",
    )
    assert budgets[0]["timezone"] == "America/Los_Angeles"
    # Held, not yet settled: every counter equals its open holds.
    for row in await store.run(lambda conn: list(conn.execute(text(counters_equal_ledger_sql())).all())):
        assert (row[2], row[3]) == (row[4], row[5]), row


async def test_end_users_adopt_their_defaults_rule(store: Any) -> None:
    """An end user's budget made from a default (`USER/*`) on first use has the default's rule."""
    at = LA_MIDNIGHT + 60 * SECOND
    alice, _ = await _callers(store, at)
    await _set(
        store,
        "end_user",
        "alice/*",
        "monthly",
        "1",
        at,
        timezone="Asia/Tokyo",
        month_starts_on=15,
    )
    _forget_rules()
    charge = Charge("r1", alice, "m", 1, PRICE, PRICE, False, "cust-a")
    result = await store.run(admission.admit, charge, "i1", at)
    tokyo = Rule("Asia/Tokyo", "monday", 15)
    assert [window for _, window in result.allocations] == [bounds("monthly", at, tokyo)[0]]
    listed = await store.run(budgeting.list_budgets, "end_user", "alice/cust-a", at)
    assert (listed[0]["timezone"], listed[0]["month_starts_on"], listed[0]["window_start"]) == (
        "Asia/Tokyo",
        15,
        "2026-11-15T00:00:00+09:00",
    )


async def test_402_and_usage_show_the_zones_offset(admin_world: World) -> None:
    w = admin_world
    await w.reconfigure(timezone="America/Los_Angeles")
    key = await w.key("alice")
    body = {"scope": "user", "subject": "alice", "period": "daily", "limit": "0"}
    budget = await ok(w, "PUT", "/admin/v1/budgets", json=body)
    # A new budget gets GATEWAY_TIMEZONE; setting it again without one keeps its zone.
    assert budget["timezone"] == "America/Los_Angeles"
    zone = ZoneInfo("America/Los_Angeles")
    offset = datetime.now(zone).strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}"
    assert budget["window_start"].endswith(f"T00:00:00{offset}")
    tokyo = await ok(
        w, "PUT", "/admin/v1/budgets", json={**body, "period": "weekly", "timezone": "Asia/Tokyo"}
    )
    assert tokyo["window_start"].endswith("T00:00:00+09:00") and tokyo["week_starts"] == "monday"
    assert datetime.fromisoformat(tokyo["window_start"]).weekday() == 0
    again = await ok(w, "PUT", "/admin/v1/budgets", json={**body, "limit": "0.05"})
    assert again["timezone"] == "America/Los_Angeles"
    resp = await w.chat(key["key"])
    assert resp.status == 402
    refused = (await resp.json())["error"]
    assert refused["period"] == "daily" and refused["resets_at"].endswith(f"T00:00:00{offset}")
    assert refused["resets_at"] in refused["message"]
    resp = await w.client.get("/api/v1/usage", headers={"Authorization": f"Bearer {key['key']}"})
    usage = await resp.json()
    shown_budgets = {b["period"]: b for b in usage["budgets"]}
    assert shown_budgets["daily"]["resets_at"] == refused["resets_at"]
    assert shown_budgets["weekly"]["window_start"] == tokyo["window_start"]
    # The usage windows are the gateway's (GATEWAY_TIMEZONE).
    daily = next(u for u in usage["usage"] if u["period"] == "daily")
    assert daily["window_start"] == shown_budgets["daily"]["window_start"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00[+-]\d\d:\d\d", daily["resets_at"])


async def test_bad_rules_are_400s(admin_world: World) -> None:
    w = admin_world
    body = {"scope": "user", "subject": "alice", "period": "daily", "limit": "1"}
    await error(await _put(w, {**body, "timezone": "Mars/Olympus"}), 400, "invalid_request", "timezone")
    await error(await _put(w, {**body, "month_starts_on": 29}), 400, "invalid_request", "month_starts_on")
    await error(await _put(w, {**body, "month_starts_on": 0}), 400, "invalid_request", "month_starts_on")
    await error(await _put(w, {**body, "week_starts": "funday"}), 400, "invalid_request", "week_starts")
    assert await w.sql("SELECT COUNT(*) FROM budgets") == [(0,)]
    made = await ok(
        w, "PUT", "/admin/v1/budgets", json={**body, "timezone": "Europe/Berlin", "month_starts_on": 28}
    )
    assert (made["timezone"], made["month_starts_on"]) == ("Europe/Berlin", 28)
    audit = await w.sql("SELECT action, after FROM audit_log WHERE action = 'budget.set'")
    assert len(audit) == 1 and "Europe/Berlin" in audit[0][1]


async def _put(w: World, body: dict[str, Any]) -> Any:
    from .admin_helpers import call

    return await call(w, "PUT", "/admin/v1/budgets", json=body)


def test_budgets_made_before_keep_utc(backend: Backend) -> None:
    """Budgets there before migration 0013 get UTC, monday, 1: their windows do not move."""
    migrate.downgrade(backend.url, "0011")
    engine = create_engine(backend.url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg2"))
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO budgets (scope, subject, period, limit_micros, enforce, created_at, "
                    "updated_at) VALUES ('team', '1', 'monthly', 5, true, 0, 0)"
                )
            )
        migrate.upgrade(backend.url, "head")
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT timezone, week_starts, month_starts_on FROM budgets")).all()
        assert [tuple(row) for row in rows] == [("UTC", "monday", 1)]
    finally:
        engine.dispose()


async def test_alert_events_show_the_zones_offset(admin_world: World) -> None:
    """A threshold crossed on a Tokyo budget: the event's window in Tokyo's offset, and the Slack
    sentence says when it resets in the same words."""
    w = admin_world
    key = await w.key("alice")
    body = {"scope": "user", "subject": "alice", "period": "daily", "limit": "0.2", "alert_at": [50]}
    budget = await ok(w, "PUT", "/admin/v1/budgets", json={**body, "timezone": "Asia/Tokyo"})
    assert (await w.chat(key["key"])).status == 200
    for _ in range(100):
        listed = (await ok(w, "GET", "/admin/v1/events"))["events"]
        if listed:
            break
        await asyncio.sleep(0.05)
    (event,) = listed
    assert event["data"]["window_start"] == budget["window_start"]
    assert event["data"]["window_start"].endswith("T00:00:00+09:00")
    assert event["data"]["resets_at"] == budget["resets_at"]
    assert budget["resets_at"] in sentence(event)
