"""Replicas: a change made anywhere is seen by a gateway process that did not make it, within 5 seconds."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .conftest import Backend
from .procs import gateways, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}


async def _status(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.post(url + "/api/v1/chat", json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def _seconds_until(session: aiohttp.ClientSession, url: str, key: str, status: int) -> float:
    started = time.monotonic()
    while (got := await _status(session, url, key)) != status:
        assert got == 200, got
        assert time.monotonic() - started < 10, f"still {got} after 10 s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.slow
async def test_revocation_and_lowered_budget_reach_other_replicas(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    _, upstream_url = fake
    store = open_store(backend.url)
    try:
        at = now_us()
        await store.run(services.create_team, "eng", at)
        await store.run(services.create_user, "alice", "eng", at)
        key = await store.run(services.create_key, "alice", None, at)
        other = await store.run(services.create_key, "alice", None, at)
        await store.run(budgeting.set_budget, "team", "eng", "daily", "100", at)
        with gateways(2, backend.url, upstream_url, tmp_path) as replicas:
            await asyncio.gather(*(wait_ready(r) for r in replicas))
            async with aiohttp.ClientSession() as session:
                for replica in replicas:  # both replicas have the key cached now
                    assert await _status(session, replica.url, key["key"]) == 200
                    assert await _status(session, replica.url, other["key"]) == 200

                # Revoked through a third party (the CLI's path: the database directly).
                await store.run(services.revoke_key, key["id"], now_us())
                waits = await asyncio.gather(
                    *(_seconds_until(session, r.url, key["key"], 401) for r in replicas)
                )
                assert max(waits) < 5, waits

                # A budget lowered below what is spent blocks at once on every replica.
                await store.run(budgeting.set_budget, "team", "eng", "daily", "0.1", now_us())
                waits = await asyncio.gather(
                    *(_seconds_until(session, r.url, other["key"], 402) for r in replicas)
                )
                assert max(waits) < 5, waits
    finally:
        await store.close()
