"""Rate and concurrency limits (contract §13) through the real stack, on both databases."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from gateway.core.metering import now_us
from gateway.ops import budgeting, limiting
from gateway.web.state import KEYS

from .admin_helpers import call, cli, cli_json, error, ok
from .conftest import Backend, World, assert_counters_match_ledger

SLOW = [{"role": "user", "content": "fake:slow:0.6"}]


async def _limit(
    w: World, scope: str, subject: str, kind: str, limit: Any, per: str | None = "minute"
) -> Any:
    result = await w.admin(limiting.set_limit, scope, subject, kind, limit, per, now_us())
    w.client.app[KEYS].clear()  # as an admin API change does; other processes wait out their cache
    return result


async def _burst(w: World, key: str, n: int, **extra: Any) -> tuple[Counter[int], list[Any]]:
    """`n` chat requests at once: the statuses counted, and each answer (status, headers, body)."""

    async def one() -> Any:
        resp = await w.chat(key, **extra)
        body = await resp.json()
        return resp.status, dict(resp.headers), body

    answers = await asyncio.gather(*(one() for _ in range(n)))
    return Counter(a[0] for a in answers), answers


async def test_fifty_at_once_against_ten_a_minute_admit_exactly_ten(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "key", key["id"], "requests", 10)
    statuses, answers = await _burst(w, key["key"], 50)
    assert statuses == {200: 10, 429: 40}
    assert len(w.upstream.received) == 10  # nothing of a refusal is forwarded
    refused = [a for a in answers if a[0] == 429]
    for _, headers, body in refused:
        e = body["error"]
        assert e["type"] == "rate_limited"
        assert (e["scope"], e["subject"], e["kind"], e["limit"], e["per"]) == (
            "key",
            key["id"],
            "requests",
            10,
            "minute",
        )
        # 10 a minute: one more every 6 s; the 11th waits for that.
        assert 1 <= int(headers["Retry-After"]) <= 6
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "0"
    remaining = sorted(int(a[1]["x-ratelimit-remaining-requests"]) for a in answers if a[0] == 200)
    assert remaining == list(range(10))
    assert all(a[1]["x-ratelimit-reset-requests"].endswith("s") for a in answers)
    rows = await w.sql("SELECT COUNT(*) FROM ledger")
    assert rows[0][0] == 10  # no ledger row for a refusal
    assert w.metrics.rate_limited.labels("key", "requests").value == 40
    assert w.metrics.requests.labels("openai/gpt-oss-20b", "rate_limited").value == 40


async def test_retry_after_is_honest(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "user", "alice", "requests", 2, "second")
    statuses, answers = await _burst(w, key["key"], 5)
    assert statuses == {200: 2, 429: 3}
    refused = [a for a in answers if a[0] == 429]
    assert {(a[2]["error"]["subject"], a[2]["error"]["per"]) for a in refused} == {("alice", "second")}
    wait = max(int(a[1]["Retry-After"]) for a in refused)
    assert wait == 1
    await asyncio.sleep(wait)
    assert (await w.chat(key["key"])).status == 200


async def test_no_limit_no_headers_and_not_limited(world: World) -> None:
    w = world
    key = await w.key("alice")
    resp = await w.chat(key["key"])
    assert resp.status == 200
    assert not any(name.lower().startswith("x-ratelimit") for name in resp.headers)
    assert await w.sql("SELECT COUNT(*) FROM rate_limit_state") == [(0,)]


async def test_a_limit_on_someone_else_does_not_mark_this_key(world: World) -> None:
    w = world
    mine, theirs = await w.key("carol"), await w.key("bob")
    await _limit(w, "key", theirs["id"], "requests", 1)
    for _ in range(3):
        resp = await w.chat(mine["key"])
        assert resp.status == 200 and "x-ratelimit-limit-requests" not in resp.headers


async def test_concurrent_never_lets_more_than_its_limit_reach_upstream(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "team", "eng", "concurrent", 3, None)
    statuses, answers = await _burst(w, key["key"], 12, messages=1)
    # Fast answers may free a slot for a later one, so at least 3 pass; none over 3 at a time.
    assert w.upstream.max_in_flight <= 3
    slow = await asyncio.gather(
        *(
            w.client.post(
                "/api/v1/chat",
                json={"model": "openai/gpt-oss-20b", "messages": SLOW},
                headers={"Authorization": f"Bearer {key['key']}"},
            )
            for _ in range(10)
        )
    )
    got = Counter(r.status for r in slow)
    assert got == {200: 3, 429: 7}
    assert w.upstream.max_in_flight == 3
    refused = [await r.json() for r in slow if r.status == 429]
    assert {(e["error"]["kind"], e["error"]["per"], e["error"]["limit"]) for e in refused} == {
        ("concurrent", None, 3)
    }
    assert all(r.headers["Retry-After"] == "1" for r in slow if r.status == 429)
    # Done: the slots are free again.
    assert (await w.chat(key["key"])).status == 200


async def test_a_refusal_takes_nothing_from_limits_or_budgets(world: World) -> None:
    """402s take nothing from the rate; 429s take nothing from the budget; the rate is judged first."""
    w = world
    key = await w.key("alice")
    await w.budget("user", "alice", "0.3")  # three requests at 0.1
    await _limit(w, "key", key["id"], "requests", 5)
    for _ in range(3):
        assert (await w.chat(key["key"])).status == 200
    for _ in range(4):
        await error(await w.chat(key["key"]), 402, "budget_exceeded")
    await w.budget("user", "alice", "10")
    for _ in range(2):  # the 402s took nothing: 2 of 5 are left
        assert (await w.chat(key["key"])).status == 200
    before = await w.sql("SELECT spent_micros, held_micros FROM budget_counters")
    for _ in range(3):
        await error(await w.chat(key["key"]), 429, "rate_limited")
    assert await w.sql("SELECT spent_micros, held_micros FROM budget_counters") == before
    # Too early and broke at once: told to wait (429), not that it is broke.
    await w.budget("user", "alice", "0.5")
    await error(await w.chat(key["key"]), 429, "rate_limited")
    await assert_counters_match_ledger(w)


async def test_credits_per_minute(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "user", "alice", "credits", "0.5")  # five requests of 0.1 credits a minute
    statuses, answers = await _burst(w, key["key"], 8)
    assert statuses == {200: 5, 429: 3}
    # (What the rate earned back in the milliseconds the burst took shows too.)
    left = sorted(float(a[1]["x-ratelimit-remaining-credits"]) for a in answers if a[0] == 200)
    assert left == pytest.approx([0, 0.1, 0.2, 0.3, 0.4], abs=0.01)
    assert all(a[1]["x-ratelimit-limit-credits"] == "0.5" for a in answers)
    refused = [a[2]["error"] for a in answers if a[0] == 429]
    assert {(e["kind"], e["limit"], e["per"]) for e in refused} == {("credits", 0.5, "minute")}
    # A request of 3 messages (0.3 credits) waits longer than one of 1.
    assert w.metrics.rate_limited.labels("user", "credits").value == 3


async def test_end_user_defaults_give_each_end_user_their_own_rate(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "end_user", "alice/*", "requests", 2)
    await _limit(w, "end_user", "alice/vip", "requests", 4)

    async def as_end_user(name: str | None) -> int:
        headers = {"Authorization": f"Bearer {key['key']}"}
        if name is not None:
            headers["X-Gateway-End-User"] = name
        resp = await w.client.post(
            "/api/v1/chat",
            json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}]},
            headers=headers,
        )
        if resp.status == 429:
            e = (await resp.json())["error"]
            assert e["scope"] == "end_user" and e["subject"] == f"alice/{name}"
        return resp.status

    calls = ["a", "b", "vip"] * 6 + [None] * 5
    statuses = Counter(zip(calls, await asyncio.gather(*(as_end_user(n) for n in calls)), strict=True))
    assert statuses == {
        ("a", 200): 2,
        ("a", 429): 4,
        ("b", 200): 2,
        ("b", 429): 4,
        ("vip", 200): 4,
        ("vip", 429): 2,
        (None, 200): 5,  # no end user: end-user limits do not apply
    }


async def test_limits_admin_api_and_audit(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    made = await ok(
        w,
        "PUT",
        "/admin/v1/limits",
        json={"scope": "key", "subject": key["id"], "kind": "requests", "limit": 10, "per": "minute"},
    )
    assert made == {
        "id": made["id"],
        "scope": "key",
        "subject": key["id"],
        "kind": "requests",
        "limit": 10,
        "per": "minute",
        "default": False,
    }
    changed = await ok(
        w,
        "PUT",
        "/admin/v1/limits",
        json={"scope": "key", "subject": key["id"], "kind": "requests", "limit": 20, "per": "minute"},
    )
    assert changed["id"] == made["id"] and changed["limit"] == 20
    team = await ok(
        w,
        "PUT",
        "/admin/v1/limits",
        json={"scope": "team", "subject": "eng", "kind": "concurrent", "limit": 4},
    )
    assert team["per"] is None and team["subject"] == "eng"
    listed = await ok(w, "GET", "/admin/v1/limits")
    assert [limit["id"] for limit in listed] == [made["id"], team["id"]]
    assert await ok(w, "GET", "/admin/v1/limits?scope=team&subject=eng") == [team]
    await ok(w, "DELETE", f"/admin/v1/limits/{made['id']}", status=204)
    assert await ok(w, "GET", "/admin/v1/limits") == [team]
    await error(await call(w, "DELETE", f"/admin/v1/limits/{made['id']}"), 404, "not_found", "id")
    audit = await ok(w, "GET", "/admin/v1/audit?action=limit.set")
    assert [e["after"]["limit"] for e in audit["entries"]] == [10, 20, 4]
    assert audit["entries"][1]["before"]["limit"] == 10
    deleted = await ok(w, "GET", "/admin/v1/audit?action=limit.delete")
    assert deleted["entries"][0]["before"]["id"] == made["id"]


@pytest.mark.parametrize(
    ("body", "field", "status"),
    [
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": 0}, "limit", 400),
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": -3}, "limit", 400),
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": "ten"}, "limit", 400),
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": True}, "limit", 400),
        ({"scope": "key", "subject": "KEY", "kind": "credits", "limit": "-1"}, "limit", 400),
        ({"scope": "key", "subject": "KEY", "kind": "tokens", "limit": 5}, "kind", 400),
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": 5, "per": "week"}, "per", 400),
        ({"scope": "key", "subject": "KEY", "kind": "concurrent", "limit": 5, "per": "minute"}, "per", 400),
        ({"scope": "org", "subject": "KEY", "kind": "requests", "limit": 5}, "scope", 400),
        ({"scope": "key", "subject": "key_nope", "kind": "requests", "limit": 5}, "subject", 404),
        ({"scope": "user", "subject": "nobody", "kind": "requests", "limit": 5}, "subject", 404),
        ({"scope": "key", "subject": "KEY", "kind": "requests", "limit": 5, "window": "x"}, "window", 400),
    ],
)
async def test_bad_input_is_a_400_naming_the_field_and_changes_nothing(
    admin_world: World, body: dict[str, Any], field: str, status: int
) -> None:
    w = admin_world
    key = await w.key("alice")
    body = {name: (key["id"] if value == "KEY" else value) for name, value in body.items()}
    resp = await call(w, "PUT", "/admin/v1/limits", json=body)
    await error(resp, status, "invalid_request" if status == 400 else "not_found", field)
    assert await ok(w, "GET", "/admin/v1/limits") == []
    assert (await ok(w, "GET", "/admin/v1/audit?action=limit.set"))["entries"] == []


async def test_limits_cli(
    world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    w = world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    key = await w.key("alice")
    code, out, _ = await cli(capsys, "limits", "set", "key", key["id"], "requests", "3", "--per", "second")
    assert code == 0 and out.strip().endswith(f"key {key['id']}: 3 requests per second"), out
    made = await cli_json(
        capsys, "limits", "set", "user", "alice", "credits", "2.5", "--per", "hour", "--json"
    )
    assert (made["kind"], made["limit"], made["per"]) == ("credits", 2.5, "hour")
    code, out, _ = await cli(capsys, "limits", "set", "team", "eng", "concurrent", "2")
    assert code == 0 and "team eng: 2 requests in flight" in out
    listed = await cli_json(capsys, "limits", "list", "--json")
    assert [(r["scope"], r["kind"]) for r in listed] == [
        ("key", "requests"),
        ("user", "credits"),
        ("team", "concurrent"),
    ]
    assert await cli_json(capsys, "limits", "list", "--scope", "user", "--subject", "alice", "--json") == [
        made
    ]
    code, out, _ = await cli(capsys, "limits", "delete", str(made["id"]))
    assert code == 0 and f"deleted limit {made['id']}" in out
    code, _, err = await cli(capsys, "limits", "set", "key", key["id"], "requests", "0")
    assert code != 0 and "limit" in err
    code, _, err = await cli(capsys, "limits", "delete", "999")
    assert code != 0
    audit = await w.sql("SELECT action, actor FROM audit_log WHERE action LIKE 'limit.%' ORDER BY id")
    assert [a for a, _ in audit] == ["limit.set", "limit.set", "limit.set", "limit.delete"]
    assert all(actor.startswith("cli ") for _, actor in audit)


async def test_usage_shows_the_limits_that_apply(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "key", key["id"], "requests", 10)
    await _limit(w, "team", "eng", "concurrent", 5, None)
    await _limit(w, "end_user", "alice/*", "requests", 3)
    await _limit(w, "user", "bob", "requests", 3)  # not alice's
    assert (await w.chat(key["key"])).status == 200
    resp = await w.client.get("/api/v1/usage", headers={"Authorization": f"Bearer {key['key']}"})
    usage = await resp.json()
    limits = {(limit["scope"], limit["kind"]): limit for limit in usage["limits"]}
    assert set(limits) == {("key", "requests"), ("team", "concurrent"), ("end_user", "requests")}
    assert limits[("key", "requests")]["remaining"] == 9
    assert limits[("team", "concurrent")]["in_flight"] == 0
    assert limits[("end_user", "requests")]["default"] is True


async def test_key_objects_show_their_limits(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    await _limit(w, "key", key["id"], "requests", 10)
    keys = await ok(w, "GET", "/admin/v1/keys?user=alice")
    (shown,) = [k for k in keys if k["id"] == key["id"]]
    assert [(lim["kind"], lim["limit"], lim["per"]) for lim in shown["limits"]] == [
        ("requests", 10, "minute")
    ]


async def test_upstream_caps(world: World) -> None:
    w = world
    await w.reconfigure(upstream_max_concurrent=2)
    key = await w.key("alice")
    slow = await asyncio.gather(
        *(
            w.client.post(
                "/api/v1/chat",
                json={"model": "openai/gpt-oss-20b", "messages": SLOW},
                headers={"Authorization": f"Bearer {key['key']}"},
            )
            for _ in range(6)
        )
    )
    assert Counter(r.status for r in slow) == {200: 2, 429: 4}
    for resp in slow:
        if resp.status == 429:
            await error(resp, 429, "upstream_rate_limited")
            assert resp.headers["Retry-After"] == "1"
    assert w.upstream.max_in_flight == 2
    assert w.metrics.upstream_rate_limited.labels("gateway").value == 4
    await w.reconfigure(upstream_rpm=3)
    statuses = [(await w.chat(key["key"])).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = await w.chat(key["key"])
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert await w.sql("SELECT COUNT(*) FROM holds") == [(0,)]


async def test_an_upstream_429_is_relayed_uncharged_and_counted(world: World) -> None:
    w = world
    key = await w.key("alice")
    await w.budget("user", "alice", "1")
    resp = await w.chat(key["key"], messages=1, **{})
    assert resp.status == 200
    resp = await w.client.post(
        "/api/v1/chat",
        json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:429"}]},
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert resp.headers["X-Credits-Charged"] == "0"
    assert w.metrics.upstream_rate_limited.labels("upstream").value == 1
    assert await w.sql("SELECT spent_micros FROM budget_counters") == [(100_000,)]


def test_bad_upstream_caps_stop_start_up_in_one_line() -> None:
    from gateway.ops.settings import ConfigError, Settings

    for name, value in (("GATEWAY_UPSTREAM_RPM", "0"), ("GATEWAY_UPSTREAM_MAX_CONCURRENT", "many")):
        with pytest.raises(ConfigError) as caught:
            Settings.load(environ={name: value})
        assert name in str(caught.value) and "\n" not in str(caught.value)
    loaded = Settings.load(environ={"GATEWAY_UPSTREAM_RPM": "600", "GATEWAY_UPSTREAM_MAX_CONCURRENT": "8"})
    assert (loaded.upstream_rpm, loaded.upstream_max_concurrent) == (600, 8)


async def test_a_limit_set_reaches_a_cached_key_within_the_cache_ttl(world: World) -> None:
    w = world
    key = await w.key("alice")
    assert (await w.chat(key["key"])).status == 200  # cached, not limited
    await w.admin(limiting.set_limit, "key", key["id"], "requests", 1, "minute", now_us())
    deadline = time.monotonic() + w.settings.cache_ttl_seconds + 2
    statuses = []
    while time.monotonic() < deadline:
        statuses.append((await w.chat(key["key"])).status)
        if statuses[-1] == 429:
            break
        await asyncio.sleep(0.2)
    assert statuses[-1] == 429


async def test_budgets_are_unchanged_by_limits(world: World) -> None:
    w = world
    key = await w.key("alice")
    await w.budget("team", "eng", "100")
    await _limit(w, "key", key["id"], "requests", 7)
    statuses, _ = await _burst(w, key["key"], 20)
    assert statuses == {200: 7, 429: 13}
    budgets = await w.admin(budgeting.list_budgets)
    assert budgets[0]["spent"] == pytest.approx(0.7)
    await assert_counters_match_ledger(w)


async def test_the_readmes_worked_example(world: World) -> None:
    w = world
    key = await w.key("alice")
    await _limit(w, "key", key["id"], "requests", 10)
    await _limit(w, "user", "alice", "credits", "5", "hour")
    await _limit(w, "team", "eng", "concurrent", 4, None)
    started = time.monotonic()
    answers = [await w.chat(key["key"]) for _ in range(10)]
    assert [a.status for a in answers] == [200] * 10
    fifth = answers[4].headers
    # The figures of requests sent at once, less the time the requests took (on a loaded machine with
    # PostgreSQL, seconds): 30 s, 6 min, then a wait of 6 s.
    assert fifth["x-ratelimit-remaining-requests"] == "5"
    assert fifth["x-ratelimit-reset-requests"] in {f"{30 - s}s" for s in range(4)}
    assert fifth["x-ratelimit-limit-credits"] == "5"
    assert float(fifth["x-ratelimit-remaining-credits"]) == pytest.approx(4.5, abs=0.01)
    assert fifth["x-ratelimit-reset-credits"] in {"6m0s", *(f"5m{59 - s}s" for s in range(3))}
    refused = await w.chat(key["key"])
    taken = time.monotonic() - started
    e = await error(refused, 429, "rate_limited")
    wait = int(refused.headers["Retry-After"])
    assert 6 - taken - 1 <= wait <= 6 and e["retry_after"] == wait
    assert e["message"] == (
        f"Rate limit of key {key['id']!r} reached: 10 requests per minute. Retry in {wait} s; nothing was "
        "charged."
    )


async def test_a_rotated_key_keeps_its_limits(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    await _limit(w, "key", key["id"], "requests", 2)
    rotated = await ok(w, "POST", f"/admin/v1/keys/{key['id']}/rotate", status=201, json={})
    keys = {k["id"]: k for k in await ok(w, "GET", "/admin/v1/keys?user=alice")}
    assert [(lim["kind"], lim["limit"]) for lim in keys[rotated["id"]]["limits"]] == [("requests", 2)]
    statuses, _ = await _burst(w, rotated["key"], 4)
    assert statuses == {200: 2, 429: 2}
