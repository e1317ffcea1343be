"""Limits across processes: `--workers 2` on SQLite, two PostgreSQL replicas, a SIGKILLed process's
requests in flight (and the OpenAI Python SDK's own retries against a limit)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import limiting, services
from gateway.ops.workers import WORKER_HEADER
from gateway.store import open_store

from .conftest import Backend
from .procs import gateways, start_gateway, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}


async def _alice(store: Any) -> dict[str, Any]:
    at = now_us()
    await store.run(services.create_team, "eng", at)
    await store.run(services.create_user, "alice", "eng", at)
    return dict(await store.run(services.create_key, "alice", None, at))


async def _fire(urls: list[str], key: str, n: int, body: dict[str, Any] = BODY) -> list[tuple[int, str]]:
    """`n` chat requests at once, spread over `urls`, each on a connection of its own: (status, worker)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as session:

        async def one(i: int) -> tuple[int, str]:
            async with session.post(
                urls[i % len(urls)] + "/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                await resp.read()
                return resp.status, resp.headers.get(WORKER_HEADER, urls[i % len(urls)])

        return await asyncio.gather(*(one(i) for i in range(n)))


async def _both_workers_serving(url: str) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        seen: set[str] = set()
        while len(seen) < 2:
            assert time.monotonic() < deadline, "the second worker never served"
            async with session.get(url + "/healthz") as resp:
                seen.add(resp.headers[WORKER_HEADER])
            await asyncio.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_fifty_against_ten_a_minute_on_two_workers(backend: Backend, fake: Any, tmp_path: Any) -> None:
    upstream, upstream_url = fake
    store = open_store(backend.url)
    try:
        key = await _alice(store)
        await store.run(limiting.set_limit, "key", key["id"], "requests", 10, "minute", now_us())
        with gateways(1, backend.url, upstream_url, tmp_path, GATEWAY_WORKERS="2") as (server,):
            await wait_ready(server)
            await _both_workers_serving(server.url)
            answers = await _fire([server.url], key["key"], 50)
        assert Counter(status for status, _ in answers) == {200: 10, 429: 40}
        assert len({worker for _, worker in answers}) == 2  # both workers judged some
        assert len(upstream.received) == 10
    finally:
        await store.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_fifty_against_ten_a_minute_on_two_replicas(backend: Backend, fake: Any, tmp_path: Any) -> None:
    upstream, upstream_url = fake
    store = open_store(backend.url)
    try:
        key = await _alice(store)
        await store.run(limiting.set_limit, "team", "eng", "requests", 10, "minute", now_us())
        await store.run(limiting.set_limit, "user", "alice", "concurrent", 40, None, now_us())
        with gateways(2, backend.url, upstream_url, tmp_path) as replicas:
            await asyncio.gather(*(wait_ready(r) for r in replicas))
            answers = await _fire([r.url for r in replicas], key["key"], 50)
            assert Counter(status for status, _ in answers) == {200: 10, 429: 40}
            assert len(upstream.received) == 10
            # And `concurrent` across them: 3 in flight at most, whichever replica takes a request.
            await store.run(limiting.set_limit, "team", "eng", "requests", 1000, "minute", now_us())
            await store.run(limiting.set_limit, "user", "alice", "concurrent", 3, None, now_us())
            await asyncio.sleep(2.5)  # the replicas' key caches (2 s) see the new limits
            upstream.max_in_flight = 0
            slow = {**BODY, "messages": [{"role": "user", "content": "fake:slow:1"}]}
            answers = await _fire([r.url for r in replicas], key["key"], 12, slow)
            assert Counter(status for status, _ in answers) == {200: 3, 429: 9}
            assert upstream.max_in_flight == 3
    finally:
        await store.close()


TTL = 4.0


@pytest.mark.slow
async def test_a_killed_process_stops_counting_against_concurrent_by_the_ttl(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    upstream, upstream_url = fake
    upstream.header_delay = 3.0  # requests stay in flight while their process is killed
    env = {"GATEWAY_UPSTREAM_TIMEOUT_SECONDS": "3.5", "GATEWAY_HOLD_TTL_SECONDS": str(TTL)}
    store = open_store(backend.url)
    try:
        key = await _alice(store)
        await store.run(limiting.set_limit, "key", key["id"], "concurrent", 2, None, now_us())
        doomed = start_gateway(backend.url, upstream_url, tmp_path, **env)
        survivor = None
        try:
            await wait_ready(doomed)
            # Before the holds are placed: expiry releases them a TTL after they were (the kill may
            # come a while after that on a loaded machine).
            fired_at = time.monotonic()
            calls = asyncio.ensure_future(_fire([doomed.url], key["key"], 2))
            deadline = time.monotonic() + 10
            while await _holds(store) < 2:
                assert time.monotonic() < deadline, "the requests never got their holds"
                await asyncio.sleep(0.05)
            doomed.kill()
            killed_at = time.monotonic()
            await asyncio.gather(calls, return_exceptions=True)
            upstream.header_delay = 0
            survivor = start_gateway(backend.url, upstream_url, tmp_path, **env)
            await wait_ready(survivor)
            # The dead process's two holds still count: the limit refuses...
            assert [s for s, _ in await _fire([survivor.url], key["key"], 1)] == [429]
            # ...until expiry releases them, after the TTL; then requests are admitted again.
            while await _holds(store) > 0:
                assert time.monotonic() - killed_at < TTL + 15, "the holds were never released"
                await asyncio.sleep(0.1)
            assert time.monotonic() - fired_at >= TTL * 0.9
            assert sorted(s for s, _ in await _fire([survivor.url], key["key"], 2)) == [200, 200]
        finally:
            doomed.stop()
            if survivor is not None:
                survivor.stop()
    finally:
        await store.close()


async def _holds(store: Any) -> int:
    return int(await store.run(lambda conn: conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_openai_sdk_retries_through_a_limit_of_two_a_second(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    openai = pytest.importorskip("openai")
    _, upstream_url = fake
    store = open_store(backend.url)
    try:
        key = await _alice(store)
        await store.run(limiting.set_limit, "key", key["id"], "requests", 2, "second", now_us())
        with gateways(1, backend.url, upstream_url, tmp_path) as (server,):
            await wait_ready(server)
            client = openai.AsyncOpenAI(api_key=key["key"], base_url=server.url + "/v1", max_retries=3)
            started = time.monotonic()
            for i in range(10):
                answer = await client.chat.completions.create(
                    model="openai/gpt-oss-20b", messages=[{"role": "user", "content": f"call {i}"}]
                )
                assert answer.choices[0].message.content
            elapsed = time.monotonic() - started
            await client.close()
        # 2 at once, then one each half second: 10 take about 4 s, and the SDK waited in between.
        assert elapsed >= 3.0
        charged = await store.run(
            lambda conn: conn.execute(
                text("SELECT COUNT(*) FROM ledger WHERE outcome = 'charged'")
            ).scalar_one()
        )
        assert charged == 10
    finally:
        await store.close()
