"""The upstream client (gateway/web/upstream_client.py) against raw TCP servers that misbehave."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.errors import UpstreamUnavailable
from gateway.web.upstream import Deadlines, open_upstream, read_upstream_body
from gateway.web.upstream_client import READ_BUFFER, UpstreamError, UpstreamPool

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """A TCP server on loopback answering each connection with `serve`; counts connections."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: its head and its Content-Length body."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Serve], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(serve: Serve) -> Server:
        made = Server(serve)
        listening = await asyncio.start_server(made.handle, "127.0.0.1", 0)
        servers.append(listening)
        port = listening.sockets[0].getsockname()[1]
        made.url = f"http://127.0.0.1:{port}/api/v1/chat?x=1"
        return made

    yield start
    for listening in servers:
        listening.close()


async def test_connections_are_kept_alive_and_reused(server: Callable[[Serve], Awaitable[Server]]) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await made.read_request(reader)
            writer.write(OK)

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        for _ in range(3):
            response = await pool.post(made.url, b'{"a": 1}', {"Content-Type": "application/json"})
            assert response.status == 200
            assert response.headers["content-type"] == "application/json"
            assert await response.read() == b"{}"
            response.release()
            assert pool.open_connections() == 1
    assert made.connections == 1
    first = made.requests[0]
    assert first.startswith(b"POST /api/v1/chat?x=1 HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 8\r\n" in first and first.endswith(b'\r\n\r\n{"a": 1}')
    assert b"\r\nAccept-Encoding: identity\r\n" in first


async def test_an_answer_without_a_length_ends_with_the_connection(
    server: Callable[[Serve], Awaitable[Server]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        response = await pool.post(made.url, b"{}", {})
        assert await read_upstream_body(response, 5) == b"part one, part two"
        response.release()
        assert pool.open_connections() == 0  # not reusable


async def test_an_interim_answer_is_skipped(server: Callable[[Serve], Awaitable[Server]]) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        response = await pool.post(made.url, b"{}", {})
        assert response.status == 200 and await response.read() == b"{}"
        response.release()


@pytest.mark.parametrize(
    "answer",
    [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", b""],
    ids=["not-http", "bad-length", "closed"],
)
async def test_no_answer_is_upstream_unavailable(
    server: Callable[[Serve], Awaitable[Server]], answer: bytes
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(answer)

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        with pytest.raises(UpstreamUnavailable):
            await open_upstream(pool, Deadlines(), made.url, b"{}", {}, 5)
        assert pool.open_connections() == 0


async def test_a_body_that_breaks_off_raises(server: Callable[[Serve], Awaitable[Server]]) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        response = await pool.post(made.url, b"{}", {})
        assert await response.readany() == b"only ten b"
        with pytest.raises(UpstreamError):
            await response.readany()
        response.release()
        response = await pool.post(made.url, b"{}", {})
        with pytest.raises(UpstreamUnavailable):
            await read_upstream_body(response, 5)
        response.release()
    assert made.connections == 2


async def test_a_reader_that_falls_behind_pauses_upstream(
    server: Callable[[Serve], Awaitable[Server]],
) -> None:
    size = 256 * READ_BUFFER  # more than loopback's socket buffers hold
    sent = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // READ_BUFFER):
            writer.write(b"x" * READ_BUFFER)
            await writer.drain()
        sent.set()

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        response = await pool.post(made.url, b"{}", {})
        await asyncio.sleep(0.3)
        # Paused after a little over READ_BUFFER: the rest waits in the sockets, not in memory.
        assert response._paused and not sent.is_set()
        assert READ_BUFFER < response._buffered < 2 * READ_BUFFER
        assert len(await response.read()) == size
        assert sent.is_set()
        response.release()


async def test_a_header_with_a_line_break_is_not_sent() -> None:
    async with UpstreamPool(4, 1.0) as pool:
        with pytest.raises(UpstreamError, match="line break"):
            await pool.post("http://127.0.0.1:9/", b"{}", {"User-Agent": "a\r\nX-Evil: 1"})


async def test_a_url_that_is_not_http_is_refused() -> None:
    async with UpstreamPool(4, 1.0) as pool:
        with pytest.raises(UpstreamError, match="not an http"):
            await pool.post("ftp://example.com/", b"{}", {})


async def test_a_connection_upstream_closed_while_idle_is_not_reused(
    server: Callable[[Serve], Awaitable[Server]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await made.read_request(reader)
        writer.write(OK)
        await writer.drain()  # then closes: upstream's own idle timeout, at once

    made = await server(serve)
    async with UpstreamPool(4, 1.0) as pool:
        for _ in range(2):
            response = await pool.post(made.url, b"{}", {})
            assert await response.read() == b"{}"
            response.release()
            await asyncio.sleep(0.1)
            assert pool.open_connections() == 0
    assert made.connections == 2


async def test_idle_connections_are_closed_after_the_idle_time(
    server: Callable[[Serve], Awaitable[Server]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await made.read_request(reader)
            writer.write(OK)

    made = await server(serve)
    async with UpstreamPool(4, 1.0, idle_seconds=0.2) as pool:
        response = await pool.post(made.url, b"{}", {})
        await response.read()
        response.release()
        assert pool.open_connections() == 1
        await asyncio.sleep(0.5)
        assert pool.open_connections() == 0


async def test_a_full_pool_makes_callers_wait_in_order_and_a_cancelled_wait_passes_its_turn(
    server: Callable[[Serve], Awaitable[Server]],
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await made.read_request(reader)
            writer.write(OK)

    made = await server(serve)
    async with UpstreamPool(1, 1.0) as pool:
        first = await pool.post(made.url, b"{}", {})
        cancelled = asyncio.ensure_future(pool.post(made.url, b"{}", {}))
        third = asyncio.ensure_future(pool.post(made.url, b"{}", {}))
        await asyncio.sleep(0.05)
        assert not cancelled.done() and not third.done()
        await first.read()
        first.release()  # wakes `cancelled`, which is cancelled before it runs
        cancelled.cancel()
        response = await asyncio.wait_for(third, 2)
        assert await response.read() == b"{}"
        response.release()
    assert made.connections == 1


async def test_a_connect_refused_is_an_upstream_error() -> None:
    async with UpstreamPool(4, 1.0) as pool:
        with pytest.raises(UpstreamError, match="could not be reached"):
            await pool.post("http://127.0.0.1:9/", b"{}", {})
        assert pool.open_connections() == 0


@pytest.fixture
def certificate(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl), and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


async def test_https_is_verified_and_kept_alive(certificate: tuple[str, str]) -> None:
    """The real upstream is https: its certificate is checked, and connections are reused."""
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    made = Server(lambda r, w: _answer_each(made, r, w))
    listening = await asyncio.start_server(made.handle, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://127.0.0.1:{listening.sockets[0].getsockname()[1]}/api/v1/chat"
    try:
        # Not signed by an authority this client trusts: no request goes out.
        async with UpstreamPool(4, 2.0) as pool:
            with pytest.raises(UpstreamUnavailable, match="could not be reached"):
                await open_upstream(pool, Deadlines(), url, b"{}", {}, 5)
        assert made.requests == []
        trusting = ssl.create_default_context(cafile=cert)
        async with UpstreamPool(4, 2.0, tls=trusting) as pool:
            for _ in range(2):
                response = await open_upstream(pool, Deadlines(), url, b'{"a": 1}', {}, 5)
                assert response.status == 200 and await response.read() == b"{}"
                response.release()
        assert len(made.requests) == 2
        assert made.requests[0].startswith(b"POST /api/v1/chat HTTP/1.1\r\n")
        assert made.connections == 1  # kept alive (the refused handshake never reached the handler)
    finally:
        listening.close()


async def _answer_each(made: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await made.read_request(reader)
        writer.write(OK)
