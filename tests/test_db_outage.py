"""Database outages: fail closed fast, forward nothing, recover alone, leak no hold.

How the database is taken away (a TCP proxy cut on PostgreSQL, SQLite's write lock held by another
connection): tests/outage_helpers.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.ops.fake_upstream import FakeUpstream

from .conftest import Backend, World, assert_counters_match_ledger
from .outage_helpers import OSS20, Call, Setup, answered_during_an_outage, chat, eventually, outage_gateway
from .tcp_proxy import TcpProxy

ANSWER_WITHIN = 2.0  # seconds: a chat request or /readyz during an outage
RECOVER_WITHIN = 5.0  # seconds after the database is back
TTL = 3.0  # the gateway's hold TTL: short, so that lost holds are released within the test


@pytest.fixture
async def setup(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any
) -> AsyncIterator[Setup]:
    """A gateway whose database can be cut: alice's key, with a daily budget of 1000 credits."""
    async with outage_gateway(backend, fake, aiohttp_client, hold_ttl_seconds=TTL) as s:
        yield s


def _tags_upstream_saw(upstream: FakeUpstream) -> set[str]:
    return {m["content"] for r in upstream.received for m in r.body["messages"]}


async def _readyz(w: World) -> tuple[int, float]:
    started = time.monotonic()
    resp = await w.client.get("/readyz")
    await resp.read()
    return resp.status, time.monotonic() - started


async def test_outage_under_load(setup: Setup) -> None:
    w, key = setup.world, setup.key
    calls: list[Call] = []
    stop = asyncio.Event()

    async def worker(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            calls.append(await chat(w, key, f"w{n}-{i}", stream=i % 3 == 0))
            await asyncio.sleep(0.01)

    workers = [asyncio.ensure_future(worker(n)) for n in range(8)]
    try:
        await asyncio.sleep(0.5)
        assert any(c.status == 200 for c in calls), calls

        await setup.outage.cut()
        cut_at = time.monotonic()
        await asyncio.sleep(0.3)  # requests admitted before the cut reach upstream by now
        seen_at_cut = len(w.upstream.received)
        ready = [await _readyz(w) for _ in range(2)]
        await asyncio.sleep(max(0.0, cut_at + 3.5 - time.monotonic()))
        seen_before_restore = len(w.upstream.received)
        restore_started = time.monotonic()
        await setup.outage.restore()
        restored_at = time.monotonic()

        async def recovered() -> bool:
            return any(c.status == 200 and c.started >= restored_at for c in calls)

        await eventually(recovered, RECOVER_WITHIN, "a request after the restore succeeds")
        assert (await _readyz(w))[0] == 200
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert all(status == 503 and took < ANSWER_WITHIN + 0.1 for status, took in ready), ready
    assert seen_before_restore == seen_at_cut, "requests reached upstream while the database was down"
    during = [c for c in calls if c.started >= cut_at and c.ended < restore_started]
    assert len(during) >= 8, during
    assert all(c.status == 503 and c.error_type == "ledger_unavailable" for c in during), during
    slow = [c for c in calls if c.started >= cut_at and c.ended - c.started > ANSWER_WITHIN]
    assert not slow, slow
    refused = {c.tag for c in calls if c.status == 503}
    assert not refused & _tags_upstream_saw(w.upstream), "a refused request was forwarded"
    assert {c.status for c in calls} <= {200, 503}, {c.status for c in calls}

    # Every request that got 200 is charged exactly once, and nothing stays held.
    await eventually(lambda: _no_holds(w), RECOVER_WITHIN, "no hold left")
    charged = {c.request_id for c in calls if c.status == 200}
    rows = await w.sql("SELECT request_id, outcome FROM ledger")
    assert {r[0] for r in rows if r[1] == "charged"} == charged
    assert len(rows) == len({r[0] for r in rows})
    await assert_counters_match_ledger(w)


async def _no_holds(w: World) -> bool:
    return await w.sql("SELECT * FROM holds") == []


@pytest.mark.parametrize("stream", [False, True])
async def test_settlement_during_an_outage_is_written_when_the_database_is_back(
    setup: Setup, stream: bool
) -> None:
    """Admitted before the outage, answered by upstream during it: the hold becomes a charge later."""
    w = setup.world
    result = await answered_during_an_outage(setup, stream)
    assert result.status == 200  # upstream answered 2xx; the charge waits for the database
    await asyncio.sleep(1.0)
    await setup.outage.restore()
    restored_at = time.monotonic()
    await eventually(lambda: _no_holds(w), RECOVER_WITHIN + 1, "the settlement to be written")
    assert time.monotonic() - restored_at < RECOVER_WITHIN + 1
    rows = await w.sql("SELECT request_id, outcome, credits_micros, upstream_status FROM ledger")
    assert [tuple(r) for r in rows] == [(result.request_id, "charged", 100_000, 200)]
    await assert_counters_match_ledger(w)
    requests = w.metrics.registry.get_sample_value(
        "gateway_requests_total", {"model": OSS20, "outcome": "charged"}
    )
    assert requests == 1


async def test_nothing_is_forwarded_while_the_database_is_down(setup: Setup) -> None:
    """With a key already cached, the gateway still refuses: admission needs the database."""
    w, key = setup.world, setup.key
    assert (await chat(w, key, "warm")).status == 200  # the key is cached now
    await setup.outage.cut()
    try:
        results = await asyncio.gather(*(chat(w, key, f"down-{i}") for i in range(20)))
    finally:
        await setup.outage.restore()
    assert {(c.status, c.error_type) for c in results} == {(503, "ledger_unavailable")}
    assert max(c.ended - c.started for c in results) < ANSWER_WITHIN
    assert _tags_upstream_saw(w.upstream) == {"warm"}
    refused = w.metrics.registry.get_sample_value(
        "gateway_requests_total", {"model": OSS20, "outcome": "ledger_unavailable"}
    )
    assert refused == 20


async def test_admission_whose_commit_answer_is_lost_is_released_after_the_ttl(
    setup: Setup, backend: Backend
) -> None:
    """The connection breaks after the database committed a hold, before the gateway heard.

    The caller gets 503 and nothing is forwarded, yet the hold exists; nobody will settle it, so
    the gateway's hold expiry releases it (outcome `expired`) once it is older than the TTL.
    """
    if backend.name != "postgresql":
        pytest.skip("SQLite runs in the gateway's process: no answer to a commit gets lost")
    w, key = setup.world, setup.key
    assert isinstance(setup.outage, TcpProxy)
    warm = await chat(w, key, "warm")
    assert warm.status == 200
    setup.outage.trap = b"gateway_admit_batch("  # admission: one statement, committed by itself
    lost = await chat(w, key, "lost")
    assert (lost.status, lost.error_type) == (503, "ledger_unavailable")
    assert setup.outage.trap is None, "the trap never sprang"
    assert _tags_upstream_saw(w.upstream) == {"warm"}
    assert len(await w.sql("SELECT * FROM holds")) == 1  # written all the same
    await eventually(lambda: _no_holds(w), TTL + 3, "the lost hold to be released")
    rows = await w.sql("SELECT outcome, credits_micros FROM ledger ORDER BY outcome")
    assert [tuple(r) for r in rows] == [("charged", 100_000), ("expired", 0)]
    await assert_counters_match_ledger(w)
    assert w.metrics.registry.get_sample_value("gateway_holds_expired_total") == 1


async def test_settlement_whose_commit_answer_is_lost_is_counted_once(setup: Setup, backend: Backend) -> None:
    """The settlement commits, but its answer is lost with the connection.

    The retry finds the hold gone and the ledger row its own: the request is counted once, as
    charged, in the metrics too (not taken for a hold that expired).
    """
    if backend.name != "postgresql":
        pytest.skip("SQLite runs in the gateway's process: no answer to a commit gets lost")
    w, key = setup.world, setup.key
    assert isinstance(setup.outage, TcpProxy)
    assert (await chat(w, key, "warm")).status == 200
    setup.outage.trap = b"gateway_settle_batch("
    lost = await chat(w, key, "lost")
    assert lost.status == 200
    assert setup.outage.trap is None, "the trap never sprang"

    async def counted() -> bool:
        labels = {"model": OSS20, "outcome": "charged"}
        return w.metrics.registry.get_sample_value("gateway_requests_total", labels) == 2

    await eventually(counted, RECOVER_WITHIN, "the lost settlement to be counted")
    rows = await w.sql("SELECT outcome, credits_micros FROM ledger")
    assert [tuple(r) for r in rows] == [("charged", 100_000)] * 2
    await assert_counters_match_ledger(w)


async def test_a_stream_longer_than_the_ttl_keeps_its_hold(setup: Setup) -> None:
    """The sweep of this process's own old holds spares the requests it is still serving."""
    w, key = setup.world, setup.key
    w.upstream.chunk_delay = TTL / 4  # six chunks: the stream outlives the TTL by half
    started = time.monotonic()
    call = await chat(w, key, "long", stream=True)
    assert call.status == 200 and time.monotonic() - started > TTL * 1.3
    rows = await w.sql("SELECT outcome, credits_micros FROM ledger")
    assert [tuple(r) for r in rows] == [("charged", 100_000)]
    assert w.metrics.registry.get_sample_value("gateway_holds_expired_total") == 0
    await assert_counters_match_ledger(w)
