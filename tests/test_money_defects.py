"""Issue 15's money-path defects, each reproduced first: free requests, revoked keys, re-set budgets."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

from gateway.core import admission, expiry, metering
from gateway.core.metering import now_us
from gateway.core.pricing import PriceTable
from gateway.ops import budgeting, ledger, services

from .conftest import World, assert_counters_match_ledger

FREE = "local/free-model"


async def test_a_request_that_costs_nothing_is_admitted_past_a_lowered_limit(world: World) -> None:
    """Contract §5: a request that costs 0 is always admitted, even past a limit (on both backends)."""
    await world.reconfigure(pricing=PriceTable.from_config({FREE: "0"}))
    alice = await world.key("alice")
    await world.budget("user", "alice", "0.2")
    for _ in range(2):
        assert (await world.chat(alice["key"])).status == 200
    await world.budget("user", "alice", "0.1")  # lowered below what is spent
    assert (await world.chat(alice["key"])).status == 402
    for _ in range(3):
        resp = await world.chat(alice["key"], messages=2, model=FREE)
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Credits-Charged"] == "0"
        assert resp.headers["X-Credits-Remaining"] == "0"
    rows = await world.sql("SELECT model, credits_micros, outcome FROM ledger WHERE model = :m", m=FREE)
    assert rows == [(FREE, 0, "charged")] * 3
    await assert_counters_match_ledger(world)
    assert (await world.admin(ledger.verify))["ok"]


async def test_a_free_request_among_refused_ones_in_one_batch(world: World) -> None:
    """Concurrently, past the limit: every free request admitted, every paid one refused."""
    await world.reconfigure(pricing=PriceTable.from_config({FREE: "0"}))
    alice = await world.key("alice")
    await world.budget("team", "eng", "0.1")
    assert (await world.chat(alice["key"])).status == 200
    await world.budget("team", "eng", "0.05")

    async def one(i: int) -> int:
        resp = await world.chat(alice["key"], model=FREE if i % 2 else "openai/gpt-oss-20b")
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert [s for i, s in enumerate(statuses) if i % 2] == [200] * 20
    assert [s for i, s in enumerate(statuses) if not i % 2] == [402] * 20
    await assert_counters_match_ledger(world)


async def test_a_key_revoked_while_its_body_arrives_is_refused_at_admission(world: World) -> None:
    """The key is checked before the body is read and cached; admission looks at it again."""
    alice = await world.key("alice")
    assert (await world.chat(alice["key"])).status == 200  # the key is now in the cache
    await world.admin(services.revoke_key, alice["id"], now_us())
    resp = await world.chat(alice["key"])
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert (error["type"], error["reason"]) == ("unauthorized", "revoked")
    assert len(world.upstream.received) == 1
    assert await world.sql("SELECT COUNT(*) FROM ledger") == [(1,)]
    assert await world.sql("SELECT COUNT(*) FROM holds") == [(0,)]
    assert world.metrics.requests.labels("openai/gpt-oss-20b", "unauthorized").value == 1


async def test_a_revoked_key_in_a_batch_of_admissions_refuses_only_its_own(world: World) -> None:
    alice, bob = await world.key("alice"), await world.key("bob")
    at = now_us()
    caller = await world.admin(_caller_of, alice["id"])
    other = await world.admin(_caller_of, bob["id"])
    await world.admin(services.revoke_key, alice["id"], at)
    charges = [
        metering.Charge(metering.new_request_id(), c, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)
        for c in (other, caller, other)
    ]
    results = await world.admin(admission.admit_many, [(c, "i", at + 1) for c in charges])
    assert [ok for ok, _ in results] == [True, False, True]
    assert results[1][1].details["reason"] == "revoked"
    assert await world.sql("SELECT COUNT(*) FROM holds") == [(2,)]


def _caller_of(conn: Any, key_id: str) -> metering.Caller:
    row = conn.execute(
        text(
            "SELECT k.id, u.id, u.name, t.id, t.name FROM api_keys k JOIN users u ON u.id = k.user_id "
            "LEFT JOIN teams t ON t.id = u.team_id WHERE k.id = :id"
        ),
        {"id": key_id},
    ).one()
    return metering.Caller(*row)


async def test_deleting_a_budget_and_setting_it_again_gives_no_fresh_allowance(world: World) -> None:
    """A budget limits a subject's spend in a window, whatever happens to the limit row meanwhile."""
    alice = await world.key("alice")
    await world.budget("user", "alice", "0.2")
    assert [(await world.chat(alice["key"])).status for _ in range(3)] == [200, 200, 402]
    await world.admin(budgeting.delete_budget, "user", "alice", "daily")
    assert (await world.chat(alice["key"])).status == 200  # no limit while deleted, but counted
    assert await world.admin(budgeting.list_budgets, "user", "alice") == []
    await world.budget("user", "alice", "0.2")
    budget = (await world.admin(budgeting.list_budgets, "user", "alice"))[0]
    assert (budget["spent"], budget["remaining"]) == (0.3, 0)
    assert (await world.chat(alice["key"])).status == 402
    await world.budget("user", "alice", "0.4")
    assert [(await world.chat(alice["key"])).status for _ in range(2)] == [200, 402]
    charged = await world.sql("SELECT SUM(credits_micros) FROM ledger WHERE user_id = 1")
    assert charged == [(400_000,)]
    result = await world.admin(ledger.verify)
    assert result["ok"], result


async def test_a_request_in_flight_across_a_budget_delete_is_counted(world: World) -> None:
    """Held before the delete, settled after it, counted in the window when the budget is set again."""
    alice = await world.key("alice")
    await world.budget("user", "alice", "0.1")
    world.upstream.header_delay = 0.5
    request = asyncio.ensure_future(world.chat(alice["key"]))
    for _ in range(100):
        if await world.sql("SELECT COUNT(*) FROM holds") == [(1,)]:
            break
        await asyncio.sleep(0.01)
    await world.admin(budgeting.delete_budget, "user", "alice", "daily")
    assert (await request).status == 200
    world.upstream.header_delay = 0
    await world.budget("user", "alice", "0.1")
    assert (await world.chat(alice["key"])).status == 402
    assert (await world.admin(ledger.verify))["ok"]


async def test_a_soft_deleted_budget_is_still_verified(world: World) -> None:
    """`ledger verify` covers the counters of deleted budgets: a tampered one is a difference."""
    alice = await world.key("alice")
    await world.budget("user", "alice", "1")
    assert (await world.chat(alice["key"])).status == 200
    await world.admin(budgeting.delete_budget, "user", "alice", "daily")
    await world.admin(lambda conn: conn.execute(text("UPDATE budget_counters SET spent_micros = 0")))
    result = await world.admin(ledger.verify)
    assert not result["ok"]
    assert [d["scope"] for d in result["differences"]] == ["user"]


async def _expire_when_held(world: World) -> None:
    """Once the request is held, a sweep (as another replica's, after a stall) releases its hold."""
    for _ in range(200):
        if await world.sql("SELECT COUNT(*) FROM holds") == [(1,)]:
            break
        await asyncio.sleep(0.01)
    future = now_us() + 10**12  # every process looks dead from there
    assert await world.admin(expiry.expire_holds, future, now_us()) == 1


async def test_a_late_settlement_after_expiry_says_not_charged(world: World) -> None:
    """Issue 15, defect 4: header, ledger and metrics agree that an expired hold was not charged."""
    alice = await world.key("alice")
    await world.budget("user", "alice", "1")
    world.upstream.header_delay = 0.3
    request = asyncio.ensure_future(world.chat(alice["key"]))
    await _expire_when_held(world)
    resp = await request
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "0"
    assert resp.headers["X-Credits-Remaining"] == "1"
    assert await world.sql("SELECT outcome, credits_micros FROM ledger") == [("expired", 0)]
    assert world.metrics.requests.labels("openai/gpt-oss-20b", "expired").value == 1
    assert world.metrics.requests.labels("openai/gpt-oss-20b", "charged").value == 0
    assert (await world.admin(ledger.verify))["ok"]


async def test_a_stream_whose_hold_expired_ends_saying_so(world: World) -> None:
    alice = await world.key("alice")
    world.upstream.chunk_delay = 0.1
    request = asyncio.ensure_future(world.chat(alice["key"], stream=True))
    await _expire_when_held(world)
    resp = await request
    text_ = await resp.text()
    assert resp.status == 200
    assert text_.rstrip().endswith("(this request's hold expired before it settled, so it was not charged)")
    assert await world.sql("SELECT outcome, credits_micros FROM ledger") == [("expired", 0)]
    assert world.metrics.requests.labels("openai/gpt-oss-20b", "expired").value == 1
