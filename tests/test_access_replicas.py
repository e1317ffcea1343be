"""Expiry and blocking reach every replica: real gateway processes sharing one database."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import aiohttp
import pytest

from gateway.core.metering import now_us
from gateway.ops import access, services
from gateway.store import open_store

from .conftest import Backend
from .procs import gateways, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}


async def _answer(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str | None]:
    async with session.post(url + "/api/v1/chat", json=BODY, headers={"Authorization": f"Bearer {key}"}) as r:
        body = await r.json()
        return r.status, (body.get("error") or {}).get("reason")


async def _seconds_until(
    session: aiohttp.ClientSession, url: str, key: str, want: tuple[int, str | None]
) -> float:
    started = time.monotonic()
    while (got := await _answer(session, url, key)) != want:
        assert got[0] == 200, got
        assert time.monotonic() - started < 10, f"still {got} after 10 s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.slow
async def test_expiry_and_block_on_two_replicas(backend: Backend, fake: Any, tmp_path: Any) -> None:
    _, upstream_url = fake
    store = open_store(backend.url)
    try:
        at = now_us()
        await store.run(services.create_user, "alice", None, at)
        blocked = await store.run(services.create_key, "alice", None, at)
        with gateways(2, backend.url, upstream_url, tmp_path) as replicas:
            await asyncio.gather(*(wait_ready(r) for r in replicas))
            create = functools.partial(services.create_key, expires_at=now_us() + 2_000_000)
            expiring = await store.run(create, "alice", None, now_us())
            ends = time.monotonic() + 2
            async with aiohttp.ClientSession() as session:
                for replica in replicas:  # cached on both now
                    assert await _answer(session, replica.url, expiring["key"]) == (200, None)
                    assert await _answer(session, replica.url, blocked["key"]) == (200, None)
                await asyncio.sleep(max(ends - time.monotonic(), 0) + 0.05)
                for replica in replicas:  # from that instant, whatever the caches hold
                    assert await _answer(session, replica.url, expiring["key"]) == (401, "expired")

                # Blocked through the database (the CLI's path): refused on both within 5 s.
                await store.run(access.block_key, blocked["id"], now_us())
                waits = await asyncio.gather(
                    *(_seconds_until(session, r.url, blocked["key"], (401, "blocked")) for r in replicas)
                )
                assert max(waits) < 5, waits
                await store.run(access.unblock_key, blocked["id"], now_us())
                for replica in replicas:  # a refused key is never cached: at once
                    assert await _answer(session, replica.url, blocked["key"]) == (200, None)
    finally:
        await store.close()
