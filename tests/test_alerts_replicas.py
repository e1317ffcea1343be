"""Budget alerts across real gateway processes: exactly once per threshold, and after a crash.

PostgreSQL: two replicas on one database. SQLite: one server of two workers (`--workers 2`).
The webhook receiver is an aiohttp app of the test; signatures are checked by tests/alert_helpers.py's
own implementation of Standard Webhooks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .alert_helpers import SECRET, Receiver, serve, until
from .conftest import Backend
from .procs import free_port, gateways, start_gateway, wait_ready

BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}  # 0.1 credit

pytestmark = pytest.mark.slow


async def _seed(url: str, limit: str, **budget: Any) -> str:
    store = open_store(url)
    try:
        at = now_us()
        await store.run(services.create_team, "eng", at)
        await store.run(services.create_user, "alice", "eng", at)
        key = await store.run(services.create_key, "alice", None, at)
        await store.run(lambda c: budgeting.set_budget(c, "team", "eng", "daily", limit, at, **budget))
        return str(key["key"])
    finally:
        await store.close()


async def _deliveries(url: str) -> list[tuple[str, int]]:
    store = open_store(url)
    try:
        rows = await store.read(
            lambda c: c.execute(text("SELECT state, attempts FROM webhook_deliveries")).all()
        )
        return [(str(r[0]), int(r[1])) for r in rows]
    finally:
        await store.close()


def _env(hook_url: str) -> dict[str, str]:
    return {
        "GATEWAY_WEBHOOK_URL": hook_url,
        "GATEWAY_WEBHOOK_SECRET": SECRET,
        "GATEWAY_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "GATEWAY_WEBHOOK_TIMEOUT_SECONDS": "1",
    }


async def test_replicas_send_each_threshold_once(backend: Backend, fake: Any, tmp_path: Any) -> None:
    _, upstream_url = fake
    receiver = Receiver()
    server = await serve(receiver)
    key = await _seed(backend.url, "20")
    env = {**_env(str(server.make_url("/hook"))), "GATEWAY_ALERT_THRESHOLDS": "50,80,100"}
    # Two replicas on PostgreSQL; one server of two workers on SQLite.
    count, extra = (2, {}) if backend.name == "postgresql" else (1, {"GATEWAY_WORKERS": "2"})
    try:
        with gateways(count, backend.url, upstream_url, tmp_path, **env, **extra) as procs:
            await asyncio.gather(*(wait_ready(p) for p in procs))
            urls = [p.url for p in procs]
            limit = asyncio.Semaphore(50)
            async with aiohttp.ClientSession() as session:

                async def one(i: int) -> int:
                    async with limit:
                        async with session.post(
                            urls[i % len(urls)] + "/api/v1/chat",
                            json=BODY,
                            headers={"Authorization": f"Bearer {key}"},
                        ) as resp:
                            await resp.read()
                            return resp.status

                statuses = Counter(await asyncio.gather(*(one(i) for i in range(300))))
            assert statuses == {200: 200, 402: 100}, statuses
            await until(lambda: len(receiver.received) >= 3, timeout=30, what="three alerts")
            await asyncio.sleep(3)  # more rounds of every process: any duplicate would arrive
            events = receiver.events()
            assert len(receiver.received) == 3, [e["data"]["threshold"] for e in events]
            assert sorted(e["data"]["threshold"] for e in events) == [50, 80, 100]
            assert len({e["id"] for e in events}) == 3
            assert all(e["data"]["subject"] == "eng" and e["data"]["limit"] == 20 for e in events)
            assert await _deliveries(backend.url) == [("delivered", 1)] * 3
    finally:
        await server.close()


async def test_pending_event_survives_sigkill(backend: Backend, fake: Any, tmp_path: Any) -> None:
    _, upstream_url = fake
    port = free_port()  # nobody listens there yet: the receiver is down
    key = await _seed(backend.url, "0.1", alert_at=[100])
    env = _env(f"http://127.0.0.1:{port}/hook")
    gateway = start_gateway(backend.url, upstream_url, tmp_path, **env)
    receiver = Receiver()
    server = None
    try:
        await wait_ready(gateway)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gateway.url + "/api/v1/chat", json=BODY, headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                assert resp.status == 200
        await until(
            lambda: _attempted(backend.url), timeout=20, what="a failed attempt while the receiver is down"
        )
        gateway.kill()
        server = await serve(receiver, port)
        gateway = start_gateway(backend.url, upstream_url, tmp_path, **env)
        await wait_ready(gateway)
        await until(lambda: len(receiver.received) >= 1, timeout=30, what="delivery after restart")
        await asyncio.sleep(2)
        assert len(receiver.received) == 1
        (event,) = receiver.events()
        assert event["data"]["threshold"] == 100
        ((state, attempts),) = await _deliveries(backend.url)
        assert state == "delivered" and attempts >= 2
    finally:
        gateway.stop()
        if server is not None:
            await server.close()


async def _attempted(url: str) -> bool:
    return any(attempts >= 1 for _, attempts in await _deliveries(url))
