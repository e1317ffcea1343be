"""The PostgreSQL store's own machinery: what the metering tests cannot see through the gateway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError

from gateway.core import expiry
from gateway.core.admission import admit
from gateway.core.metering import Admission, Caller, Charge, Settlement, new_request_id, now_us
from gateway.core.settlement import settle
from gateway.errors import BudgetExceeded
from gateway.ops import budgeting, services
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


async def _alice(url: str, user_budget: str) -> Caller:
    """alice of team eng, with a monthly team budget of 1 credit and a daily one of her own."""
    admin = open_store(url)
    at = now_us()
    await admin.run(services.create_team, "eng", at)
    await admin.run(services.create_user, "alice", "eng", at)
    key = await admin.run(services.create_key, "alice", None, at)
    for scope, subject, period, limit in (
        ("team", "eng", "monthly", "1"),
        ("user", "alice", "daily", user_budget),
    ):
        await admin.run(budgeting.set_budget, scope, subject, period, limit, at)
    await admin.close()
    return Caller(key["id"], 1, "alice", 1, "eng")


def _proxied(backend: Backend) -> tuple[TcpProxy, Callable[[], PostgresStore]]:
    url = make_url(backend.url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))

    def store() -> PostgresStore:
        return PostgresStore(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False), pool_size=2)

    return proxy, store


def _counter_sums(conn: Connection) -> tuple[int, int]:
    row = conn.execute(text("SELECT SUM(spent_micros), SUM(held_micros) FROM budget_counters")).one()
    return int(row[0]), int(row[1])


def _charge(caller: Caller) -> Charge:
    return Charge(new_request_id(), caller, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)


async def test_admission_and_settlement_take_one_round_trip_each(backend: Backend) -> None:
    """One statement each, outside a transaction: no BEGIN, no COMMIT, no statement per budget."""
    caller = await _alice(backend.url, "1")
    proxy, make_store = _proxied(backend)
    await proxy.start()
    store = make_store()
    try:
        for i in range(12):  # 10 fit in the budgets; the first two prepare the statements
            admitting = store.run(admit, _charge(caller), "instance", now_us())
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


async def test_concurrent_calls_of_one_caller_share_a_statement(backend: Backend) -> None:
    """Group commit: 30 admissions at once take a few statements, and admit exactly what fits."""
    caller = await _alice(backend.url, "0.7")  # 7 requests of 0.1 fit alice's own budget
    proxy, make_store = _proxied(backend)
    await proxy.start()
    store = make_store()
    try:
        # Connected, statements prepared: the round trips counted below are statements.
        warm = await store.run(admit, _charge(caller), "instance", now_us())
        await store.run(settle, warm, Settlement("upstream_error", 500), now_us())
        before = proxy.round_trips
        results = await asyncio.gather(
            *(store.run(admit, _charge(caller), "instance", now_us()) for _ in range(30)),
            return_exceptions=True,
        )
        admitted = [r for r in results if isinstance(r, Admission)]
        assert len(admitted) == 7
        assert all(isinstance(r, BudgetExceeded) for r in results if r not in admitted)
        assert min(a.remaining for a in admitted if a.remaining is not None) == 0
        assert proxy.round_trips - before <= 3, "each admission went alone"  # 2: one, then 29
        before = proxy.round_trips
        settled = await asyncio.gather(
            *(store.run(settle, a, Settlement("charged", 200), now_us()) for a in admitted)
        )
        assert settled == [True] * 7
        assert proxy.round_trips - before <= 3, "each settlement went alone"
        counters = await store.run(
            lambda conn: conn.execute(
                text("SELECT SUM(spent_micros), SUM(held_micros) FROM budget_counters")
            ).one()
        )
        assert counters == (1_400_000, 0)  # 0.7 on each of the two budgets
    finally:
        await store.close()
        await proxy.close()


def test_expiring_many_holds_cannot_deadlock_with_admissions(backend: Backend) -> None:
    """A sweep releases its holds' counters in (budget, window) order, as admissions lock them.

    bob's hold (the older) is on the team budget only, alice's on her key budget (the lower id)
    and the team's. Released hold by hold, the sweep would lock the team's counter, then wait for
    alice's, held by a transaction that next wants the team's: a deadlock.
    """
    engine = create_engine(make_url(backend.url).set(drivername="postgresql+psycopg2"))
    at = now_us() - 3_600_000_000
    with engine.begin() as conn:
        services.create_team(conn, "eng", at)
        for name in ("alice", "bob"):
            services.create_user(conn, name, "eng", at)
        alice_key = services.create_key(conn, "alice", None, at)
        bob_key = services.create_key(conn, "bob", None, at)
        budgeting.set_budget(conn, "key", alice_key["id"], "total", "5", at)
        budgeting.set_budget(conn, "team", "eng", "total", "5", at)
        for i, (key, user) in enumerate(((bob_key, 2), (alice_key, 1))):
            caller = Caller(key["id"], user, "x", 1, "eng")
            admit(conn, _charge(caller), "a dead instance", at + i)
    with engine.begin() as conn:
        key_budget, team_budget = conn.execute(text("SELECT id FROM budgets ORDER BY id")).scalars().all()
    other = engine.connect()
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            with engine.begin() as conn:
                assert expiry.expire_holds(conn, now_us(), now_us()) == 2
        except BaseException as exc:  # reported below
            errors.append(exc)

    lock = "UPDATE budget_counters SET held_micros = held_micros WHERE budget_id = :b"
    try:
        with other.begin():
            other.execute(text(lock), {"b": key_budget})
            sweeper = threading.Thread(target=sweep)
            sweeper.start()
            time.sleep(0.5)  # the sweep is waiting for the key budget's counter now
            other.execute(text(lock), {"b": team_budget})
        sweeper.join(timeout=10)
        assert not errors, errors
    finally:
        other.close()
        engine.dispose()


async def test_a_call_the_database_refuses_fails_alone_not_its_group(backend: Backend) -> None:
    """A value the database refuses fails its own call; the rest of its group is run alone."""
    caller = await _alice(backend.url, "1")
    store = PostgresStore(backend.url, pool_size=2)
    try:
        admitted = [await store.run(admit, _charge(caller), "instance", now_us()) for _ in range(4)]
        poison = Settlement("charged", 200, prompt_tokens=2**31)  # past the ledger's integer column
        settled = await asyncio.gather(
            *(
                store.run(settle, a, poison if i == 1 else Settlement("charged", 200), now_us())
                for i, a in enumerate(admitted)
            ),
            return_exceptions=True,
        )
        assert settled[0] is True and settled[2:] == [True, True], settled
        assert isinstance(settled[1], DBAPIError)
        assert await store.run(_counter_sums) == (600_000, 200_000)  # 3 charged, 1 still held
    finally:
        await store.close()


async def test_close_waits_for_grouped_calls_still_queued(backend: Backend) -> None:
    """Closing answers every call already made: those under way and those queued behind them."""
    caller = await _alice(backend.url, "1")
    store = PostgresStore(backend.url, pool_size=2)
    calls = [
        asyncio.ensure_future(store.run(admit, _charge(caller), "instance", now_us())) for _ in range(10)
    ]
    await asyncio.sleep(0)  # the first is under way, the other nine queued behind it
    await store.close()
    assert all(call.done() for call in calls)
    assert all(isinstance(call.result(), Admission) for call in calls)
