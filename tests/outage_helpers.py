"""Helpers for tests of database outages: a gateway whose database can be cut and restored.

PostgreSQL is reached through a small TCP proxy that the test can cut (every proxied socket
closed, new ones refused) and restore. SQLite is made unusable the way it really happens: another
connection holds the write lock (`BEGIN EXCLUSIVE`), so every transaction of the gateway waits out
its busy timeout and fails.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from gateway.ops.fake_upstream import FakeUpstream
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Secret, Settings
from gateway.store import open_store, sqlite_path
from gateway.web.app import create_app

from .conftest import Backend, World
from .tcp_proxy import TcpProxy

OSS20 = "openai/gpt-oss-20b"


class Outage(Protocol):
    """A way to take the database away from the gateway, and give it back."""

    async def cut(self) -> None: ...

    async def restore(self) -> None: ...


class SqliteLock:
    """Another connection holding SQLite's write lock: the gateway's transactions cannot begin."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    async def cut(self) -> None:
        def lock() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.execute("BEGIN EXCLUSIVE")
            return conn

        self.conn = await asyncio.to_thread(lock)

    async def restore(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.to_thread(_rollback_and_close, conn)


def _rollback_and_close(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")
    conn.close()


@dataclass
class Setup:
    world: World
    outage: Outage
    key: str


@asynccontextmanager
async def outage_gateway(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any, **settings: Any
) -> AsyncIterator[Setup]:
    """A gateway whose database can be cut, with alice's key (a daily budget of 1000 credits).

    `settings` are passed on to `Settings` (the hold TTL, the shutdown grace).
    """
    upstream, upstream_url = fake
    proxy: TcpProxy | None = None
    url = backend.url
    outage: Outage
    if backend.name == "postgresql":
        real = make_url(backend.url)
        proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
        await proxy.start()
        # Uncached statements, so the proxy sees each one's SQL (its trap looks for it).
        proxied = real.set(host="127.0.0.1", port=proxy.port, query={"prepared_statement_cache_size": "0"})
        url = proxied.render_as_string(hide_password=False)
        outage = proxy
    else:
        outage = SqliteLock(sqlite_path(url))
    store = open_store(url, pool_size=10)
    config = Settings(
        database_url=url,
        upstream_url=upstream_url,
        upstream_api_key=Secret("upstream-secret"),
        upstream_timeout_seconds=2,
        **settings,
    )
    metrics = Metrics()
    client = await aiohttp_client(create_app(config, store=store, metrics=metrics))
    world = World(client, store, upstream, config, metrics, aiohttp_client)
    try:
        await world.team("eng")
        await world.user("alice", "eng")
        await world.budget("user", "alice", "1000")
        key = (await world.key("alice"))["key"]
        yield Setup(world, outage, key)
    finally:
        await outage.restore()
        await client.close()
        await store.close()
        if proxy is not None:
            await proxy.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait until `check()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


@dataclass
class Call:
    tag: str
    started: float
    ended: float
    status: int
    error_type: str | None
    request_id: str | None


async def chat(w: World, key: str, tag: str, **extra: Any) -> Call:
    """One chat request whose message is `tag`: its status, error type, request id and timing."""
    body = {"model": OSS20, "messages": [{"role": "user", "content": tag}], **extra}
    started = time.monotonic()
    resp = await w.client.post("/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key}"})
    payload = await resp.read()
    error_type = None
    if resp.status >= 400 and resp.content_type == "application/json":
        error_type = (await resp.json()).get("error", {}).get("type")
    assert payload is not None
    return Call(tag, started, time.monotonic(), resp.status, error_type, resp.headers.get("X-Request-Id"))


async def answered_during_an_outage(setup: Setup, stream: bool = False) -> Call:
    """A request admitted, then answered by upstream (1 s later) while the database is down."""
    w = setup.world
    w.upstream.header_delay = 1.0
    call = asyncio.ensure_future(chat(w, setup.key, "during", stream=stream))

    async def held() -> bool:
        return bool(await w.sql("SELECT 1 FROM holds"))

    await eventually(held, 5, "the request to be admitted")
    await setup.outage.cut()
    return await asyncio.wait_for(call, 10)
