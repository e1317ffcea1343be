"""A lean HTTP/1.1 client for the one upstream: a keep-alive pool, one POST at a time a connection.

aiohttp's `ClientSession.post` is general (redirects, cookies, proxies, tracing, middlewares,
compression, multipart) and costs about three times the CPU of what a POST to one known host
needs: under load it was a quarter of the gateway's instructions a request (docs/performance.md).
This client writes the request in one `write`, parses the answer with httptools (llhttp, the
parser aiohttp itself uses) and keeps connections alive in a pool of at most `limit`, waiting for
one in order when all are busy. Timeouts are the caller's (`Deadlines`), except the TCP connect's.

Every failure to reach upstream or to read its answer is an `UpstreamError`: the caller decides
what it means for the charge.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import cast
from urllib.parse import urlsplit

import httptools

# A connection idle in the pool longer than this is closed (aiohttp's keep-alive default):
# servers close idle connections themselves after some seconds, and a request written on one
# they just closed is lost.
IDLE_SECONDS = 15.0
# Body bytes buffered from upstream before reading from its socket pauses (aiohttp's default).
READ_BUFFER = 1 << 16


class UpstreamError(Exception):
    """Upstream could not be reached, or its answer broke off or could not be parsed."""


class _Origin:
    """Where requests go: scheme, host and port of a URL, and the request line's target."""

    __slots__ = ("host", "host_header", "key", "port", "ssl")

    def __init__(self, scheme: str, host: str, port: int | None, tls: ssl.SSLContext | None) -> None:
        self.host = host
        self.ssl: ssl.SSLContext | None = (tls or ssl.create_default_context()) if scheme == "https" else None
        default = 443 if self.ssl else 80
        self.port = port or default
        shown = f"[{host}]" if ":" in host else host
        self.host_header = shown if self.port == default else f"{shown}:{self.port}"
        # The pool's key: connections to the same origin serve each other's requests.
        self.key = (scheme, host, self.port)


class UpstreamResponse(asyncio.Protocol):
    """One connection to upstream, and the answer being read on it (a Protocol of its own)."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._complete = False  # the whole answer is in
        self._keep_alive = False  # and upstream keeps the connection open after it
        self._error: UpstreamError | None = None
        self._closed = False
        self._length_known = False  # Content-Length or chunked: the body ends without EOF
        self.idle_since = 0.0

    # The request.

    def send(self, head: bytes, body: bytes) -> asyncio.Future[None]:
        """Write the request; the future is done once the answer's headers are in."""
        loop = asyncio.get_running_loop()
        self._headers_done = loop.create_future()
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self._headers_done

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._complete or self._headers_done is None:
            # Bytes nobody asked for (after a whole answer, or on an idle connection): not reusable.
            self._fail(UpstreamError("upstream sent bytes outside of an answer"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream asked to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"upstream's answer could not be parsed: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.pool._lost(self)
        if self._complete:
            return
        headers = self._headers_done
        if headers is not None and headers.done() and not self._length_known and self._error is None:
            # An answer without a length ends when upstream closes the connection.
            self._complete = True
            self._wake()
            return
        self._fail(UpstreamError("upstream closed the connection" + (f" ({exc})" if exc else "")))

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks.

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = {}
            return
        self.status = status
        encoding = self.headers.get("transfer-encoding", "")
        self._length_known = "content-length" in self.headers or "chunked" in encoding.lower()
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > READ_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # the end of an interim answer
        # Asked now: once the callback returns, the parser is ready for another message.
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._wake()

    # Reading the answer.

    def read_nowait(self) -> bytes:
        """What has arrived of the body and not been read yet (b"" if nothing)."""
        if not self._chunks:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self._closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def at_eof(self) -> bool:
        """Whether the whole body has been read."""
        return self._complete and not self._chunks

    def is_complete(self) -> bool:
        """Whether the whole body has arrived (read or not)."""
        return self._complete

    async def readany(self) -> bytes:
        """The next part of the body, waiting for it; b"" at its end. UpstreamError if it broke off."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    async def read(self) -> bytes:
        """The rest of the body, once it has all arrived."""
        parts: list[bytes] = []
        while True:
            chunk = await self.readany()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it can serve another."""
        reusable = (
            self._complete
            and not self._chunks
            and not self._closed
            and self._error is None
            and self._keep_alive
        )
        self.pool._release(self, reusable)

    def _reset(self) -> None:
        """Ready for the next request on this connection."""
        self.status = 0
        self.headers = {}
        # The parser goes on: llhttp parses the answers of a keep-alive connection one after another.
        self._headers_done = None
        self._complete = False
        self._keep_alive = False
        self._length_known = False

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_exception(error)
            # Retrieved or not, it is reported through the call that waits for it.
            self._headers_done.exception()
        self._wake()
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to upstream origins, at most `limit` open at once (idle or busy)."""

    def __init__(
        self,
        limit: int,
        connect_timeout: float,
        idle_seconds: float = IDLE_SECONDS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: how https origins are verified (default: the system's certificate authorities)."""
        self.limit = limit
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._idle: dict[tuple[str, str, int], list[UpstreamResponse]] = {}
        self._busy: set[UpstreamResponse] = set()
        self._connecting = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open_connections(self) -> int:
        """Connections open right now: in use, and idle for reuse."""
        return len(self._busy) + sum(len(conns) for conns in self._idle.values())

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST `body` to `url`; the answer once its headers are in. Release it when done."""
        origin, target = self._origin(url)
        lines = [f"POST {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise UpstreamError(f"the {name} header has a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Accept-Encoding: identity\r\nContent-Length: {len(body)}\r\n\r\n")
        head = "".join(lines).encode("latin-1")
        conn = await self._acquire(origin)
        try:
            await conn.send(head, body)
        except BaseException:
            conn.close()
            self._release(conn, False)
            raise
        return conn

    def _origin(self, url: str) -> tuple[_Origin, str]:
        known = self._origins.get(url)
        if known is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError(f"the upstream URL {url!r} is not an http(s) URL")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            known = self._origins[url] = (_Origin(parts.scheme, parts.hostname, parts.port, self.tls), target)
        return known

    async def _acquire(self, origin: _Origin) -> UpstreamResponse:
        """A connection to `origin`: an idle one, a new one, or, with `limit` open, the next freed."""
        key = origin.key
        if self.closed:
            raise UpstreamError("the upstream pool is closed")
        now = time.monotonic()
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed by upstream
            if conn._closed or now - conn.idle_since > self.idle_seconds:
                conn.close()
                continue
            conn._reset()
            self._busy.add(conn)
            return conn
        while self.open_connections() + self._connecting >= self.limit:
            if not self._close_one_idle():
                waiter = asyncio.get_running_loop().create_future()
                self._waiting.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        self._wake_one()  # woken, then cancelled: the room goes to the next
                    elif waiter in self._waiting:
                        self._waiting.remove(waiter)
                    raise
                return await self._acquire(origin)
        self._connecting += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamResponse(self, key),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError:
            self._wake_one()
            raise UpstreamError(f"the TCP connect to upstream took over {self.connect_timeout:g} s") from None
        except OSError as exc:
            self._wake_one()
            raise UpstreamError(f"upstream could not be reached: {exc}") from None
        except BaseException:
            self._wake_one()
            raise
        finally:
            self._connecting -= 1
        self._busy.add(conn)
        return conn

    def _close_one_idle(self) -> bool:
        """Close one idle connection (of any origin) to make room; whether there was one."""
        for conns in self._idle.values():
            if conns:
                conns.pop(0).close()
                return True
        return False

    def _release(self, conn: UpstreamResponse, reusable: bool) -> None:
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        if reusable and not self.closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
            self._sweep_later()
        else:
            conn.close()
        self._wake_one()

    def _lost(self, conn: UpstreamResponse) -> None:
        """A connection closed (by either side): it no longer counts."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep_later(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.idle_seconds, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for too long."""
        self._sweeper = None
        now = time.monotonic()
        for conns in self._idle.values():
            for conn in [c for c in conns if now - c.idle_since > self.idle_seconds]:
                conns.remove(conn)
                conn.close()
        if any(self._idle.values()):
            self._sweep_later()

    async def close(self) -> None:
        """Close every connection; answers being read break off."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)
        # Let the transports' connection_lost callbacks run.
        await asyncio.sleep(0)
