"""Billing reports: sums exactly equal to the charged ledger rows, for every grouping and range."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.core.pricing import credits_json
from gateway.ops import reports, services
from gateway.store import Store

from .admin_helpers import call, cli, cli_json, error, ok, traffic
from .conftest import Backend, World

DAY = 86_400_000_000
# Midnight starting 2026-02-01: rows around it cross a day and a month boundary.
BASE = int(datetime(2026, 2, 1, tzinfo=UTC).timestamp()) * 1_000_000
USERS = {"alice": "eng", "bob": "eng", "carol": None}
MODELS = ("openai/gpt-oss-20b", "google/gemini-2.5-pro")
PRICES = {"openai/gpt-oss-20b": 100_000, "google/gemini-2.5-pro": 3_000_000}
OUTCOMES = ("charged", "charged", "upstream_error", "expired")
BOUNDARIES = (-DAY - 1, -DAY, -1, 0, 1, DAY - 1, DAY, DAY + 1)

_INSERT = text(
    "INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model, "
    "message_count, unit_price_micros, credits_micros, outcome, upstream_status, prompt_tokens, "
    "completion_tokens, total_tokens, stream, duration_us, end_user, tags) VALUES (:request_id, :at, :at, "
    ":team_id, :user_id, :key_id, :model, :messages, :price, :credits, :outcome, 200, :prompt, :completion, "
    "NULL, false, 0, :end_user, :tags)"
)
_ADJUST = text(
    "INSERT INTO ledger_adjustments (request_id, credits_micros, reason, created_at, actor) "
    "VALUES (:request_id, :credits, 'test', 0, 'test')"
)


def _iso(offset: int) -> str:
    moment = datetime.fromtimestamp(BASE / 1_000_000, UTC) + timedelta(microseconds=offset)
    return moment.isoformat().replace("+00:00", "Z")


def _people(conn: Any) -> dict[str, tuple[int, int | None]]:
    """Team eng with alice and bob, carol without, made once per database: name -> (user id, team id)."""
    rows = conn.execute(text("SELECT name, id, team_id FROM users")).all()
    if not rows:
        services.create_team(conn, "eng", 0)
        for name, team in USERS.items():
            services.create_user(conn, name, team, 0)
        rows = conn.execute(text("SELECT name, id, team_id FROM users")).all()
    return {r[0]: (r[1], r[2]) for r in rows}


ROW = st.tuples(
    st.sampled_from(sorted(USERS)),
    st.sampled_from(MODELS),
    st.one_of(st.sampled_from(BOUNDARIES), st.integers(-3 * DAY, 3 * DAY)),
    st.sampled_from(OUTCOMES),
    st.integers(1, 40),
    st.one_of(st.none(), st.integers(0, 100_000)),
    st.one_of(st.none(), st.integers(0, 100_000)),
    st.one_of(st.none(), st.sampled_from(("cust-1", "cust-2"))),
    st.lists(st.sampled_from(("search", "billing", "proj:x")), unique=True, max_size=3),
    st.one_of(st.none(), st.integers(1, 10**6), st.integers(-(10**6), -1)),
)
BOUND = st.one_of(st.none(), st.sampled_from(BOUNDARIES))


def _expected(
    rows: list[tuple[Any, ...]], group_by: tuple[str, ...], start: int | None, end: int | None
) -> tuple[dict[tuple[Any, ...], list[int]], list[int]]:
    """The report computed from the generated rows in Python: groups -> sums, and totals."""
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 6)
    totals = [0] * 6
    for user, model, offset, outcome, messages, prompt, completion, end_user, tags, adjust in rows:
        if (start is not None and offset < start) or (end is not None and offset >= end):
            continue
        sums = [0] * 6
        if outcome == "charged":
            sums = [1, messages, messages * PRICES[model], prompt or 0, completion or 0, 0]
        if adjust is not None:
            sums[2] += adjust
            sums[5] += adjust
        day = (datetime(2026, 2, 1) + timedelta(microseconds=offset)).date().isoformat()
        fields = {"team": USERS[user], "user": user, "key": f"key_{user}", "model": model, "day": day}
        fields["month"] = day[:7]
        fields["end_user"] = end_user
        # A row counts in the group of each of its tags; in totals once.
        for tag in (tags or [None]) if "tag" in group_by else [None]:
            fields["tag"] = tag
            group = tuple(fields[g] for g in group_by)
            groups[group] = [a + b for a, b in zip(groups[group], sums, strict=True)]
        totals = [a + b for a, b in zip(totals, sums, strict=True)]
    return {g: v for g, v in groups.items() if any(v)}, totals


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(ROW, max_size=30),
    group_bys=st.lists(st.lists(st.sampled_from(reports.GROUPS), unique=True), min_size=1, max_size=6),
    start=BOUND,
    end=BOUND,
)
async def test_report_equals_the_charged_ledger_rows(
    store: Store, rows: list[tuple[Any, ...]], group_bys: list[list[str]], start: int | None, end: int | None
) -> None:
    if start is not None and end is not None and end < start:
        start, end = end, start

    def load(conn: Any) -> None:
        people = _people(conn)
        conn.execute(text("DELETE FROM ledger_adjustments"))
        conn.execute(text("DELETE FROM ledger"))
        if rows:
            conn.execute(_INSERT, [_params(i, row, people) for i, row in enumerate(rows)])
        adjustments = [
            {"request_id": f"r{i:031d}", "credits": row[-1]}
            for i, row in enumerate(rows)
            if row[-1] is not None
        ]
        if adjustments:
            conn.execute(_ADJUST, adjustments)

    await store.run(load)
    for group_by in [tuple(g) for g in group_bys] + [()]:
        query = reports.parse_query(
            None if start is None else _iso(start), None if end is None else _iso(end), ",".join(group_by)
        )
        computed = await store.run(reports.usage_report, query)
        groups, totals = _expected(rows, group_by, start, end)
        assert computed.totals == tuple(totals)
        assert {g: list(sums) for g, sums in computed.rows} == groups
        report = computed.json()
        want_totals = dict(zip(reports.SUMS, totals, strict=True)) | {
            "credits": credits_json(totals[2]),
            "adjustments": credits_json(totals[5]),
        }
        assert report["totals"] == want_totals
        got = {tuple(r[g] for g in group_by): r for r in report["rows"]}
        assert len(got) == len(report["rows"])
        assert {g: [got[g][s] for s in reports.SUMS] for g in got} == {
            g: [*v[:2], credits_json(v[2]), *v[3:5], credits_json(v[5])] for g, v in groups.items()
        }
        keys = [tuple((v is None, v or "") for v in g) for g in got]
        assert keys == sorted(keys)


def _params(i: int, row: tuple[Any, ...], people: dict[str, tuple[int, int | None]]) -> dict[str, Any]:
    user, model, offset, outcome, messages, prompt, completion, end_user, tags, _ = row
    return {
        "request_id": f"r{i:031d}",
        "at": BASE + offset,
        "team_id": people[user][1],
        "user_id": people[user][0],
        "key_id": f"key_{user}",
        "model": model,
        "messages": messages,
        "price": PRICES[model],
        "credits": messages * PRICES[model] if outcome == "charged" else 0,
        "outcome": outcome,
        "prompt": prompt,
        "completion": completion,
        "end_user": end_user,
        "tags": ",".join(tags) or None,
    }


async def _seed(w: World) -> dict[str, dict[str, Any]]:
    keys = {name: await w.key(name) for name in USERS}
    await traffic(w, keys["alice"]["key"], (3, "openai/gpt-oss-20b"), (1, "google/gemini-2.5-pro"))
    await traffic(w, keys["bob"]["key"], (2, "openai/gpt-oss-120b"), (5, "openai/gpt-oss-20b"))
    await traffic(w, keys["carol"]["key"], (7, "google/gemini-2.5-flash-lite"))
    for key in (keys["alice"]["key"], keys["carol"]["key"]):
        refused = await w.client.post(
            "/api/v1/chat",
            json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:429"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert refused.status == 429
    return keys


@pytest.mark.parametrize(
    "group_by",
    [
        "",
        "team",
        "user",
        "key",
        "model",
        "day",
        "month",
        "team,model",
        "user,day",
        "month,team,user,model,day,key",
    ],
)
async def test_http_report_matches_the_ledger(admin_world: World, group_by: str) -> None:
    w = admin_world
    keys = await _seed(w)
    body = await ok(w, "GET", f"/admin/v1/usage?group_by={group_by}")
    charged = await w.sql(
        "SELECT COUNT(*), SUM(message_count), SUM(credits_micros), SUM(prompt_tokens), "
        "SUM(completion_tokens) FROM ledger WHERE outcome = 'charged'"
    )
    count, messages, credits, prompt, completion = (int(v) for v in charged[0])
    assert count == 5 and len(await w.sql("SELECT * FROM ledger")) == 7
    assert body["totals"] == {
        "requests": count,
        "messages": messages,
        "credits": credits_json(credits),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "adjustments": 0,
    }
    fields = [g for g in group_by.split(",") if g]
    for row in body["rows"]:
        assert set(row) == {*fields, *reports.SUMS}
    for name in reports.SUMS:
        summed = sum(row[name] for row in body["rows"])
        assert (
            summed == pytest.approx(body["totals"][name])
            if name in reports.CREDIT_SUMS
            else summed == body["totals"][name]
        )
    if group_by == "user":
        by_user = {r["user"]: (r["requests"], r["messages"], r["credits"]) for r in body["rows"]}
        assert by_user == {"alice": (2, 4, 3.3), "bob": (2, 7, 1), "carol": (1, 7, 1.05)}
    if group_by == "team":
        assert [(r["team"], r["requests"]) for r in body["rows"]] == [("eng", 4), (None, 1)]
    if group_by == "key":
        assert {r["key"] for r in body["rows"]} == {k["id"] for k in keys.values()}
    today = datetime.now(UTC).date().isoformat()
    if "day" in fields:
        assert {r["day"] for r in body["rows"]} == {today}
    if "month" in fields:
        assert {r["month"] for r in body["rows"]} == {today[:7]}


async def _charge_alice(w: World, prefix: str, rows: list[tuple[int, int]]) -> None:
    """Charged ledger rows of alice's, `PREFIX0`, `PREFIX1`...: each (microseconds after BASE,
    messages) of GPT OSS 20B, without a team."""
    (alice_id,) = (await w.sql("SELECT id FROM users WHERE name = 'alice'"))[0]

    def load(conn: Any) -> None:
        for i, (offset, messages) in enumerate(rows):
            conn.execute(
                _INSERT,
                {
                    "request_id": f"{prefix}{i}",
                    "at": BASE + offset,
                    "team_id": None,
                    "user_id": alice_id,
                    "key_id": "key_x",
                    "model": "openai/gpt-oss-20b",
                    "messages": messages,
                    "price": 100_000,
                    "credits": messages * 100_000,
                    "outcome": "charged",
                    "prompt": None,
                    "completion": None,
                    "end_user": None,
                    "tags": None,
                },
            )

    await w.store.run(load)


async def test_range_is_from_inclusive_to_exclusive(admin_world: World, backend: Backend) -> None:
    w = admin_world
    rows = [(-1, 1), (0, 2), (DAY - 1, 4), (DAY, 8)]
    await _charge_alice(w, "edge", rows)
    cases = {
        ("2026-02-01", "2026-02-02"): 2 + 4,
        ("2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z"): 2 + 4,
        ("2026-02-01T01:00:00+01:00", "2026-02-02"): 2 + 4,
        ("2026-01-31T23:59:59.999999", "2026-02-01"): 1,
        ("2026-02-01T00:00:00.000001Z", None): 4 + 8,
        (None, "2026-02-01"): 1,
        (None, None): 15,
        ("2026-02-01", "2026-02-01"): 0,
    }
    for (start, end), messages in cases.items():
        query = "&".join(f"{k}={v}" for k, v in (("from", start), ("to", end)) if v).replace("+", "%2B")
        body = await ok(w, "GET", f"/admin/v1/usage?{query}&group_by=day,month")
        assert body["totals"]["messages"] == messages, (start, end, body)
    body = await ok(w, "GET", "/admin/v1/usage?group_by=month,day")
    assert [(r["month"], r["day"], r["messages"]) for r in body["rows"]] == [
        ("2026-01", "2026-01-31", 1),
        ("2026-02", "2026-02-01", 6),
        ("2026-02", "2026-02-02", 8),
    ]
    body = await ok(w, "GET", "/admin/v1/usage?group_by=month")
    assert [(r["month"], r["messages"], r["credits"]) for r in body["rows"]] == [
        ("2026-01", 1, 0.1),
        ("2026-02", 14, 1.4),
    ]


async def test_csv(admin_world: World) -> None:
    w = admin_world
    await _seed(w)
    await w.user("=HYPERLINK(1)", "eng")
    key = await w.key("=HYPERLINK(1)")
    await traffic(w, key["key"], (1, "openai/gpt-oss-20b"))
    resp = await call(w, "GET", "/admin/v1/usage?group_by=team,user&format=csv")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    raw = await resp.text()
    lines = list(csv.reader(io.StringIO(raw)))
    assert lines[0] == ["team", "user", *reports.SUMS]
    assert raw.startswith(
        "team,user,requests,messages,credits,prompt_tokens,completion_tokens,adjustments\r\n"
    )
    body = await ok(w, "GET", "/admin/v1/usage?group_by=team,user")
    assert len(lines) == 1 + len(body["rows"])
    by_user = {line[1]: line for line in lines[1:]}
    assert by_user["alice"] == [
        "eng",
        "alice",
        "2",
        "4",
        "3.3",
        by_user["alice"][5],
        by_user["alice"][6],
        "0",
    ]
    assert by_user["carol"][:5] == ["", "carol", "1", "7", "1.05"]
    # A name that looks like a formula is not one in a spreadsheet.
    assert by_user["'=HYPERLINK(1)"][0] == "eng"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("from=yesterday", "from"),
        ("from=2026-13-01", "from"),
        ("to=2026-02-30", "to"),
        ("from=2026-02-02&to=2026-02-01", "to"),
        ("group_by=team,team", "group_by"),
        ("group_by=org", "group_by"),
        ("group_by=team,", "group_by"),
        ("format=xml", "format"),
        ("groupby=team", "groupby"),
    ],
)
async def test_bad_parameters(admin_world: World, query: str, field: str) -> None:
    await error(await call(admin_world, "GET", f"/admin/v1/usage?{query}"), 400, "invalid_request", field)


async def test_cli_report(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    await _seed(w)
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    http = await ok(w, "GET", f"/admin/v1/usage?from={today}&to={tomorrow}&group_by=team,model")
    args = ("report", "--from", str(today), "--to", str(tomorrow), "--group-by", "team,model")
    assert await cli_json(capsys, *args) == http
    code, out, _ = await cli(capsys, *args, "--format", "json")
    assert code == 0 and __import__("json").loads(out) == http
    code, out, _ = await cli(capsys, *args, "--format", "csv")
    resp = await call(w, "GET", f"/admin/v1/usage?from={today}&to={tomorrow}&group_by=team,model&format=csv")
    assert code == 0 and out == (await resp.text()).replace("\r\n", "\n")
    code, out, _ = await cli(capsys, *args)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TEAM", "MODEL", *(s.upper() for s in reports.SUMS)]
    assert lines[-1].split()[:4] == ["TOTAL", "5", "18", "5.35"]
    code, _, err = await cli(capsys, "report", "--group-by", "planet")
    assert code == 1 and "group_by" in err


async def test_report_at_now(admin_world: World) -> None:
    """`to` defaults to open: a request admitted a moment ago is in the report."""
    w = admin_world
    await _seed(w)
    at = datetime.fromtimestamp(now_us() / 1_000_000, UTC).isoformat()
    body = await ok(w, "GET", f"/admin/v1/usage?to={at.replace('+00:00', 'Z')}")
    assert body["totals"]["requests"] == 5
    assert body["rows"] == [body["totals"]]


async def test_days_in_the_reports_time_zone(admin_world: World) -> None:
    """`timezone`: days and months are the zone's local dates, and `from`/`to` without an offset
    are read in it; the default is GATEWAY_TIMEZONE. Rows at 07:59 and 08:00 UTC on 1 February
    (23:59 on 31 January and 00:00 on 1 February in California) fall in different local days."""
    w = admin_world
    hour = DAY // 24
    rows = [(-1, 1), (8 * hour - 1, 2), (8 * hour, 4), (DAY + 8 * hour, 8)]
    await _charge_alice(w, "tz", rows)
    # Adjustments are grouped by their row's local day too.
    await w.store.run(lambda conn: conn.execute(_ADJUST, {"request_id": "tz2", "credits": -100_000}))
    utc = await ok(w, "GET", "/admin/v1/usage?group_by=month,day")
    assert [(r["day"], r["messages"]) for r in utc["rows"]] == [
        ("2026-01-31", 1),
        ("2026-02-01", 6),
        ("2026-02-02", 8),
    ]
    la = await ok(w, "GET", "/admin/v1/usage?group_by=month,day&timezone=America/Los_Angeles")
    assert [(r["month"], r["day"], r["messages"], r["adjustments"]) for r in la["rows"]] == [
        ("2026-01", "2026-01-31", 3, 0),
        ("2026-02", "2026-02-01", 4, -0.1),
        ("2026-02", "2026-02-02", 8, 0),
    ]
    assert la["totals"] == utc["totals"]
    ranged = await ok(w, "GET", "/admin/v1/usage?from=2026-02-01&to=2026-02-02&timezone=America/Los_Angeles")
    assert ranged["totals"]["messages"] == 4  # 08:00 UTC on the 1st to 08:00 UTC on the 2nd
    # The gateway's zone is the default; the CSV of the same report says the same days.
    await w.reconfigure(timezone="America/Los_Angeles")
    assert await ok(w, "GET", "/admin/v1/usage?group_by=month,day") == la
    tokyo = await ok(w, "GET", "/admin/v1/usage?group_by=day&timezone=Asia/Tokyo")
    assert [r["day"] for r in tokyo["rows"]] == ["2026-02-01", "2026-02-02"]
    await error(
        await call(w, "GET", "/admin/v1/usage?timezone=Mars/Olympus"), 400, "invalid_request", "timezone"
    )
