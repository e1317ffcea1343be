"""The PostgreSQL store's own machinery: what the metering tests cannot see through the gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from sqlalchemy import Connection, make_url, text

from gateway import services
from gateway.errors import BudgetExceeded
from gateway.metering import Caller, Charge, Settlement, admit, new_request_id, now_us, settle
from gateway.store import PostgresStore, open_store

from .conftest import Backend
from .tcp_proxy import TcpProxy

T = TypeVar("T")

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


async def _round_trips(proxy: TcpProxy, work: Awaitable[T]) -> tuple[T, int]:
    before = proxy.round_trips
    result = await work
    return result, proxy.round_trips - before


async def test_admission_and_settlement_take_one_round_trip_each(backend: Backend) -> None:
    """One statement each, outside a transaction: no BEGIN, no COMMIT, no statement per budget."""
    admin = open_store(backend.url)
    at = now_us()
    await admin.run(services.create_team, "eng", at)
    await admin.run(services.create_user, "alice", "eng", at)
    key = await admin.run(services.create_key, "alice", None, at)
    for scope, subject, period in (("team", "eng", "monthly"), ("user", "alice", "daily")):
        await admin.run(services.set_budget, scope, subject, period, "1", at)
    await admin.close()
    url = make_url(backend.url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    await proxy.start()
    store = PostgresStore(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False), pool_size=1)
    caller = Caller(key["id"], 1, "alice", 1, "eng")
    try:
        for i in range(12):  # 10 fit in the budgets; the first two prepare the statements
            charge = Charge(new_request_id(), caller, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)
            admitting = store.run(admit, charge, "instance", now_us())
            if i >= 10:
                with pytest.raises(BudgetExceeded):
                    await admitting
                continue
            admission, trips = await _round_trips(proxy, admitting)
            assert len(admission.allocations) == 2
            done, settling = await _round_trips(
                proxy, store.run(settle, admission, Settlement("charged", 200), now_us())
            )
            assert done
            if i >= 2:
                assert (trips, settling) == (1, 1)
    finally:
        await store.close()
        await proxy.close()
