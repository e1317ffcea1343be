"""End-user budgets (contract §11): scope `end_user`, subject USER/END_USER, defaults USER/*."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .admin_helpers import cli, cli_json, error, ok
from .conftest import Backend, World, assert_counters_match_ledger, counters_equal_ledger_sql
from .procs import gateways, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}  # 0.1 credits
END_USERS = ("cust-a", "cust-b", "cust-c")


async def _chat(w: World, key: str, end_user: str | None, *, in_body: bool = False) -> Any:
    """A chat request for `end_user`, named by the header (or the body's `user`)."""
    headers = {"Authorization": f"Bearer {key}"}
    body = dict(BODY)
    if end_user is not None and in_body:
        body["user"] = end_user
    elif end_user is not None:
        headers["X-Gateway-End-User"] = end_user
    return await w.client.post("/api/v1/chat", json=body, headers=headers)


async def _budget(w: World, subject: str, limit: str, period: str = "daily") -> dict[str, Any]:
    return dict(await w.admin(budgeting.set_budget, "end_user", subject, period, limit, now_us()))


async def _admitted(w: World, key: str, calls: list[str | None]) -> Counter[tuple[str | None, int]]:
    """Send `calls` (the end user of each) all at once: (end user, status) counts."""

    async def one(i: int, end_user: str | None) -> tuple[str | None, int]:
        resp = await _chat(w, key, end_user, in_body=i % 2 == 0)
        await resp.read()
        return end_user, resp.status

    return Counter(await asyncio.gather(*(one(i, end_user) for i, end_user in enumerate(calls))))


async def test_a_default_gives_each_end_user_exactly_its_limit_under_concurrency(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """300 concurrent requests from 3 end users of alice against `alice/*` at 0.5 a day: each end user
    is admitted exactly 5; requests that name no end user are not held to it."""
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    key = (await w.key("alice"))["key"]
    default = await cli_json(capsys, "budgets", "set", "end_user", "alice/*", "0.5", "--period", "daily")
    assert (default["scope"], default["subject"], default["default"]) == ("end_user", "alice/*", True)
    w.upstream.chunk_delay = 0.001
    calls: list[str | None] = [END_USERS[i % 3] for i in range(300)] + [None] * 12
    random.Random(19).shuffle(calls)
    counts = await _admitted(w, key, calls)
    assert counts == {
        **{(end_user, 200): 5 for end_user in END_USERS},
        **{(end_user, 402): 95 for end_user in END_USERS},
        (None, 200): 12,
    }
    assert len(w.upstream.received) == 27
    rows = await w.sql("SELECT end_user, COUNT(*) FROM ledger WHERE outcome = 'charged' GROUP BY end_user")
    assert sorted(rows, key=str) == sorted([(e, 5) for e in END_USERS] + [(None, 12)], key=str)
    await assert_counters_match_ledger(w)
    assert (await cli_json(capsys, "ledger", "verify"))["ok"] is True

    # Listed: the default alone, or with --expand the budgets it made, one per end user.
    (default,) = await ok(w, "GET", "/admin/v1/budgets", params={"scope": "end_user"})
    assert (default["subject"], default["default"], default["from_default"]) == ("alice/*", True, None)
    assert (default["limit"], default["spent"]) == (0.5, 0)
    expanded = await ok(w, "GET", "/admin/v1/budgets", params={"scope": "end_user", "expand": "true"})
    made = [b for b in expanded if not b["default"]]
    assert sorted(b["subject"] for b in made) == [f"alice/{e}" for e in END_USERS]
    for budget in made:
        assert (budget["limit"], budget["spent"], budget["held"], budget["remaining"]) == (0.5, 0.5, 0, 0)
        assert budget["from_default"] == "alice/*"
    assert await cli_json(capsys, "budgets", "list", "--scope", "end_user", "--expand") == expanded
    code, out, _ = await cli(capsys, "budgets", "list", "--expand")
    assert code == 0 and "alice/cust-b" in out and "FROM_DEFAULT" in out


async def test_a_refusal_names_the_end_user(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "0.1")
    assert (await _chat(w, key, "cust-a")).status == 200
    body = await error(await _chat(w, key, "cust-a"), 402, "budget_exceeded")
    assert body["scope"] == "end_user"
    assert body["subject"] == "alice/cust-a"
    assert body["end_user"] == "cust-a"
    assert "end-user budget of 'cust-a' (an end user of 'alice')" in body["message"]
    # Another end user, and the same name sent by another user's key, have their own.
    assert (await _chat(w, key, "cust-b")).status == 200
    assert (await _chat(w, (await w.key("bob"))["key"], "cust-a")).status == 200


async def test_an_end_users_own_budget_wins_over_the_default(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "0.2")
    await _budget(w, "alice/vip", "0.5")
    counts = await _admitted(w, key, ["vip"] * 20 + ["cust-a"] * 20)
    assert (counts[("vip", 200)], counts[("cust-a", 200)]) == (5, 2)
    # A default of another period applies beside an own budget of this one; like any budget set
    # in the middle of a window, it counts from when it was made (on the end user's next request).
    await _budget(w, "alice/*", "0.6", "monthly")
    await _budget(w, "alice/vip", "1", "daily")
    counts = await _admitted(w, key, ["vip"] * 20)
    assert counts[("vip", 200)] == 5  # the daily 1 binds (0.5 left), not the monthly 0.6
    counts = await _admitted(w, key, ["vip"] * 3)
    assert counts[("vip", 200)] == 0
    listed = await ok(w, "GET", "/admin/v1/budgets", params={"scope": "end_user", "subject": "alice/vip"})
    assert [(b["period"], b["limit"], b["spent"], b["from_default"]) for b in listed] == [
        ("daily", 1, 1, None),
        ("monthly", 0.6, 0.5, "alice/*"),
    ]
    await assert_counters_match_ledger(w)


async def test_changing_or_deleting_a_default_moves_the_budgets_it_made(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "0.2")
    assert (await _admitted(w, key, ["a", "b"] * 5))[("a", 200)] == 2
    # A higher default: the budgets it made follow, and what they spent still counts.
    await _budget(w, "alice/*", "0.3")
    counts = await _admitted(w, key, ["a", "b"] * 5)
    assert (counts[("a", 200)], counts[("b", 200)]) == (1, 1)
    # Set for one end user, it is theirs: it no longer follows the default.
    own = await _budget(w, "alice/a", "0.5")
    assert (own["spent"], own["from_default"]) == (0.3, None)
    await _budget(w, "alice/*", "0.1")
    counts = await _admitted(w, key, ["a", "b"] * 5)
    assert (counts[("a", 200)], counts[("b", 200)]) == (2, 0)
    # Deleting the default frees the end users who had none of their own.
    await ok(
        w,
        "DELETE",
        "/admin/v1/budgets",
        204,
        json={"scope": "end_user", "subject": "alice/*", "period": "daily"},
    )
    counts = await _admitted(w, key, ["a", "b"] * 3)
    assert (counts[("a", 200)], counts[("a", 402)], counts[("b", 200)]) == (0, 3, 3)
    assert await ok(w, "GET", "/admin/v1/budgets", params={"scope": "end_user", "expand": "true"}) == [
        own | {"spent": 0.5, "remaining": 0}
    ]
    # Deleting an own budget while a default exists: the end user gets the default's, held to what
    # they spent this window.
    await _budget(w, "alice/*", "0.6")
    await ok(
        w,
        "DELETE",
        "/admin/v1/budgets",
        204,
        json={"scope": "end_user", "subject": "alice/a", "period": "daily"},
    )
    counts = await _admitted(w, key, ["a"] * 3)
    assert counts[("a", 200)] == 1
    (theirs,) = await ok(w, "GET", "/admin/v1/budgets", params={"scope": "end_user", "subject": "alice/a"})
    assert (theirs["limit"], theirs["spent"], theirs["from_default"]) == (0.6, 0.6, "alice/*")
    # A budget that comes from a default is not the end user's to delete.
    resp = await w.client.delete(
        "/admin/v1/budgets",
        json={"scope": "end_user", "subject": "alice/b", "period": "daily"},
        headers={"Authorization": "Bearer admin-token-for-tests"},
    )
    body = await error(resp, 404, "not_found", "subject")
    assert "follows the default 'alice/*'" in body["message"]
    await assert_counters_match_ledger(w)


@pytest.mark.parametrize(
    ("subject", "status", "named"),
    [
        ("nobody/x", 404, "does not name an end user"),
        ("alice", 404, "does not name an end user"),
        ("alice/", 404, "does not name an end user"),
        ("alice/" + "x" * 129, 400, "at most 128"),
        ("a/b/c", 400, "ambiguous"),
    ],
)
async def test_end_user_subjects_are_checked(
    admin_world: World, subject: str, status: int, named: str
) -> None:
    w = admin_world
    await w.user("a")
    await w.user("a/b")
    resp = await w.client.put(
        "/admin/v1/budgets",
        json={"scope": "end_user", "subject": subject, "period": "daily", "limit": 1},
        headers={"Authorization": "Bearer admin-token-for-tests"},
    )
    body = await error(resp, status, "not_found" if status == 404 else "invalid_request", "subject")
    assert named in body["message"]


async def test_users_and_end_users_with_slashes(admin_world: World) -> None:
    """A user's name and an end user may hold slashes: the user is the part that names one."""
    w = admin_world
    await w.user("ops/bots")
    key = (await w.key("ops/bots"))["key"]
    budget = await _budget(w, "ops/bots/tenant/7", "0.1")
    assert budget["subject"] == "ops/bots/tenant/7"
    assert (await _chat(w, key, "tenant/7")).status == 200
    body = await error(await _chat(w, key, "tenant/7"), 402, "budget_exceeded")
    assert body["subject"] == "ops/bots/tenant/7"


async def test_usage_shows_the_named_end_users_budgets(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "0.5")
    await _budget(w, "alice/*", "2", "monthly")
    await _budget(w, "alice/vip", "1")
    assert (await _chat(w, key, "cust-a")).status == 200
    auth = {"Authorization": f"Bearer {key}"}

    async def end_user_budgets(**kwargs: Any) -> list[tuple[Any, ...]]:
        resp = await w.client.get("/api/v1/usage", **kwargs)
        assert resp.status == 200, await resp.text()
        return [
            (b["subject"], b["period"], b["limit"], b["spent"], b["from_default"])
            for b in (await resp.json())["budgets"]
            if b["scope"] == "end_user"
        ]

    assert await end_user_budgets(headers=auth) == []
    assert await end_user_budgets(headers={**auth, "X-Gateway-End-User": "cust-a"}) == [
        ("alice/cust-a", "daily", 0.5, 0.1, "alice/*"),
        ("alice/cust-a", "monthly", 2, 0.1, "alice/*"),
    ]
    # Not seen yet: the defaults they would get theirs from, nothing spent.
    assert await end_user_budgets(headers=auth, params={"end_user": "new"}) == [
        ("alice/new", "daily", 0.5, 0, "alice/*"),
        ("alice/new", "monthly", 2, 0, "alice/*"),
    ]
    assert await end_user_budgets(headers={**auth, "X-Gateway-End-User": "vip"}) == [
        ("alice/vip", "daily", 1, 0, None),
        ("alice/vip", "monthly", 2, 0, "alice/*"),
    ]
    resp = await w.client.get("/api/v1/usage", headers=auth, params={"end_user": "x" * 129})
    assert "`end_user` query parameter" in (await error(resp, 400, "invalid_request"))["message"]


async def test_verify_names_an_end_users_budget(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "1")
    assert (await _chat(w, key, "cust-a")).status == 200
    await w.store.run(
        lambda conn: conn.execute(text("UPDATE budget_counters SET spent_micros = spent_micros + 1"))
    )
    code, out, _ = await cli(capsys, "ledger", "verify", "--json")
    assert code == 1
    (difference,) = json.loads(out)["differences"]
    assert (difference["scope"], difference["subject"]) == ("end_user", "alice/cust-a")


async def test_a_default_crossing_alert_thresholds_fires_per_end_user(admin_world: World) -> None:
    w = admin_world
    key = (await w.key("alice"))["key"]
    at = now_us()
    await w.admin(
        functools.partial(budgeting.set_budget, alert_at=[50]), "end_user", "alice/*", "daily", "0.2", at
    )
    for end_user in ("cust-a", "cust-a", "cust-b"):
        assert (await _chat(w, key, end_user)).status == 200
    events = await ok(w, "GET", "/admin/v1/events")
    crossed = sorted((e["data"]["subject"], e["data"]["threshold"]) for e in events["events"])
    assert crossed == [("alice/cust-a", 50), ("alice/cust-b", 50)]


@pytest.mark.slow
async def test_default_end_user_budgets_across_replicas(backend: Backend, fake: Any, tmp_path: Any) -> None:
    """Two gateway processes on one database, 300 concurrent requests from 3 end users of one user
    against `USER/*`: each end user admitted exactly its limit's worth, counters equal to the ledger."""
    upstream, upstream_url = fake
    store = open_store(backend.url)
    try:
        at = now_us()
        await store.run(services.create_team, "eng", at)
        await store.run(services.create_user, "alice", "eng", at)
        keys = [(await store.run(services.create_key, "alice", None, at))["key"] for _ in range(2)]
        await store.run(budgeting.set_budget, "end_user", "alice/*", "daily", "0.7", at)  # 7 each
        await store.run(budgeting.set_budget, "team", "eng", "daily", "100", at)
        with gateways(2, backend.url, upstream_url, tmp_path) as started:
            await asyncio.gather(*(wait_ready(g) for g in started))
            statuses = await _drive([g.url for g in started], keys, 300)
            logs = "\n".join(g.log.read_text() for g in started)
        assert "deadlock" not in logs and "Traceback" not in logs, logs
        assert {e: statuses[(e, 200)] for e in END_USERS} == dict.fromkeys(END_USERS, 7)
        assert sum(statuses.values()) == 300 and set(s for _, s in statuses) == {200, 402}
        assert len(upstream.received) == 21

        def check(conn: Any) -> Any:
            return (
                conn.execute(text(counters_equal_ledger_sql())).all(),
                conn.execute(text("SELECT COUNT(*) FROM budgets WHERE default_id IS NOT NULL")).scalar_one(),
                conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one(),
            )

        counters, made, holds = await store.run(check)
        assert (made, holds) == (3, 0)
        for row in counters:
            assert (row[2], row[3]) == (row[4], row[5]), row
    finally:
        await store.close()


async def _drive(urls: list[str], keys: list[str], total: int) -> Counter[tuple[str, int]]:
    """`total` requests over the gateways and keys, 64 at a time, cycling through END_USERS."""
    connector = aiohttp.TCPConnector(limit=64)
    statuses: Counter[tuple[str, int]] = Counter()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(i: int) -> None:
            end_user = END_USERS[i % 3]
            async with session.post(
                urls[i % len(urls)] + "/api/v1/chat",
                json=dict(BODY, stream=i % 4 == 0),
                headers={
                    "Authorization": f"Bearer {keys[(i // 2) % len(keys)]}",
                    "X-Gateway-End-User": end_user,
                },
            ) as resp:
                await resp.read()
                statuses[(end_user, resp.status)] += 1

        await asyncio.gather(*(one(i) for i in range(total)))
    return statuses


async def test_changing_a_default_while_its_end_users_arrive(
    admin_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Admissions that make end users' budgets from a default, racing changes of that default
    (which lock the budgets it made and their counters): every request is answered 200 or 402,
    never an error, no deadlock (which the store would retry unseen but for its warning), and every
    counter equals the ledger."""
    w = admin_world
    key = (await w.key("alice"))["key"]
    await _budget(w, "alice/*", "0.3")
    calls: list[str | None] = [f"cust-{i % 50}" for i in range(250)]
    random.Random(5).shuffle(calls)

    async def changes() -> None:
        for i in range(12):
            await _budget(w, "alice/*", "0.5" if i % 2 else "0.3")
            await asyncio.sleep(0.005)

    counts, _ = await asyncio.gather(_admitted(w, key, calls), changes())
    assert {status for _, status in counts} <= {200, 402}
    assert sum(counts.values()) == 250
    made = await w.sql(
        "SELECT COUNT(*), MIN(limit_micros), MAX(limit_micros) FROM budgets WHERE default_id IS NOT NULL"
    )
    assert made == [(50, 500_000, 500_000)]  # the last change (i = 11) set 0.5 on every budget made
    assert "deadlock" not in caplog.text
    await assert_counters_match_ledger(w)
