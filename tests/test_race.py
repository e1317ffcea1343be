"""Races: many concurrent requests against a small budget admit exactly what the limit allows."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .conftest import Backend, World, assert_counters_match_ledger, counters_equal_ledger_sql
from .procs import gateways, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}  # 0.1 credits


@pytest.mark.parametrize("scope", ["key", "user", "team"])
async def test_concurrent_requests_admit_exactly_the_budget(world: World, scope: str) -> None:
    alice = await world.key("alice")
    bob = await world.key("bob")
    subject = {"key": alice["id"], "user": "alice", "team": "eng"}[scope]
    await world.budget(scope, subject, "1.7")  # exactly 17 requests of 0.1
    keys = [alice["key"]] if scope != "team" else [alice["key"], bob["key"]]
    world.upstream.chunk_delay = 0.001

    async def one(i: int) -> int:
        body = dict(BODY, stream=i % 3 == 0)
        resp = await world.client.post(
            "/api/v1/chat", json=body, headers={"Authorization": f"Bearer {keys[i % len(keys)]}"}
        )
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(240)))
    assert Counter(statuses) == {200: 17, 402: 240 - 17}
    assert len(world.upstream.received) == 17
    charged = await world.sql("SELECT COUNT(*), SUM(credits_micros) FROM ledger WHERE outcome = 'charged'")
    assert charged == [(17, 1_700_000)]
    await assert_counters_match_ledger(world)
    budget = (await world.admin(budgeting.list_budgets, scope, subject))[0]
    assert (budget["spent"], budget["held"], budget["remaining"]) == (1.7, 0, 0)


async def test_overlapping_budgets_under_race(world: World) -> None:
    """Key, user and team budgets at once: the tightest one binds, per caller."""
    alice, bob = await world.key("alice"), await world.key("bob")
    await world.budget("team", "eng", "3")  # 30 requests for the team
    await world.budget("user", "alice", "2")  # alice alone may take 20
    await world.budget("key", bob["id"], "0.5")  # bob's key: 5

    async def one(key: str) -> tuple[str, int]:
        resp = await world.client.post("/api/v1/chat", json=BODY, headers={"Authorization": f"Bearer {key}"})
        await resp.read()
        return key, resp.status

    calls = [alice["key"]] * 150 + [bob["key"]] * 150
    random.Random(7).shuffle(calls)
    results = await asyncio.gather(*(one(k) for k in calls))
    ok_alice = sum(1 for k, s in results if s == 200 and k == alice["key"])
    ok_bob = sum(1 for k, s in results if s == 200 and k == bob["key"])
    assert (ok_alice, ok_bob) == (20, 5)
    assert len(world.upstream.received) == 25
    await assert_counters_match_ledger(world)


async def _drive(urls: list[str], keys: list[str], total: int, concurrency: int = 64) -> list[int]:
    """`total` requests spread over several gateways and keys, `concurrency` at a time."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> None:
            body = dict(BODY, stream=i % 4 == 0)
            async with session.post(
                urls[i % len(urls)] + "/api/v1/chat",
                json=body,
                headers={"Authorization": f"Bearer {keys[(i // len(urls)) % len(keys)]}"},
            ) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(one(i) for i in range(total)))
    return statuses


@pytest.mark.slow
async def test_race_across_processes(backend: Backend, fake: Any, tmp_path: Any) -> None:
    """Several gateway processes on one database (2 on SQLite, 4 on PostgreSQL), overlapping budgets."""
    upstream, upstream_url = fake
    processes, total = (2, 600) if backend.name == "sqlite" else (4, 1200)
    store = open_store(backend.url)
    try:
        at = now_us()
        await store.run(services.create_team, "eng", at)
        await store.run(services.create_user, "alice", "eng", at)
        await store.run(services.create_user, "bob", "eng", at)
        keys = [
            (await store.run(services.create_key, "alice", None, at))["key"],
            (await store.run(services.create_key, "alice", None, at))["key"],
            (await store.run(services.create_key, "bob", None, at))["key"],
        ]
        await store.run(budgeting.set_budget, "team", "eng", "daily", "4.5", at)  # binding: 45 requests
        await store.run(budgeting.set_budget, "user", "alice", "daily", "4", at)
        await store.run(budgeting.set_budget, "user", "bob", "daily", "3", at)
        with gateways(processes, backend.url, upstream_url, tmp_path) as started:
            await asyncio.gather(*(wait_ready(g) for g in started))
            statuses = await _drive([g.url for g in started], keys, total)
        assert sorted(set(statuses)) == [200, 402], statuses
        assert statuses.count(200) == 45
        assert len(upstream.received) == 45

        def check(conn: Any) -> Any:
            from sqlalchemy import text

            return (
                conn.execute(text(counters_equal_ledger_sql())).all(),
                conn.execute(
                    text("SELECT COUNT(*), SUM(credits_micros) FROM ledger WHERE outcome='charged'")
                ).one(),
                conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one(),
            )

        counters, charged, holds = await store.run(check)
        assert tuple(charged) == (45, 4_500_000)
        assert holds == 0
        for row in counters:
            assert (row[2], row[3]) == (row[4], row[5]), row
    finally:
        await store.close()
