"""`/readyz` tells the truth (issue 16): 503 while the database refuses writes, with the reason;
200 again by itself once it takes them."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from gateway.web.readiness import why

from .conftest import World, _pg_exec, pg_admin_url


async def _ready(w: World) -> tuple[int, dict[str, Any]]:
    resp = await w.client.get("/readyz")
    return resp.status, await resp.json()


async def test_ready_while_writes_go_through(world: World) -> None:
    assert await _ready(world) == (200, {"status": "ready"})
    # The probe wrote this process's heartbeat.
    assert len(await world.sql("SELECT id FROM instances")) >= 1


async def test_a_write_lock_held_elsewhere_is_not_ready_until_released(world: World) -> None:
    if world.store.dialect != "sqlite":
        pytest.skip("SQLite's write lock")
    path = world.settings.database_url.split(":///", 1)[1]
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        # A writer elsewhere holds the lock; readers still read (WAL), so a read probe would pass.
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
        reader = sqlite3.connect(path)
        assert reader.execute("SELECT COUNT(*) FROM teams").fetchone() == (1,)
        reader.close()
        status, body = await _ready(world)
        assert status == 503
        assert body["status"] == "unavailable"
        assert body["error"]["type"] == "ledger_unavailable"
        assert body["error"]["reason"] == "the database is locked by another connection"
        assert body["error"]["reason"] in body["error"]["message"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await _ready(world))[0] == 200


async def test_a_read_only_database_is_not_ready_though_it_answers(world: World, backend: Any) -> None:
    """PostgreSQL made read-only (as a standby, or an operator, would): reads answer, writes fail."""
    admin = pg_admin_url()
    if world.store.dialect != "postgresql" or admin is None:
        pytest.skip("PostgreSQL's default_transaction_read_only")
    name = backend.url.rsplit("/", 1)[1]
    kick = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    await _pg_exec(admin, [f'ALTER DATABASE "{name}" SET default_transaction_read_only = on', kick])
    try:
        # The pool's connections were cut: the first call meets one of them and reconnects.
        for _ in range(3):
            status, body = await _ready(world)
            if body.get("error", {}).get("reason") == "the database is read-only":
                break
        assert status == 503, body
        assert body["error"]["reason"] == "the database is read-only"
        assert len(await world.sql("SELECT id FROM teams")) == 1
    finally:
        await _pg_exec(admin, [f'ALTER DATABASE "{name}" RESET default_transaction_read_only', kick])
    for _ in range(3):
        status, body = await _ready(world)
        if status == 200:
            break
    assert status == 200, body


def test_reasons_name_the_kind_of_refusal_not_the_drivers_words() -> None:
    assert why("database is locked") == "the database is locked by another connection"
    assert why("attempt to write a readonly database") == "the database is read-only"
    assert why("database or disk is full") == "the database's disk is full"
    assert why("could not connect to server at db.internal:5432") == (
        "the database cannot be reached or refused the write"
    )
