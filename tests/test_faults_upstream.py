"""Upstream faults: each ends in exactly one ledger row, the charging rule applied, no hold left.

tests/test_chat.py already covers upstream 500/429/400 (plain and streamed), connection refused,
a stall and a reset before the headers of a plain request. These are the rest: the same faults on
a stream, upstream statuses that look like the gateway's own (502/503/504), Retry-After, and faults
after the headers: a stream dropped or stalled mid-way (charged, and the client's read still ends
cleanly), a 2xx body that is not JSON (relayed, charged) or that breaks off (502, not charged).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from .conftest import World, assert_counters_match_ledger

OSS20 = "openai/gpt-oss-20b"  # 0.1 credits a message


async def _send(w: World, key: str, content: str, *, stream: bool, messages: int = 2) -> Any:
    body = {
        "model": OSS20,
        "messages": [{"role": "user", "content": "hi"}] * (messages - 1)
        + [{"role": "user", "content": content}],
        "stream": stream,
    }
    return await w.client.post("/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key}"})


async def _one_row(w: World, outcome: str, credits: int, upstream_status: int | None) -> tuple[Any, ...]:
    """Exactly one ledger row, as expected; no hold left; the counters agree with the ledger."""
    rows = await w.sql(
        "SELECT outcome, credits_micros, upstream_status, stream, prompt_tokens, completion_tokens "
        "FROM ledger"
    )
    assert len(rows) == 1, rows
    row = tuple(rows[0])
    assert row[:3] == (outcome, credits, upstream_status), row
    assert await w.sql("SELECT * FROM holds") == []
    await assert_counters_match_ledger(w)
    budget = await w.sql("SELECT spent_micros, held_micros FROM budget_counters")
    assert budget == [(credits, 0)]
    return row


async def _upstream(w: World, aiohttp_server: Any, handler: Any, **overrides: Any) -> None:
    """Serve `handler` as the upstream chat endpoint and point the gateway at it."""
    app = web.Application()
    app.router.add_post("/api/v1/chat", handler)
    server = await aiohttp_server(app)
    await w.reconfigure(upstream_url=str(server.make_url("/api/v1/chat")), **overrides)


async def _gateway_error(resp: Any, status: int, kind: str) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["type"] == kind and body["error"]["message"]
    assert resp.headers["X-Credits-Charged"] == "0"
    assert resp.headers["X-Credits-Remaining"] == "1"


@pytest.fixture
async def alice(world: World) -> str:
    """Alice's key, with a daily budget of 1 credit."""
    key = await world.key("alice")
    await world.budget("user", "alice", "1")
    return str(key["key"])


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_upstream_5xx_that_look_like_ours_are_relayed_not_charged(
    world: World, alice: str, status: int
) -> None:
    resp = await _send(world, alice, f"fake:{status}", stream=False)
    assert resp.status == status
    body = await resp.json()
    assert body == {"error": {"message": f"fake upstream error {status}", "code": status}}  # upstream's own
    assert resp.headers["X-Credits-Charged"] == "0"
    await _one_row(world, "upstream_error", 0, status)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_429_keeps_its_retry_after(world: World, alice: str, stream: bool) -> None:
    resp = await _send(world, alice, "fake:429", stream=stream)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["X-Credits-Charged"] == "0"
    await _one_row(world, "upstream_error", 0, 429)


async def test_stream_connection_refused(world: World, alice: str) -> None:
    await world.reconfigure(upstream_url="http://127.0.0.1:9/api/v1/chat")
    await _gateway_error(await _send(world, alice, "x", stream=True), 502, "upstream_unavailable")
    await _one_row(world, "upstream_unavailable", 0, None)


async def test_stream_reset_before_headers(world: World, alice: str) -> None:
    await _gateway_error(await _send(world, alice, "fake:reset", stream=True), 502, "upstream_unavailable")
    await _one_row(world, "upstream_unavailable", 0, None)


async def test_plain_reset_before_headers_leaves_no_hold(world: World, alice: str) -> None:
    await _gateway_error(await _send(world, alice, "fake:reset", stream=False), 502, "upstream_unavailable")
    await _one_row(world, "upstream_unavailable", 0, None)


async def test_stream_stall_before_headers(world: World, alice: str) -> None:
    await world.reconfigure(upstream_timeout_seconds=0.3)
    world.upstream.header_delay = 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _gateway_error(await _send(world, alice, "x", stream=True), 504, "upstream_timeout")
    assert loop.time() - started < 1.5
    await _one_row(world, "upstream_timeout", 0, None)


async def test_stream_dropped_mid_way_ends_cleanly_and_is_charged(world: World, alice: str) -> None:
    resp = await _send(world, alice, "fake:drop", stream=True)
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "0.2"
    body = await asyncio.wait_for(resp.read(), 5)  # completes: no exception, no hang
    assert b'"Hello"' in body and b"[DONE]" not in body
    row = await _one_row(world, "charged", 200_000, 200)
    assert bool(row[3]) is True and row[4:] == (None, None)  # no usage chunk came


async def test_stream_stalled_mid_way_is_ended_after_the_idle_timeout(world: World, alice: str) -> None:
    await world.reconfigure(stream_idle_timeout_seconds=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await _send(world, alice, "fake:stall:5", stream=True)
    assert resp.status == 200
    body = await asyncio.wait_for(resp.read(), 5)
    assert loop.time() - started < 3
    assert b'"Hello"' in body and b'" from"' not in body and b"[DONE]" not in body
    await _one_row(world, "charged", 200_000, 200)


async def test_stream_whose_body_breaks_off_is_charged(world: World, alice: str) -> None:
    """A 2xx stream is charged from its headers on, whatever becomes of its body."""
    resp = await _send(world, alice, "fake:truncate", stream=True)
    assert resp.status == 200
    body = await asyncio.wait_for(resp.read(), 5)
    assert body == b'{"id": "x", "choi'
    await _one_row(world, "charged", 200_000, 200)


async def test_2xx_body_that_is_not_json_is_relayed_and_charged(world: World, alice: str) -> None:
    resp = await _send(world, alice, "fake:badjson", stream=False)
    assert resp.status == 200
    assert await resp.read() == b"{not json"
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Credits-Charged"] == "0.2"
    row = await _one_row(world, "charged", 200_000, 200)
    assert row[4:] == (None, None)


async def test_plain_body_that_breaks_off_is_502_not_charged(world: World, alice: str) -> None:
    resp = await _send(world, alice, "fake:truncate", stream=False)
    await _gateway_error(resp, 502, "upstream_unavailable")
    await _one_row(world, "upstream_unavailable", 0, 200)


async def test_plain_body_that_stalls_is_502_not_charged(
    world: World, alice: str, aiohttp_server: Any
) -> None:
    """Headers, part of a body, then silence: after the idle timeout, 502 and nothing charged."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"id": ')
        await asyncio.sleep(10)
        return response

    await _upstream(world, aiohttp_server, stall, stream_idle_timeout_seconds=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _gateway_error(await _send(world, alice, "x", stream=False), 502, "upstream_unavailable")
    assert loop.time() - started < 3
    await _one_row(world, "upstream_unavailable", 0, 200)


async def test_usage_from_a_non_json_looking_stream_is_ignored(
    world: World, alice: str, aiohttp_server: Any
) -> None:
    """A 2xx stream with garbage `usage` lines is relayed as it is and charged, tokens unknown."""
    garbage = [
        b'data: {"usage": ',
        b"not json}\n\n",
        b'data: {"usage": {"prompt_tokens": -1}}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in garbage:
            await response.write(part)
        await response.write_eof()
        return response

    await _upstream(world, aiohttp_server, sse)
    resp = await _send(world, alice, "x", stream=True)
    assert resp.status == 200
    assert await resp.read() == b"".join(garbage)
    row = await _one_row(world, "charged", 200_000, 200)
    assert row[4:] == (None, None)  # a negative count is not taken either


async def test_token_counts_past_the_ledgers_columns_are_not_taken(
    world: World, alice: str, aiohttp_server: Any
) -> None:
    """A 2xx whose `usage` claims more tokens than an integer column holds is charged all the same."""
    body = b'{"choices": [], "usage": {"prompt_tokens": 2147483648, "completion_tokens": 7}}'

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    await _upstream(world, aiohttp_server, huge)
    resp = await _send(world, alice, "x", stream=False)
    assert resp.status == 200
    assert await resp.read() == body
    row = await _one_row(world, "charged", 200_000, 200)
    assert row[4:] == (None, 7)
