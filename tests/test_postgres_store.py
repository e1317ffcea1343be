"""The PostgreSQL store's own machinery: what the metering tests cannot see through the gateway."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import Connection, text

from gateway.store import PostgresStore

from .conftest import Backend

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def _sleep(conn: Connection, seconds: float) -> float:
    conn.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return seconds


async def test_a_burst_past_two_seconds_queues_for_the_pool_instead_of_failing(backend: Backend) -> None:
    """Every connection busy is a burst on a database that answers, not an outage: no 503."""
    store = PostgresStore(backend.url, pool_size=1)
    try:
        started = time.monotonic()
        results = await asyncio.gather(store.run(_sleep, 2.5), store.run(_sleep, 0))
        assert results == [2.5, 0]
        assert time.monotonic() - started >= 2.5
    finally:
        await store.close()
