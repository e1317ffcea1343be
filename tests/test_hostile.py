"""Hostile input: every malformed, ambiguous or oversized request is refused with a clear 4xx (or
priced correctly), never a 5xx, and nothing is charged for what is refused; slow clients are cut
off without starving anybody.

The gateway prices the body it parsed and forwards the bytes it received, so the two must mean
the same thing to upstream: bodies must be UTF-8, and a top-level key given twice is refused
(Python's `json` keeps the last value where another parser may keep the first: with two `model`s
the cheap one could be billed and the expensive one served).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import io
import json
import time
from typing import Any

import pytest
from aiohttp import web_runner

from gateway.web.limits import LISTEN_BACKLOG

from .conftest import World, assert_counters_match_ledger

OSS20 = "openai/gpt-oss-20b"  # 0.1 credits a message
PRO = "google/gemini-2.5-pro"  # 3 credits a message
ONE = [{"role": "user", "content": "hi"}]


async def _nothing_happened(w: World) -> None:
    assert w.upstream.received == []
    assert await w.sql("SELECT * FROM ledger") == []
    assert await w.sql("SELECT * FROM holds") == []
    assert await w.sql("SELECT * FROM budget_counters WHERE spent_micros > 0 OR held_micros > 0") == []


async def _refused(resp: Any, status: int, kind: str) -> str:
    assert resp.status == status, await resp.text()
    error = (await resp.json())["error"]
    assert error["type"] == kind and error["message"], error
    return str(error["message"])


@pytest.fixture
async def alice(world: World) -> str:
    key = await world.key("alice")
    await world.budget("user", "alice", "100000")
    return str(key["key"])


async def _post(w: World, key: str, body: bytes, **headers: str) -> Any:
    return await w.client.post(
        "/api/v1/chat", data=io.BytesIO(body), headers={"Authorization": f"Bearer {key}", **headers}
    )


def _doc(**fields: Any) -> bytes:
    return json.dumps({"model": OSS20, "messages": ONE, **fields}).encode()


GOOD = '"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]'

MALFORMED = {
    "empty": b"",
    "unclosed": b"{" + GOOD.encode(),
    "trailing garbage": b"{" + GOOD.encode() + b"} {}",
    "single quotes": b"{'model': 'openai/gpt-oss-20b', 'messages': [{'role': 'user'}]}",
    "comment": b"{" + GOOD.encode() + b" /* free */}",
    "deep nesting in content": (
        b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": '
        + b"[" * 200_000
        + b"]" * 200_000
        + b"}]}"
    ),
    "deep nesting of objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "a 5000-digit number": b"{" + GOOD.encode() + b', "n": ' + b"7" * 5000 + b"}",
    "invalid UTF-8 in a string": (
        b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    ),
    "UTF-16 (json would guess it)": ("{" + GOOD + "}").encode("utf-16"),
    "UTF-8 with a BOM": b"\xef\xbb\xbf{" + GOOD.encode() + b"}",
    "NUL byte": b"\x00{" + GOOD.encode() + b"}",
}

WRONG_TYPES = {
    "model null": _doc(model=None),
    "model list": _doc(model=[OSS20]),
    "model object": _doc(model={"name": OSS20}),
    "model number": _doc(model=20),
    "messages null": _doc(messages=None),
    "messages object": _doc(messages={"0": {"role": "user"}}),
    "messages number": _doc(messages=3),
    "message null": _doc(messages=[None]),
    "message list": _doc(messages=[["user", "hi"]]),
    "role null": _doc(messages=[{"role": None}]),
    "role list": _doc(messages=[{"role": ["user"]}]),
    "second message bad": _doc(messages=[{"role": "user"}, "hi"]),
    "stream number": _doc(stream=1),
    "stream string": _doc(stream="false"),
    "stream object": _doc(stream={}),
    "top level array of objects": json.dumps([{"model": OSS20, "messages": ONE}]).encode(),
    "top level null": b"null",
}

DUPLICATED = {
    "model, cheap then dear": b'{"model": "openai/gpt-oss-20b", "model": "google/gemini-2.5-pro", '
    b'"messages": [{"role": "user"}]}',
    "model, dear then cheap": b'{"model": "google/gemini-2.5-pro", "model": "openai/gpt-oss-20b", '
    b'"messages": [{"role": "user"}]}',
    "model, spelt with an escape": b'{"model": "openai/gpt-oss-20b", "\\u006dodel": "google/gemini-2.5-pro", '
    b'"messages": [{"role": "user"}]}',
    "messages, short then long": b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user"}], '
    b'"messages": [{"role": "user"}, {"role": "user"}, {"role": "user"}]}',
    "stream": b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user"}], "stream": false, '
    b'"stream": true}',
    "an unpriced field": b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user"}], "user": "a", '
    b'"user": "b"}',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_body_is_400(world: World, alice: str, body: bytes) -> None:
    await _refused(await _post(world, alice, body), 400, "invalid_request")
    await _nothing_happened(world)


@pytest.mark.parametrize("body", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
async def test_wrong_types_are_400(world: World, alice: str, body: bytes) -> None:
    await _refused(await _post(world, alice, body), 400, "invalid_request")
    await _nothing_happened(world)


@pytest.mark.parametrize("body", DUPLICATED.values(), ids=DUPLICATED.keys())
async def test_a_top_level_key_given_twice_is_400(world: World, alice: str, body: bytes) -> None:
    message = await _refused(await _post(world, alice, body), 400, "invalid_request")
    assert "more than once" in message
    await _nothing_happened(world)


async def test_keys_repeated_inside_a_message_do_not_change_the_price(world: World, alice: str) -> None:
    """Only top-level keys decide the price; a message is counted whatever its keys say."""
    body = (
        b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "role": "system", "content": "a"}]}'
    )
    resp = await _post(world, alice, body)
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "0.1"


async def test_unknown_model_message_stays_short(world: World, alice: str) -> None:
    resp = await _post(world, alice, _doc(model="x" * 1_000_000))
    message = await _refused(resp, 400, "unknown_model")
    assert len(message) < 2000
    await _nothing_happened(world)


async def test_model_names_are_not_normalised(world: World, alice: str) -> None:
    """A near-miss is not a priced model: never guess which price applies."""
    for model in (OSS20.upper(), OSS20 + " ", " " + OSS20, OSS20 + "\u200b"):
        await _refused(await _post(world, alice, _doc(model=model)), 400, "unknown_model")
    await _nothing_happened(world)


async def test_huge_messages_array_is_priced_exactly(world: World, alice: str) -> None:
    count = 300_000  # 13 bytes each: 3.9 MB, just within the 4 MiB limit
    body = json.dumps({"model": OSS20, "messages": [{"role": "u"}] * count}, separators=(",", ":")).encode()
    assert len(body) <= world.settings.max_body_bytes
    resp = await _post(world, alice, body)
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Credits-Charged"] == "30000"
    rows = await world.sql("SELECT message_count, credits_micros, outcome FROM ledger")
    assert [tuple(r) for r in rows] == [(count, count * 100_000, "charged")]
    assert world.upstream.messages_received == count
    await assert_counters_match_ledger(world)


async def test_huge_messages_array_over_budget_is_402(world: World, alice: str) -> None:
    await world.budget("user", "alice", "10")
    body = json.dumps({"model": PRO, "messages": [{"role": "u"}] * 200_000}).encode()
    await _refused(await _post(world, alice, body), 402, "budget_exceeded")
    await _nothing_happened(world)


async def test_huge_messages_array_over_the_size_limit_is_413(world: World, alice: str) -> None:
    body = json.dumps({"model": OSS20, "messages": [{"role": "u"}] * 400_000}).encode()
    assert len(body) > world.settings.max_body_bytes
    await _refused(await _post(world, alice, body), 413, "request_too_large")
    await _nothing_happened(world)


async def test_fields_claiming_who_pays_or_what_it_costs_are_ignored(world: World, alice: str) -> None:
    bob = await world.key("bob")
    body = _doc(
        messages=ONE * 3,
        user="bob",
        team="someone-else",
        key_id=bob["id"],
        price=0,
        cost=0,
        credits=0,
        unit_price=0,
        credits_per_message=0,
        request_id="mine",
    )
    headers = {
        "X-User": "bob",
        "X-Team": "other",
        "X-Credits-Charged": "0",
        "X-Request-Id": "mine",
        "X-Forwarded-For": "10.0.0.1",
    }
    resp = await _post(world, alice, body, **headers)
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "0.3"
    assert resp.headers["X-Request-Id"] != "mine"
    rows = await world.sql(
        "SELECT u.name, l.key_id, l.credits_micros, l.unit_price_micros, l.request_id FROM ledger l "
        "JOIN users u ON u.id = l.user_id"
    )
    assert [tuple(r) for r in rows] == [("alice", rows[0][1], 300_000, 100_000, resp.headers["X-Request-Id"])]
    assert rows[0][1] != bob["id"]
    # The body goes upstream as it came (an OpenAI `user` field means something there).
    assert world.upstream.received[0].body["user"] == "bob"
    for name in headers:
        assert name not in world.upstream.received[0].headers


async def test_gzip_body_is_priced_as_upstream_receives_it(world: World, alice: str) -> None:
    body = gzip.compress(_doc(messages=ONE * 4))
    resp = await _post(world, alice, body, **{"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Credits-Charged"] == "0.4"
    assert world.upstream.messages_received == 4  # decompressed once, by the gateway


async def test_gzip_bomb_is_413(world: World, alice: str) -> None:
    bomb = gzip.compress(b'{"model": "openai/gpt-oss-20b", "messages": [], "pad": "' + b" " * 200_000_000)
    assert len(bomb) < 300_000
    resp = await asyncio.wait_for(_post(world, alice, bomb, **{"Content-Encoding": "gzip"}), 10)
    await _refused(resp, 413, "request_too_large")
    await _nothing_happened(world)


async def _raw(w: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = w.client.server.port
    assert port is not None
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Status line + headers, and a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


async def test_endless_chunked_body_gets_413_and_the_connection_closed(world: World, alice: str) -> None:
    await world.reconfigure(client_read_timeout_seconds=2.0)
    reader, writer = await _raw(world)
    writer.write(
        b"POST /api/v1/chat HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {alice}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    sent = 0

    async def pump() -> None:
        nonlocal sent
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        try:
            while True:  # never ends, as far as the client is concerned
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass

    pumping = asyncio.ensure_future(pump())
    try:
        head, body = await asyncio.wait_for(_read_response(reader), 10)
        answered = time.monotonic()
        assert head.startswith(b"HTTP/1.1 413"), head
        assert json.loads(body)["error"]["type"] == "request_too_large"
        # The gateway drains what keeps coming for a moment, then closes the connection.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(10):
                await reader.readexactly(1)
        assert time.monotonic() - answered < 6
        await asyncio.wait_for(pumping, 10)
    finally:
        pumping.cancel()
        writer.transport.abort()
    assert sent > world.settings.max_body_bytes
    await _nothing_happened(world)


async def test_content_length_and_chunked_together_are_refused(world: World, alice: str) -> None:
    """A request smuggling attempt: the HTTP parser refuses it before the gateway sees it."""
    reader, writer = await _raw(world)
    body = _doc()
    writer.write(
        b"POST /api/v1/chat HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {alice}\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), head
    finally:
        writer.transport.abort()
    await _nothing_happened(world)


async def test_oversized_header_is_refused(world: World, alice: str) -> None:
    resp = await world.client.post(
        "/api/v1/chat",
        data=_doc(),
        headers={"Authorization": f"Bearer {alice}", "X-Padding": "a" * 20_000},
    )
    assert resp.status in (400, 431)
    await _nothing_happened(world)


async def test_slow_clients_are_cut_off_and_starve_nobody(
    world: World, alice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 connections: idle, dribbling headers, dribbling a body. Others are served meanwhile."""
    # Long enough that the normal request below, sharing this event loop with 300 slow clients on a
    # busy machine, is clearly served before any slow one is cut off.
    timeout = 2.0
    # The test server listens with the backlog `gateway serve` has, not aiohttp's 128: on a busy
    # machine a wave could overflow that, and a connection whose handshake's last ACK the kernel
    # dropped looks open to its client while the server learns of it only after SYN-ACK retries
    # (1, 2, 4, 8 s): an "idle" client then waited past its 10 s for a close (seen in a full run).
    monkeypatch.setattr(
        web_runner.SockSite,
        "__init__",
        functools.partialmethod(web_runner.SockSite.__init__, backlog=LISTEN_BACKLOG),
    )
    await world.reconfigure(client_read_timeout_seconds=timeout)
    body = _doc()
    head = (
        f"POST /api/v1/chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {alice}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def slow(kind: str, wave: int) -> tuple[str, float, bytes]:
        # In waves: a burst beyond the listen backlog (128) would leave connections waiting in
        # the kernel, unaccepted, for as long as its SYN-ACK retries take.
        await asyncio.sleep(wave * 0.03)
        reader, writer = await _raw(world)
        opened = time.monotonic()
        if kind == "idle":
            sent, rest = b"", b""
        elif kind == "headers":
            sent, rest = head[:30], head[30:]  # never reaches the blank line in time
        else:
            sent, rest = head + body[:5], body[5:]

        async def dribble() -> None:
            writer.write(sent)
            for byte in rest:
                await asyncio.sleep(0.25)
                writer.write(bytes([byte]))
                await writer.drain()

        dribbling = asyncio.ensure_future(dribble())
        answer = b""
        try:
            async with asyncio.timeout(10):
                # Until the gateway closes the connection. Checked again every half second: once in
                # a full run, the stream was at EOF (its transport closed) yet a read waiting on it
                # was never woken, and the test timed out on a connection the gateway had closed.
                while not reader.at_eof():
                    try:
                        answer += await asyncio.wait_for(reader.read(65536), 0.5)
                    except TimeoutError:
                        continue
        except ConnectionError:
            pass  # closed with unread bytes of ours: a reset
        finally:
            dribbling.cancel()
            await asyncio.gather(dribbling, return_exceptions=True)
            writer.transport.abort()
        return kind, time.monotonic() - opened, answer

    kinds = ["idle", "headers", "body"] * 100
    slow_ones = [asyncio.ensure_future(slow(kind, i // 50)) for i, kind in enumerate(kinds)]
    await asyncio.sleep(0.4)
    started = time.monotonic()
    resp = await world.chat(alice)
    assert resp.status == 200 and time.monotonic() - started < timeout
    results = await asyncio.wait_for(asyncio.gather(*slow_ones), 20)
    for kind, took, answer in results:
        if kind == "body":
            # The body read times out (408); what still dribbles in is drained for at most the
            # timeout again, then the connection is closed.
            assert answer.startswith(b"HTTP/1.1 408"), (kind, answer[:100])
            assert b"request_timeout" in answer
            assert timeout * 0.9 < took < timeout * 2 + 1.5, (kind, took)
        else:
            assert answer == b"", (kind, answer[:100])
            assert timeout * 0.9 < took < timeout + 1.5, (kind, took)
    assert (await world.chat(alice)).status == 200
    rows = await world.sql("SELECT outcome FROM ledger")
    assert [r[0] for r in rows] == ["charged", "charged"]
    assert world.metrics.registry.get_sample_value("gateway_inflight_requests") == 0
    assert (
        world.metrics.registry.get_sample_value(
            "gateway_requests_total", {"model": "", "outcome": "request_timeout"}
        )
        == 100
    )
    await assert_counters_match_ledger(world)


def test_client_read_timeout_is_configurable() -> None:
    from gateway.ops.settings import ConfigError, Settings
    from gateway.web.app import server_args

    settings = Settings.load(environ={"GATEWAY_CLIENT_READ_TIMEOUT_SECONDS": "2.5"})
    assert settings.client_read_timeout_seconds == 2.5
    assert server_args(settings) == {"keepalive_timeout": 2.5, "lingering_time": 2.5}
    assert Settings.load(environ={}).client_read_timeout_seconds == 30
    with pytest.raises(ConfigError, match="GATEWAY_CLIENT_READ_TIMEOUT_SECONDS"):
        Settings.load(environ={"GATEWAY_CLIENT_READ_TIMEOUT_SECONDS": "0"})
