"""Crashes: holds left by a killed process are released by a live one after the TTL, never twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

from .conftest import Backend, counters_equal_ledger_sql
from .procs import start_gateway, wait_ready

TTL = 4.0
ENV = {"GATEWAY_UPSTREAM_TIMEOUT_SECONDS": "3", "GATEWAY_HOLD_TTL_SECONDS": str(TTL)}
GRACE = 2.0


async def _count(store: Any, query: str) -> int:
    return int(await store.run(lambda conn: conn.execute(text(query)).scalar_one()))


async def _alice_of_eng(store: Any) -> str:
    """Team eng with a daily budget of 100, its user alice, and her key's secret."""
    at = now_us()
    await store.run(services.create_team, "eng", at)
    await store.run(services.create_user, "alice", "eng", at)
    key = (await store.run(services.create_key, "alice", None, at))["key"]
    await store.run(budgeting.set_budget, "team", "eng", "daily", "100", at)
    return str(key)


@pytest.mark.slow
async def test_holds_of_a_killed_process_expire(backend: Backend, fake: Any, tmp_path: Any) -> None:
    upstream, upstream_url = fake
    upstream.header_delay = 2.5  # requests stay in flight long enough to kill the process under them
    store = open_store(backend.url)
    try:
        key = await _alice_of_eng(store)
        await store.run(budgeting.set_budget, "user", "alice", "daily", "100", now_us())

        doomed = start_gateway(backend.url, upstream_url, tmp_path, **ENV)
        survivor = None
        try:
            await wait_ready(doomed)
            session = aiohttp.ClientSession()
            body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}] * 2}
            calls = [
                asyncio.ensure_future(
                    session.post(
                        doomed.url + "/api/v1/chat",
                        json=dict(body, stream=i % 2 == 0),
                        headers={"Authorization": f"Bearer {key}"},
                    )
                )
                for i in range(50)
            ]
            deadline = time.monotonic() + 10
            while await _count(store, "SELECT COUNT(*) FROM holds") < 50:
                assert time.monotonic() < deadline, "requests never got their holds"
                await asyncio.sleep(0.05)
            doomed.kill()
            await asyncio.gather(*calls, return_exceptions=True)
            await session.close()
            held = await store.run(
                lambda c: c.execute(text("SELECT SUM(held_micros) FROM budget_counters")).scalar()
            )
            assert held == 2 * 50 * 200_000  # both budgets still hold every request

            killed_at = time.monotonic()
            survivor = start_gateway(backend.url, upstream_url, tmp_path, **ENV)
            await wait_ready(survivor)
            while await _count(store, "SELECT COUNT(*) FROM holds") > 0:
                assert time.monotonic() - killed_at < TTL + 10, "holds were never released"
                await asyncio.sleep(0.1)
            assert time.monotonic() - killed_at >= TTL * 0.9, "holds were released before the TTL"
        finally:
            doomed.stop()
            if survivor is not None:
                survivor.stop()

        rows = await store.run(
            lambda c: c.execute(
                text("SELECT outcome, COUNT(*), SUM(credits_micros) FROM ledger GROUP BY outcome")
            ).all()
        )
        assert [tuple(r) for r in rows] == [("expired", 50, 0)]
        assert await _count(store, "SELECT COUNT(*) FROM ledger") == 50  # one row each, never two
        for row in await store.run(lambda c: c.execute(text(counters_equal_ledger_sql())).all()):
            assert (row[2], row[3]) == (row[4], row[5]) == (0, 0), row
    finally:
        await store.close()


@pytest.mark.slow
async def test_sigterm_answers_and_charges_requests_in_flight(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    """`gateway serve` (on uvloop) stops cleanly on SIGTERM: requests under way are answered and
    charged, nothing is left held, the process forgets itself and exits with 0."""
    upstream, upstream_url = fake
    upstream.header_delay = 1.0  # the signal arrives while every request waits for upstream
    store = open_store(backend.url)
    try:
        key = await _alice_of_eng(store)
        gateway = start_gateway(backend.url, upstream_url, tmp_path, **ENV)
        try:
            await wait_ready(gateway)
            body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}] * 2}

            async def chat(session: aiohttp.ClientSession, stream: bool) -> tuple[int, bytes]:
                async with session.post(
                    gateway.url + "/api/v1/chat",
                    json=dict(body, stream=stream),
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    return resp.status, await resp.read()

            async with aiohttp.ClientSession() as session:
                calls = [asyncio.ensure_future(chat(session, i % 2 == 0)) for i in range(10)]
                deadline = time.monotonic() + 10
                while await _count(store, "SELECT COUNT(*) FROM holds") < 10:
                    assert time.monotonic() < deadline, "requests never got their holds"
                    await asyncio.sleep(0.05)
                gateway.process.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*calls)
            assert [status for status, _ in answers] == [200] * 10
            assert all(b"[DONE]" in text for status, text in answers[::2])
            assert await asyncio.to_thread(gateway.process.wait, 15) == 0
        finally:
            gateway.stop()
        rows = await store.run(
            lambda c: c.execute(text("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome")).all()
        )
        assert [tuple(r) for r in rows] == [("charged", 10)]
        assert await _count(store, "SELECT COUNT(*) FROM holds") == 0
        assert await _count(store, "SELECT COUNT(*) FROM instances") == 0
    finally:
        await store.close()


def _verify(database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ledger", "verify"], env=env, capture_output=True, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_cuts_streams_past_the_grace_and_settles_them(
    backend: Backend, fake: Any, tmp_path: Any, workers: str
) -> None:
    """SIGTERM with 50 streams in flight that would run for 12 s, and a grace of 2 s: the process
    cuts them when the grace is over, settles every one itself (charged: their 2xx headers went
    out), leaves no hold and no heartbeat row for a sweeper, and exits 0 long before the streams
    would have ended; `gateway ledger verify` is clean. With `--workers 2` the parent passes the
    signal on and waits for both workers to do the same."""
    upstream, upstream_url = fake
    upstream.chunk_delay = 2.0  # six chunks: 12 s a stream
    store = open_store(backend.url)
    try:
        key = await _alice_of_eng(store)
        env = dict(
            ENV,
            GATEWAY_HOLD_TTL_SECONDS="60",
            GATEWAY_SHUTDOWN_GRACE_SECONDS=str(GRACE),
            GATEWAY_WORKERS=workers,
        )
        gateway = start_gateway(backend.url, upstream_url, tmp_path, **env)
        try:
            await wait_ready(gateway)
            body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}] * 2}

            async def chat(session: aiohttp.ClientSession) -> bytes:
                async with session.post(
                    gateway.url + "/api/v1/chat",
                    json=dict(body, stream=True),
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    assert resp.status == 200
                    return await resp.content.read()

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                calls = [asyncio.ensure_future(chat(session)) for _ in range(50)]
                deadline = time.monotonic() + 15
                while await _count(store, "SELECT COUNT(*) FROM holds") < 50:
                    assert time.monotonic() < deadline, "requests never got their holds"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # every stream has its headers and first chunk
                signalled = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(gateway.process.wait, 30)
                stopped = time.monotonic() - signalled
                # Cut, not finished: none of them got to the end of its stream.
                answers = await asyncio.gather(*calls, return_exceptions=True)
            assert code == 0, gateway.log.read_text()
            assert stopped < 12 - 1, f"the process waited {stopped:.1f}s, past its {GRACE}s grace"
            assert not any(isinstance(a, bytes) and b"[DONE]" in a for a in answers)
        finally:
            gateway.stop()
        # Right after exit, before any other process could sweep: the process settled them all.
        assert await _count(store, "SELECT COUNT(*) FROM holds") == 0
        assert await _count(store, "SELECT COUNT(*) FROM instances") == 0
        rows = await store.run(
            lambda c: c.execute(text("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome")).all()
        )
        assert [tuple(r) for r in rows] == [("charged", 50)]
        verify = await asyncio.to_thread(_verify, backend.url)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        await store.close()


async def test_expiry_spares_live_processes_and_runs_once(store: Any) -> None:
    """A hold of a process that still beats is kept past the TTL; two sweepers release a dead one once."""
    from gateway.core import admission, expiry
    from gateway.core.metering import Caller, Charge

    at = now_us()
    await store.run(services.create_team, "eng", at)
    user = await store.run(services.create_user, "alice", "eng", at)
    key = await store.run(services.create_key, "alice", None, at)
    await store.run(budgeting.set_budget, "user", "alice", "total", "10", at)
    caller = Caller(key["id"], user["id"], "alice", None, None)
    old = at - 3_600_000_000
    for request_id, instance in (("live-one", "live"), ("dead-one", "dead")):
        charge = Charge(request_id, caller, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)
        await store.run(admission.admit, charge, instance, old)
    await store.run(expiry.heartbeat, "live", at, 0)
    cutoff = at - 60_000_000
    results = await asyncio.gather(*(store.run(expiry.expire_holds, cutoff, at) for _ in range(4)))
    assert sum(results) == 1
    assert await _count(store, "SELECT COUNT(*) FROM holds") == 1
    assert await _count(store, "SELECT COUNT(*) FROM ledger WHERE outcome = 'expired'") == 1
    budget = (await store.run(budgeting.list_budgets, "user", "alice"))[0]
    assert budget["held"] == 0.1 and budget["spent"] == 0


async def test_a_replica_whose_clock_runs_ahead_spares_live_holds(backend: Backend, store: Any) -> None:
    """Issue 15 item 9: a sweeping replica whose clock is an hour ahead (far more than the TTL)
    does not take a live process for a dead one on PostgreSQL, where heartbeats are written and
    judged by the database's clock; a process that really stopped beating is still released."""
    if backend.name != "postgresql":
        pytest.skip("SQLite's processes share one machine, so one clock")
    from gateway.core import admission, expiry
    from gateway.core.metering import Caller, Charge
    from gateway.ops.metrics import Metrics

    at = now_us()
    await store.run(services.create_team, "eng", at)
    user = await store.run(services.create_user, "alice", "eng", at)
    key = await store.run(services.create_key, "alice", None, at)
    await store.run(budgeting.set_budget, "user", "alice", "total", "10", at)
    caller = Caller(key["id"], user["id"], "alice", None, None)
    ttl = 4.0
    for instance in ("live", "dead"):
        await expiry.beat_and_sweep(store, Metrics(), instance, ttl)
        charge = Charge(f"{instance}-one", caller, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)
        await store.run(admission.admit, charge, instance, now_us())
    # "dead" stopped beating an hour ago by the database's clock; "live" just beat.
    await store.run(
        lambda c: c.execute(
            text("UPDATE instances SET heartbeat_at = heartbeat_at - 3600000000 WHERE id = 'dead'")
        )
    )

    def ahead() -> int:
        return now_us() + 3_600_000_000

    released = await expiry.beat_and_sweep(store, Metrics(), "skewed", ttl, clock=ahead)
    assert released == 1
    assert await _count(store, "SELECT COUNT(*) FROM holds WHERE request_id = 'live-one'") == 1
    assert await _count(store, "SELECT COUNT(*) FROM ledger WHERE request_id = 'dead-one'") == 1
