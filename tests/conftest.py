"""Shared fixtures: a fresh migrated database per test (SQLite and PostgreSQL), a fake upstream, a gateway."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import uvloop
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import create_engine, text

from gateway.core.holding import WINDOWS
from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.ops.fake_upstream import FakeUpstream
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.store import Store, migrate, open_store
from gateway.web.app import create_app

PG_ENV = "GATEWAY_TEST_POSTGRES_URL"
PG_HINT = (
    f"PostgreSQL tests are off: set {PG_ENV}=postgresql+asyncpg://postgres@127.0.0.1:5432/test "
    "(a server where that user may create databases) to run them"
)


def pg_admin_url() -> str | None:
    """The PostgreSQL server tests may create databases on, if any."""
    return os.environ.get(PG_ENV) or None


_template_ready = False


def _pg_template(admin_url: str) -> str:
    """A migrated template database, made once per session; each test copies it."""
    global _template_ready
    name = f"gw_template_{os.getpid()}"
    if not _template_ready:
        asyncio.run(_pg_exec(admin_url, [f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"']))
        migrate.upgrade(_pg_url(admin_url, name))
        _template_ready = True
    return name


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop this session's template database, so test runs leave nothing behind on the server."""
    admin_url = pg_admin_url()
    if _template_ready and admin_url is not None:
        name = f"gw_template_{os.getpid()}"
        asyncio.run(_pg_exec(admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)']))


def _pg_url(admin_url: str, database: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{database}"


async def _pg_exec(admin_url: str, statements: list[str]) -> None:
    import asyncpg

    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@dataclass
class Backend:
    """A fresh migrated database for one test."""

    name: str
    url: str


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The tests run on the event loop `gateway serve` runs on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _budget_rules_of_this_test() -> Iterator[None]:
    """Each test's process-wide book of budget rules starts and ends with UTC's alone, as a new
    gateway's does: the rules an earlier test's budgets used (a Hypothesis test meets dozens) would
    otherwise go with every admission of the tests after it."""
    WINDOWS.forget()
    yield
    WINDOWS.forget()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    """Every test that uses the database runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        migrate.upgrade(url)
        yield Backend("sqlite", url)
        return
    admin_url = pg_admin_url()
    if admin_url is None:
        pytest.skip(PG_HINT)
    template = _pg_template(admin_url)
    name = f"gw_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_exec(admin_url, [f'CREATE DATABASE "{name}" TEMPLATE "{template}"']))
    try:
        yield Backend("postgresql", _pg_url(admin_url, name))
    finally:
        asyncio.run(_pg_exec(admin_url, [f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)']))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """The store over the test's database."""
    s = open_store(backend.url, pool_size=20)
    yield s
    await s.close()


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeUpstream, str]]:
    """The fake upstream, served on a loopback port: (its state, its chat URL)."""
    upstream = FakeUpstream()
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    yield upstream, str(server.make_url("/api/v1/chat"))
    await server.close()


@dataclass
class World:
    """A running gateway in front of the fake upstream, and ways to look inside."""

    client: TestClient  # type: ignore[type-arg]
    store: Store
    upstream: FakeUpstream
    settings: Settings
    metrics: Metrics
    make_client: Any

    async def reconfigure(self, **overrides: Any) -> None:
        """Replace the gateway with one whose settings differ (same database, same upstream)."""
        self.settings = replace(self.settings, **overrides)
        self.metrics = Metrics()
        self.client = await self.make_client(
            create_app(self.settings, store=self.store, metrics=self.metrics)
        )

    async def admin(self, fn: Any, *args: Any) -> Any:
        """Run a service function on the gateway's database."""
        return await self.store.run(fn, *args)

    async def team(self, name: str) -> None:
        await self.admin(services.create_team, name, now_us())

    async def user(self, name: str, team: str | None = None) -> None:
        await self.admin(services.create_user, name, team, now_us())

    async def key(self, user: str) -> dict[str, Any]:
        return dict(await self.admin(services.create_key, user, None, now_us()))

    async def budget(self, scope: str, subject: str, limit: str, period: str = "daily") -> None:
        await self.admin(budgeting.set_budget, scope, subject, period, limit, now_us())

    async def chat(
        self, key: str | None, messages: int = 1, model: str = "openai/gpt-oss-20b", **extra: Any
    ) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": f"m{i}"} for i in range(messages)]}
        body.update(extra)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await self.client.post("/api/v1/chat", json=body, headers=headers)

    async def sql(self, query: str, **params: Any) -> list[Any]:
        def run(conn: Any) -> list[Any]:
            return list(conn.execute(text(query), params).all())

        return list(await self.store.run(run))


@pytest.fixture
def settings_for(backend: Backend) -> Any:
    """Settings for the test's database and a given upstream URL."""

    def make(upstream_url: str, **overrides: Any) -> Settings:
        # No access log lines in the tests' output; tests/test_access_log.py turns it on.
        base = Settings(database_url=backend.url, upstream_url=upstream_url, access_log="off")
        return replace(base, **overrides)

    return make


@pytest.fixture
async def world(
    store: Store, fake: tuple[FakeUpstream, str], settings_for: Any, aiohttp_client: Any
) -> AsyncIterator[World]:
    """A gateway with team `eng`, users `alice` and `bob` in it, `carol` without a team."""
    upstream, url = fake
    settings = settings_for(url, upstream_api_key=_secret("upstream-secret"))
    metrics = Metrics()
    client = await aiohttp_client(create_app(settings, store=store, metrics=metrics))
    w = World(client, store, upstream, settings, metrics, aiohttp_client)
    await w.team("eng")
    await w.user("alice", "eng")
    await w.user("bob", "eng")
    await w.user("carol")
    yield w


ADMIN_TOKEN = "admin-token-for-tests"


@pytest.fixture
async def admin_world(world: World) -> World:
    """The `world` gateway with the admin HTTP API enabled: its token is ADMIN_TOKEN."""
    await world.reconfigure(admin_token=_secret(ADMIN_TOKEN))
    return world


def _secret(value: str) -> Any:
    from gateway.ops.settings import Secret

    return Secret(value)


def counters_equal_ledger_sql() -> str:
    """Rows where a window counter differs from what the ledger and open holds say."""
    return (
        "SELECT c.budget_id, c.window_start, c.spent_micros, c.held_micros, "
        "COALESCE((SELECT SUM(a.credits_micros) FROM allocations a "
        "  JOIN ledger l ON l.request_id = a.request_id WHERE a.budget_id = c.budget_id "
        "  AND a.window_start = c.window_start AND l.outcome = 'charged'), 0) "
        "+ COALESCE((SELECT SUM(x.credits_micros) FROM allocations a "
        "  JOIN ledger_adjustments x ON x.request_id = a.request_id WHERE a.budget_id = c.budget_id "
        "  AND a.window_start = c.window_start), 0), "
        "COALESCE((SELECT SUM(a.credits_micros) FROM allocations a "
        "  JOIN holds h ON h.request_id = a.request_id WHERE a.budget_id = c.budget_id "
        "  AND a.window_start = c.window_start), 0) "
        "FROM budget_counters c"
    )


async def assert_counters_match_ledger(w: World) -> None:
    """The money invariant: every counter equals the ledger's charges and the open holds."""
    for row in await w.sql(counters_equal_ledger_sql()):
        assert (row[2], row[3]) == (row[4], row[5]), (
            f"counter {row[0]}@{row[1]} differs from the ledger: {row}"
        )


def sync_sqlite(url: str) -> Any:
    """A plain sqlite3-backed engine on a test database file (for inspection outside the loop)."""
    return create_engine(url.replace("+aiosqlite", ""))
