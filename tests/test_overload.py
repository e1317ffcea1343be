"""Concurrency as a setting (issue 16): over the limit is 503 `overloaded` at once, nothing held or
forwarded; the upstream pool is sized to the limit; timeouts and connection failures are classified
truthfully; open upstream connections are a gauge; the open-files limit is fitted at start-up."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.ops import metrics as m
from gateway.ops.fake_upstream import FakeUpstream
from gateway.web.state import UPSTREAM
from gateway.web.upstream import Deadlines, new_session, open_connections, open_upstream

from .conftest import World, assert_counters_match_ledger

OSS20 = "openai/gpt-oss-20b"


@pytest.fixture
async def alice(world: World) -> str:
    key = await world.key("alice")
    await world.budget("user", "alice", "100")
    return str(key["key"])


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_one_past_the_limit_is_refused_at_once_and_nothing_is_held_or_forwarded(
    world: World, alice: str
) -> None:
    await world.reconfigure(max_concurrent_requests=5)
    world.upstream.header_delay = 1.0
    first = [asyncio.ensure_future(world.chat(alice, messages=2)) for _ in range(5)]
    await _until(lambda: len(world.upstream.received) == 5)
    assert len(await world.sql("SELECT * FROM holds")) == 5

    refused = await world.chat(alice, messages=2)
    assert refused.status == 503
    body = await refused.json()
    assert body["error"]["type"] == "overloaded"
    assert "GATEWAY_MAX_CONCURRENT_REQUESTS" in body["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    assert "X-Request-Id" not in refused.headers
    # Refused while the five were still waiting for upstream: never forwarded, nothing held for it.
    assert len(world.upstream.received) == 5
    assert len(await world.sql("SELECT * FROM holds")) == 5

    for response in await asyncio.gather(*first):
        assert response.status == 200, await response.text()
    assert len(world.upstream.received) == 5
    assert await world.sql("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome") == [("charged", 5)]
    assert await world.sql("SELECT * FROM holds") == []
    await assert_counters_match_ledger(world)
    assert world.metrics.requests.labels("", "overloaded").value == 1
    # Room again once they are done.
    world.upstream.header_delay = 0.0
    assert (await world.chat(alice)).status == 200


async def test_refusals_and_failures_free_their_place(world: World, alice: str) -> None:
    await world.reconfigure(max_concurrent_requests=1)
    assert (await world.chat("gw-unknown-key")).status == 401
    assert (await world.chat(alice, model="no/such-model")).status == 400
    assert (await world.chat(alice)).status == 200


async def test_the_upstream_pool_is_sized_to_the_limit(world: World) -> None:
    await world.reconfigure(max_concurrent_requests=37)
    assert world.client.app[UPSTREAM].limit == 37


async def test_waiting_for_a_pooled_connection_is_not_an_upstream_timeout(
    fake: tuple[FakeUpstream, str],
) -> None:
    """A wait past the connect timeout that is not a TCP connect (here: for the pool) is no 504."""
    upstream, url = fake
    upstream.chunk_delay = 0.2  # a stream holds its connection for about 1.2 s
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}'
    headers = {"Content-Type": "application/json"}
    deadlines = Deadlines()
    async with new_session(1, connect_timeout=0.1) as session:
        first = await open_upstream(session, deadlines, url, body, headers, 30)
        waiting = asyncio.ensure_future(open_upstream(session, deadlines, url, body, headers, 30))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await first.read()
        first.release()
        second = await waiting
        assert second.status == 200
        await second.read()
        second.release()


async def test_no_headers_in_time_is_an_upstream_timeout(fake: tuple[FakeUpstream, str]) -> None:
    upstream, url = fake
    upstream.header_delay = 1.0
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    async with new_session(10, connect_timeout=0.1) as session:
        with pytest.raises(UpstreamTimeout):
            await open_upstream(session, Deadlines(), url, body, {}, 0.3)


async def test_a_connect_that_times_out_is_upstream_unavailable_not_a_timeout() -> None:
    """A TCP connect that never completes (a full listen queue) is 502: upstream cannot be reached."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Fill the listen queue, so further connects hang in SYN_SENT.
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        async with new_session(10, connect_timeout=0.2) as session:
            started = time.monotonic()
            with pytest.raises(UpstreamUnavailable):
                await open_upstream(session, Deadlines(), f"http://127.0.0.1:{port}/", b"{}", {}, 30)
            assert time.monotonic() - started < 10
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_open_upstream_connections_are_a_gauge(world: World, alice: str) -> None:
    assert _gauge(world) == 0
    world.upstream.chunk_delay = 0.3
    streaming = asyncio.ensure_future(world.chat(alice, stream=True))
    await _until(lambda: len(world.upstream.received) == 1)
    assert _gauge(world) == 1
    response = await streaming
    await response.read()
    # Kept alive in the pool for the next request: still open.
    assert _gauge(world) == open_connections(world.client.app[UPSTREAM]) == 1
    text = await (await world.client.get("/metrics")).text()
    assert "gateway_upstream_connections 1.0" in text


def _gauge(world: World) -> float:
    for family in m.snapshot(world.metrics.registry):
        if family["name"] == "gateway_upstream_connections":
            return float(family["samples"][0][2])
    raise AssertionError("no gateway_upstream_connections")


def test_the_connections_gauge_adds_up_across_workers() -> None:
    one, two = m.Metrics(), m.Metrics()
    one.upstream_connections.source = lambda: 3
    two.upstream_connections.source = lambda: 4
    merged = m.merge([m.snapshot(one.registry), m.snapshot(two.registry)])
    exposed = m.exposition(merged).decode()
    assert "gateway_upstream_connections 7.0" in exposed
    # A stopped worker's gauge is not carried over by its successor.
    assert all(f["name"] != "gateway_upstream_connections" for f in m.totals(m.snapshot(one.registry)))


FIT = """
import logging, resource, sys
logging.basicConfig(level="WARNING", stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from gateway.web.limits import fit_open_files
print(fit_open_files({wanted}), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _fit(soft: int, hard: int, wanted: int) -> tuple[list[int], str]:
    result = subprocess.run(
        [sys.executable, "-c", FIT.format(soft=soft, hard=hard, wanted=wanted)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [int(x) for x in result.stdout.split()], result.stderr


def test_the_soft_open_files_limit_is_raised_when_the_setting_needs_it() -> None:
    (limit, soft), log = _fit(300, 1000, 200)
    assert limit == 200
    assert soft == 200 * 2 + 256
    assert log == ""


def test_too_low_a_hard_limit_lowers_the_concurrency_limit_and_says_so() -> None:
    (limit, soft), log = _fit(300, 1000, 10_000)
    assert soft == 1000
    assert limit == (1000 - 256) // 2
    lines = log.strip().splitlines()
    assert len(lines) == 1
    assert "GATEWAY_MAX_CONCURRENT_REQUESTS=10000" in lines[0] and f"at most {limit}" in lines[0]


async def test_a_refusal_reads_no_body(world: World, alice: str) -> None:
    """The 503 comes before the body: a client still sending one gets it at once."""
    await world.reconfigure(max_concurrent_requests=1)
    world.upstream.header_delay = 1.0
    holding = asyncio.ensure_future(world.chat(alice))
    await _until(lambda: len(world.upstream.received) == 1)

    async def trickle() -> Any:
        yield b'{"model": "openai/gpt-oss-20b", '
        await asyncio.sleep(5)
        yield b'"messages": [{"role": "user", "content": "x"}]}'

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            world.client.make_url("/api/v1/chat"),
            data=trickle(),
            headers={"Authorization": f"Bearer {alice}", "Content-Type": "application/json"},
        ) as response:
            assert response.status == 503
            assert time.monotonic() - started < 4
    assert (await holding).status == 200
