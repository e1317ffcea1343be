"""Shutdown: settlements still pending get the grace, and admissions of cut requests are released.

Issue 15 items 7 and 8. The gateway runs in the test's process and is shut down as `gateway serve`
shuts it down on SIGTERM (`on_shutdown`, then the cleanup contexts); tests/test_crash.py sends a
real SIGTERM to a real process.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.ops.fake_upstream import FakeUpstream
from gateway.ops.settings import Settings
from gateway.store import open_store, sqlite_path

from .conftest import Backend, assert_counters_match_ledger
from .outage_helpers import Setup, SqliteLock, answered_during_an_outage, chat, outage_gateway


def _gateway(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any, grace: float
) -> AbstractAsyncContextManager[Setup]:
    """A gateway whose database can be cut (tests/outage_helpers.py), with a shutdown grace of `grace` s."""
    return outage_gateway(backend, fake, aiohttp_client, hold_ttl_seconds=60, shutdown_grace_seconds=grace)


async def test_a_settlement_pending_at_shutdown_is_retried_for_the_grace(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any
) -> None:
    """Issue 15 item 7: the database is down when the process is told to stop, and back 6 s later,
    within the 10 s grace. The request upstream answered 2xx is charged by this process before it
    exits; only then does it retire its heartbeat row (so no sweep could record it `expired`)."""
    async with _gateway(backend, fake, aiohttp_client, grace=10) as s:
        w, outage = s.world, s.outage
        request_id = (await answered_during_an_outage(s)).request_id
        assert request_id is not None
        closing = asyncio.ensure_future(w.client.close())
        await asyncio.sleep(6)
        assert not closing.done(), "the process stopped before its settlement was written"
        await outage.restore()
        await asyncio.wait_for(closing, 15)
        rows = await w.sql("SELECT request_id, outcome, credits_micros FROM ledger")
        assert [tuple(r) for r in rows] == [(request_id, "charged", 100_000)]
        assert await w.sql("SELECT * FROM holds") == []
        assert await w.sql("SELECT * FROM instances") == []
        await assert_counters_match_ledger(w)


async def test_a_settlement_still_unwritten_after_the_grace_keeps_its_instance_row(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any, caplog: Any
) -> None:
    """The database stays down past the grace: the process exits saying how many requests it left
    unsettled, and leaves its heartbeat row and their holds, so the TTL rules apply to them."""
    async with _gateway(backend, fake, aiohttp_client, grace=2) as s:
        w = s.world
        assert (await answered_during_an_outage(s)).status == 200
        with caplog.at_level(logging.ERROR, logger="gateway.web.shutdown"):
            await asyncio.wait_for(w.client.close(), 15)
        assert [r.getMessage() for r in caplog.records if "unsettled" in r.getMessage()] == [
            "shutting down with 1 request(s) unsettled: the database could not be reached within the "
            "shutdown grace; their holds stay and are released (outcome expired, not charged) by "
            "another gateway process once older than GATEWAY_HOLD_TTL_SECONDS"
        ]
        # Still down: looked at past the outage (PostgreSQL without the proxy, SQLite's reader).
        look = open_store(backend.url)
        try:
            assert await _count(look, "holds") == 1
            assert await _count(look, "instances") == 1
            assert await _count(look, "ledger") == 0
        finally:
            await look.close()


async def _count(store: Any, table: str) -> int:
    query = text(f"SELECT COUNT(*) FROM {table}")
    return int(await store.read(lambda conn: conn.execute(query).scalar_one()))


async def test_a_stream_cut_while_the_database_is_down_is_charged_when_it_is_back(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any
) -> None:
    """A stream outlives the 1 s grace while the database is down: it is cut, its settlement fails
    and is retried after the cut; the database is back 3 s later, the charge is written (its 2xx
    headers went out), and only then does the process retire."""
    async with _gateway(backend, fake, aiohttp_client, grace=1) as s:
        w, outage, key = s.world, s.outage, s.key
        w.upstream.chunk_delay = 2.0  # 12 s a stream
        resp = await w.client.post(
            "/api/v1/chat",
            json={
                "model": "openai/gpt-oss-20b",
                "messages": [{"role": "user", "content": "s"}],
                "stream": True,
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
        await resp.content.readline()
        await outage.cut()
        closing = asyncio.ensure_future(w.client.close())
        await asyncio.sleep(3)
        assert not closing.done(), "the process stopped before its settlement was written"
        await outage.restore()
        await asyncio.wait_for(closing, 15)
        rows = await w.sql("SELECT request_id, outcome, credits_micros FROM ledger")
        assert [tuple(r) for r in rows] == [(request_id, "charged", 100_000)]
        assert await w.sql("SELECT * FROM holds") == []
        assert await w.sql("SELECT * FROM instances") == []
        await assert_counters_match_ledger(w)


class _CounterLock:
    """Delays admissions without failing them: another transaction holds what they need."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.release: asyncio.Event = asyncio.Event()
        self.locked: asyncio.Event = asyncio.Event()

    async def hold(self) -> None:
        if self.backend.name == "postgresql":
            engine = create_async_engine(self.backend.url)
            try:
                async with engine.connect() as conn, conn.begin():
                    await conn.execute(text("SELECT * FROM budget_counters FOR UPDATE"))
                    self.locked.set()
                    await self.release.wait()
            finally:
                await engine.dispose()
            return
        lock = SqliteLock(sqlite_path(self.backend.url))
        await lock.cut()
        self.locked.set()
        await self.release.wait()
        await lock.restore()


async def test_an_admission_that_commits_after_its_request_was_cut_is_released(
    backend: Backend, fake: tuple[FakeUpstream, str], aiohttp_client: Any
) -> None:
    """Issue 15 item 8: the request is cut at shutdown while its admission waits for the database;
    the admission commits afterwards. The process releases that hold itself before it exits (one
    ledger row, `upstream_unavailable`, not charged): nothing is left for a sweep, nothing forwarded."""
    async with _gateway(backend, fake, aiohttp_client, grace=0.3) as s:
        w, key = s.world, s.key
        assert (await chat(w, key, "warm")).status == 200  # the key is cached, the counter exists
        lock = _CounterLock(backend)
        holding = asyncio.ensure_future(lock.hold())
        await asyncio.wait_for(lock.locked.wait(), 5)
        call = asyncio.ensure_future(chat(w, key, "cut"))
        await asyncio.sleep(0.2)  # the request waits for its admission
        closing = asyncio.ensure_future(w.client.close())
        await asyncio.sleep(0.6)  # past the grace: the request has been cut
        assert not call.done() or call.exception() is not None or call.result().status != 200
        lock.release.set()
        await asyncio.wait_for(holding, 5)
        await asyncio.wait_for(closing, 10)
        await asyncio.gather(call, return_exceptions=True)
        assert {m["content"] for r in w.upstream.received for m in r.body["messages"]} == {"warm"}
        assert await w.sql("SELECT * FROM holds") == []
        rows = await w.sql("SELECT outcome, credits_micros FROM ledger ORDER BY outcome")
        assert [tuple(r) for r in rows] == [("charged", 100_000), ("upstream_unavailable", 0)]
        assert await w.sql("SELECT * FROM instances") == []
        await assert_counters_match_ledger(w)


async def test_a_cut_admission_is_not_cut_again_while_it_releases_its_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The drain polls for requests it may cancel: one whose admission came back after the cut must
    stay uncancellable while it releases its hold, or it is left counted as unsettled and the
    process never retires its heartbeat row (a race once seen on PostgreSQL in CI)."""
    from aiohttp import web

    from gateway.core.metering import Admission, Caller, Charge
    from gateway.web import shutdown
    from gateway.web.state import BACKGROUND, REQUESTS, SETTINGS, SETTLING

    app = web.Application()
    shutdown.setup(app)
    app[SETTLING], app[BACKGROUND] = set(), set()
    app[SETTINGS] = Settings.load(environ={"GATEWAY_SHUTDOWN_GRACE_SECONDS": "0.05"})
    charge = Charge("r1", Caller("k", 1, "ann", None, None), "gpt-oss-20b", 1, 100_000, 100_000, False)
    answer: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
    released: list[str] = []

    async def slow_release(app: web.Application, admission: Admission) -> None:
        app[SETTLING].add(admission.charge.request_id)
        await asyncio.sleep(0.3)  # several of the drain's polls
        app[SETTLING].discard(admission.charge.request_id)
        released.append(admission.charge.request_id)

    monkeypatch.setattr(shutdown, "release", slow_release)

    async def request() -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            await shutdown.admitting(app, task, answer)
        finally:
            del app[REQUESTS][task]

    task = asyncio.ensure_future(request())
    app[REQUESTS][task] = shutdown.RUNNING
    await asyncio.sleep(0)
    draining = asyncio.ensure_future(shutdown.drain(app))
    await asyncio.sleep(0.2)  # past the grace: the request, waiting for its admission, is marked cut
    assert app[REQUESTS][task] == shutdown.CUT
    answer.set_result(Admission(charge, 0, (), None))
    await asyncio.wait_for(draining, 5)
    assert task.cancelled()
    assert released == ["r1"]
    assert shutdown.unsettled(app) == 0


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_shutdown_grace_stops_start_up_naming_it(value: str, tmp_path: Any) -> None:
    from gateway.ops.settings import ConfigError

    with pytest.raises(ConfigError, match="^GATEWAY_SHUTDOWN_GRACE_SECONDS: "):
        Settings.load(environ={"GATEWAY_SHUTDOWN_GRACE_SECONDS": value})
    config = tmp_path / "gateway.toml"
    config.write_text(f"shutdown_grace_seconds = {value!r}\n")
    with pytest.raises(ConfigError, match="^shutdown_grace_seconds: "):
        Settings.load(config, environ={})
    config.write_text("shutdown_grace_seconds = 5\n")
    assert Settings.load(config, environ={}).shutdown_grace_seconds == 5
    assert Settings.load(environ={}).shutdown_grace_seconds == 30
    assert Settings.load(environ={"GATEWAY_SHUTDOWN_GRACE_SECONDS": "2.5"}).shutdown_grace_seconds == 2.5
