"""Client faults: a client that leaves early, mid-stream, reads slowly or stops reading.

Upstream is never cancelled on the client's account: once it answers 2xx the request is charged
(it billed us for the work), like a client that leaves mid-stream. Whatever the client does, the
request ends in one ledger row, no hold is left and no handler stays stuck (the in-flight gauge
returns to 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.ops.metrics import Metrics
from gateway.web import upstream
from gateway.web.app import create_app

from .conftest import World, assert_counters_match_ledger

OSS20 = "openai/gpt-oss-20b"  # 0.1 credits a message
BODY = {"model": OSS20, "messages": [{"role": "user", "content": "hi"}] * 3}  # 0.3 credits


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    """Wait until `check()` holds, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


def inflight(w: World) -> float | None:
    return w.metrics.registry.get_sample_value("gateway_inflight_requests")


async def settled(w: World, outcome: str, credits: int, upstream_status: int | None = 200) -> tuple[Any, ...]:
    """Wait for the one ledger row, no hold and nothing in flight; check the money."""

    async def done() -> bool:
        return inflight(w) == 0 and bool(await w.sql("SELECT 1 FROM ledger"))

    await eventually(done, what="the request to settle")
    await eventually(lambda: _no_holds(w), what="no hold left")
    rows = await w.sql(
        "SELECT outcome, credits_micros, upstream_status, stream, completion_tokens FROM ledger"
    )
    assert len(rows) == 1, rows
    assert tuple(rows[0])[:3] == (outcome, credits, upstream_status)
    await assert_counters_match_ledger(w)
    assert await w.sql("SELECT spent_micros, held_micros FROM budget_counters") == [(credits, 0)]
    return tuple(rows[0])


async def _no_holds(w: World) -> bool:
    return await w.sql("SELECT * FROM holds") == []


@pytest.fixture
async def alice(world: World) -> str:
    key = await world.key("alice")
    await world.budget("user", "alice", "1")
    return str(key["key"])


def _url(w: World) -> str:
    return str(w.client.make_url("/api/v1/chat"))


@pytest.mark.parametrize("stream", [False, True])
async def test_client_gone_before_upstream_answers_is_still_charged(
    world: World, alice: str, stream: bool
) -> None:
    """The test server cancels the handler when its client leaves; the request goes on regardless."""
    await _leave_before_upstream_answers(world, alice, _url(world), stream)


async def test_client_gone_before_upstream_answers_on_the_serving_runner(world: World, alice: str) -> None:
    """`gateway serve` runs a plain AppRunner, which leaves handlers running: the same outcome."""
    metrics = Metrics()
    runner = web.AppRunner(create_app(world.settings, store=world.store, metrics=metrics), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await _leave_before_upstream_answers(
            replace(world, metrics=metrics), alice, f"http://127.0.0.1:{port}/api/v1/chat", False
        )
    finally:
        await runner.cleanup()


async def _leave_before_upstream_answers(world: World, alice: str, url: str, stream: bool) -> None:
    world.upstream.header_delay = 1.0
    session = aiohttp.ClientSession()
    call = asyncio.ensure_future(
        session.post(url, json=dict(BODY, stream=stream), headers={"Authorization": f"Bearer {alice}"})
    )
    await eventually(lambda: _has_hold(world), timeout=5, what="the request to be admitted")
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    await session.close()
    assert inflight(world) == 1  # the gateway is still waiting for upstream, as decided
    await settled(world, "charged", 300_000)
    assert len(world.upstream.received) == 1


async def _has_hold(w: World) -> bool:
    return bool(await w.sql("SELECT 1 FROM holds"))


async def test_client_gone_mid_stream_is_charged(world: World, alice: str) -> None:
    world.upstream.chunk_delay = 0.2
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            _url(world), json=dict(BODY, stream=True), headers={"Authorization": f"Bearer {alice}"}
        )
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b'"Hello"' in first
        resp.close()  # drop the connection mid-stream
    row = await settled(world, "charged", 300_000)
    assert row[4] is None  # the usage chunk was never relayed


async def test_slow_reader_gets_everything_and_is_charged_once(world: World, alice: str) -> None:
    world.upstream.chunk_delay = 0
    resp = await world.client.post(
        "/api/v1/chat", json=dict(BODY, stream=True), headers={"Authorization": f"Bearer {alice}"}
    )
    assert resp.status == 200
    events = []
    while True:
        await asyncio.sleep(0.2)
        event = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        if not event:
            break
        events.append(event)
        if len(events) == 2:
            # Upstream is long done: the charge is written even though the client is still reading.
            rows = await world.sql("SELECT outcome, completion_tokens FROM ledger")
            assert rows == [("charged", 6)]
    assert events[-1] == b"data: [DONE]\n\n" and len(events) == 9
    row = await settled(world, "charged", 300_000)
    assert row[4] == 6


class _UvloopLikeTransport:
    """A transport as uvloop's are: the write-buffer methods, yet no `asyncio.WriteTransport`."""

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16_384, 65_536)


def test_a_write_with_room_in_any_transports_buffer_needs_no_timer() -> None:
    assert upstream._cannot_wait(_UvloopLikeTransport(0), 1_024)  # type: ignore[arg-type]
    assert not upstream._cannot_wait(_UvloopLikeTransport(65_000), 1_024)  # type: ignore[arg-type]
    # aiohttp frames each chunk (length and CRLFs): a chunk that fits only without them may wait.
    assert not upstream._cannot_wait(_UvloopLikeTransport(65_536 - 1_024 - 4), 1_024)  # type: ignore[arg-type]
    assert not upstream._cannot_wait(None, 1)


# Large chunks are each over the socket's high-water mark; small ones are written without a timer
# while the buffer has room (see upstream._cannot_wait), and must still be cut off once it fills.
@pytest.mark.parametrize("size", [65_536, 1_024])
async def test_client_that_stops_reading_is_dropped_after_the_timeout(
    world: World, alice: str, aiohttp_server: Any, size: int
) -> None:
    """A client that never reads a long stream cannot hold the relay (and its hold) forever."""
    upstream_done = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = b"data: " + b"x" * size + b"\n\n"
        try:
            for _ in range(650_000_000 // size):  # 650 MB at most: far more than any socket buffer
                await response.write(chunk)
        except ConnectionError:
            pass
        finally:
            upstream_done.set()
        return response

    app = web.Application()
    app.router.add_post("/api/v1/chat", endless)
    server = await aiohttp_server(app)
    await world.reconfigure(
        upstream_url=str(server.make_url("/api/v1/chat")), client_read_timeout_seconds=1.0
    )
    body = json.dumps(dict(BODY, stream=True)).encode()
    head = (
        f"POST /api/v1/chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {alice}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    port = world.client.server.port
    assert port is not None
    await loop.sock_connect(sock, ("127.0.0.1", port))
    try:
        await loop.sock_sendall(sock, head + body)
        first = await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
        assert first.startswith(b"HTTP/1.1 200"), first
        started = time.monotonic()
        # ...and never read again.
        await settled(world, "charged", 300_000)
        assert time.monotonic() - started < 6
        await asyncio.wait_for(upstream_done.wait(), 5)  # the upstream call was let go as well
        # The gateway has closed the connection: draining it ends in EOF or a reset.
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while await loop.sock_recv(sock, 1 << 20):
                    pass
    finally:
        sock.close()
