"""Two PostgreSQL replicas batching the same counter rows at once: an organisation's many keys, one team.

Issue 14: each replica admits the requests of every caller that arrive together in one statement
(`gateway_admit_batch`), so two replicas' statements lock the same team counter, and the users'
own counters, at the same time. They must never deadlock, never lose an update, and admit exactly
what the binding budget allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import Counter
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .conftest import Backend, counters_equal_ledger_sql
from .procs import gateways, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}  # 0.1 credits
USERS = 40
TEAM_REQUESTS = 57  # the team budget, 5.7 credits: binding, well below what the users may take
SMALL_USERS = 5  # users whose own budget (0.1: one request) binds before the team's does
PER_USER = 8  # requests sent per user: 320 in all


def _deadlocks(conn: Any) -> int:
    return int(
        conn.execute(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    )


def _verify(url: str) -> dict[str, Any]:
    """`gateway ledger verify --json`, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "ledger", "verify", "--json"],
        env={**os.environ, "GATEWAY_DATABASE_URL": url, "GATEWAY_LOG_LEVEL": "WARNING"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    return dict(json.loads(done.stdout))


async def _hammer(urls: list[str], keys: list[str], concurrency: int = 64) -> list[tuple[int, int]]:
    """Every key's requests, shuffled, each to a random replica: (key index, status) each."""
    calls = [i for i in range(len(keys)) for _ in range(PER_USER)]
    rng = random.Random(14)
    rng.shuffle(calls)
    connector = aiohttp.TCPConnector(limit=concurrency)
    results: list[tuple[int, int]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(n: int, who: int) -> None:
            body = dict(BODY, stream=n % 4 == 0)
            async with session.post(
                rng.choice(urls) + "/api/v1/chat",
                json=body,
                headers={"Authorization": f"Bearer {keys[who]}"},
            ) as resp:
                await resp.read()
                results.append((who, resp.status))

        await asyncio.gather(*(one(n, who) for n, who in enumerate(calls)))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_two_replicas_batching_one_teams_counters_admit_exactly_the_team_budget(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    upstream, upstream_url = fake
    store = open_store(backend.url)
    try:
        at = now_us()
        await store.run(services.create_team, "org", at)
        keys: list[str] = []
        users: dict[str, int] = {}  # user id (a budget's subject) -> index
        for i in range(USERS):
            user = await store.run(services.create_user, f"u{i:02}", "org", at)
            users[str(user["id"])] = i
            keys.append((await store.run(services.create_key, f"u{i:02}", None, at))["key"])
            limit = "0.1" if i < SMALL_USERS else "0.5"  # 1 request, or 5
            await store.run(budgeting.set_budget, "user", f"u{i:02}", "daily", limit, at)
        await store.run(budgeting.set_budget, "team", "org", "monthly", f"{TEAM_REQUESTS / 10:.1f}", at)
        deadlocks_before = await store.run(_deadlocks)

        with gateways(2, backend.url, upstream_url, tmp_path) as replicas:
            await asyncio.gather(*(wait_ready(r) for r in replicas))
            results = await _hammer([r.url for r in replicas], keys)
            logs = [r.log for r in replicas]
        text_of_logs = "\n".join(log.read_text() for log in logs)

        statuses = Counter(status for _, status in results)
        assert set(statuses) == {200, 402}, statuses  # no 503, no 500
        assert statuses[200] == TEAM_REQUESTS, statuses
        assert len(upstream.received) == TEAM_REQUESTS
        admitted = Counter(who for who, status in results if status == 200)
        assert all(admitted[i] <= (1 if i < SMALL_USERS else 5) for i in range(USERS)), admitted
        assert "deadlock" not in text_of_logs.lower(), text_of_logs
        assert "Traceback" not in text_of_logs, text_of_logs
        # A deadlock PostgreSQL broke would be retried by the store, unseen by callers: count them.
        assert await store.run(_deadlocks) == deadlocks_before

        def books(conn: Any) -> Any:
            return (
                conn.execute(text(counters_equal_ledger_sql())).all(),
                conn.execute(
                    text("SELECT COUNT(*), SUM(credits_micros) FROM ledger WHERE outcome = 'charged'")
                ).one(),
                conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one(),
                conn.execute(
                    text(
                        "SELECT b.scope, b.subject, c.spent_micros, c.held_micros, b.limit_micros "
                        "FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
                    )
                ).all(),
            )

        counters, charged, holds, budgets = await store.run(books)
        assert tuple(charged) == (TEAM_REQUESTS, TEAM_REQUESTS * 100_000)
        assert holds == 0
        for row in counters:
            assert (row[2], row[3]) == (row[4], row[5]), f"counter differs from the ledger: {row}"
        for scope, subject, spent, held, limit in budgets:
            assert held == 0 and spent <= limit, (scope, subject, spent, limit)
            if scope == "user":
                assert spent == admitted[users[subject]] * 100_000, (subject, spent, admitted)
        team = [spent for scope, _, spent, _, limit in budgets if scope == "team"]
        assert team == [TEAM_REQUESTS * 100_000]  # spent == limit: demand exceeded the team budget
    finally:
        await store.close()
    verified = _verify(backend.url)
    assert verified["ok"], verified
