"""Many concurrent slow streams through one `gateway serve` process (issue 16; bench/streams.py runs
9,000): each arrives byte for byte, each is charged exactly once, the books verify."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.core.metering import now_us
from gateway.ops import budgeting, ledger, services
from gateway.store import migrate, open_store

from .procs import gateways, wait_ready

STREAMS = 300
EVENTS = 5
INTERVAL = 0.3


def _event(name: str, index: int) -> bytes:
    document = {"id": name, "choices": [{"delta": {"content": f"w{index}"}}]}
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _tail(name: str) -> bytes:
    usage = {
        "id": name,
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": EVENTS, "total_tokens": 7},
    }
    return b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n"


def _expected(name: str) -> bytes:
    return b"".join(_event(name, i) for i in range(EVENTS)) + _tail(name)


async def _slow_upstream(request: web.Request) -> web.StreamResponse:
    """Every stream different (its name in it), trickling one event every INTERVAL seconds."""
    name = (await request.json())["messages"][-1]["content"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index in range(EVENTS):
        if index:
            await asyncio.sleep(INTERVAL)
        await response.write(_event(name, index))
    await response.write(_tail(name))
    await response.write_eof()
    return response


async def _stream(session: aiohttp.ClientSession, url: str, key: str, name: str) -> tuple[int, bytes, str]:
    body = {"model": "openai/gpt-oss-20b", "stream": True, "messages": [{"role": "user", "content": name}]}
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.read(), response.headers.get("X-Request-Id", "")


@pytest.mark.slow
async def test_hundreds_of_slow_streams_arrive_whole_and_are_charged_once(tmp_path: Any) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    await asyncio.to_thread(migrate.upgrade, database_url)
    app = web.Application()
    app.router.add_post("/api/v1/chat", _slow_upstream)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    store = open_store(database_url)
    try:
        at = now_us()
        await store.run(services.create_team, "eng", at)
        await store.run(services.create_user, "alice", "eng", at)
        key = (await store.run(services.create_key, "alice", None, at))["key"]
        await store.run(budgeting.set_budget, "team", "eng", "daily", "1000", at)
        upstream_url = str(upstream.make_url("/api/v1/chat"))
        with gateways(1, database_url, upstream_url, tmp_path, GATEWAY_ACCESS_LOG="off") as (gateway,):
            await wait_ready(gateway)
            url = gateway.url + "/api/v1/chat"
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                results = await asyncio.gather(*(_stream(session, url, key, f"s{i}") for i in range(STREAMS)))
        for i, (status, received, _) in enumerate(results):
            assert status == 200
            assert received == _expected(f"s{i}")
        ids = {request_id for _, _, request_id in results}
        assert len(ids) == STREAMS
        rows = await store.read(_ledger_rows)
        assert sorted(rows) == sorted((request_id, "charged", 100_000, EVENTS) for request_id in ids)
        assert await store.read(_holds) == 0
        assert (await store.read(ledger.verify))["ok"] is True
    finally:
        await store.close()
        await upstream.close()


def _ledger_rows(conn: Any) -> list[tuple[Any, ...]]:
    from sqlalchemy import text

    query = "SELECT request_id, outcome, credits_micros, completion_tokens FROM ledger"
    return [tuple(row) for row in conn.execute(text(query)).all()]


def _holds(conn: Any) -> int:
    from sqlalchemy import text

    return int(conn.execute(text("SELECT COUNT(*) FROM holds")).scalar_one())
