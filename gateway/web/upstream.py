"""Calling upstream: the one pool (`upstream_client`), header filtering, timeouts, and the relay.

Upstream read errors (`UpstreamError`) and client write errors are caught in separate `try`
blocks: they mean different things for the charge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.jsonout import document, scanner
from gateway.web.upstream_client import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)

# A TCP connect (and TLS handshake) to upstream taking longer than this is a 502.
CONNECT_TIMEOUT_SECONDS = 10.0
# Headers relayed from upstream's response to the client; everything else is upstream's business.
RELAYED_HEADERS = ("Content-Type", "Cache-Control", "Retry-After")
_RELAYED = tuple((name, name.lower()) for name in RELAYED_HEADERS)
# Headers copied from the client's request to upstream. The caller's Authorization never is.
FORWARDED_HEADERS = ("Content-Type", "Accept", "User-Agent")
# Token counts past what the ledger's integer columns hold are not believed (nor recorded).
MAX_TOKENS = 2**31 - 1
# A stream's partial line is kept only this long while looking for a usage chunk.
MAX_USAGE_LINE = 1 << 20
# What aiohttp adds to each chunk of a chunked body (its length in hex and two CRLFs), at most.
CHUNK_FRAMING = 32
# Upstream's JSON, read by `jsonout.document`.
_SCAN = scanner(json.JSONDecoder())
# How early a timer may fire (see `Deadlines._expire`).
CLOCK_RESOLUTION_SECONDS = 0.001


def new_session(max_connections: int, connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> UpstreamPool:
    """The one pool used for every upstream call, of at most `max_connections` connections.

    The pool is as large as the requests a process takes at once, so none waits for a connection.
    The connect timeout is the TCP connect's (and TLS handshake's) alone: a request waiting for a
    pooled connection is not timed by it, nor reported as an upstream timeout while upstream sat
    idle.
    """
    return UpstreamPool(max_connections, connect_timeout)


def open_connections(pool: UpstreamPool) -> int:
    """Connections to upstream open right now: in use, and idle in the pool for reuse."""
    return 0 if pool.closed else pool.open_connections()


def upstream_headers(client_headers: Mapping[str, str], api_key: str | None) -> dict[str, str]:
    """The headers sent upstream: a few of the client's, and the gateway's own key."""
    headers = {name: client_headers[name] for name in FORWARDED_HEADERS if name in client_headers}
    headers.setdefault("Content-Type", "application/json")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Deadlines:
    """Timeouts for many calls at once, with one timer for all those of the same length.

    `asyncio.timeout` arms a timer of its own for each call and cancels it after: under uvloop,
    2.5% of a request's instructions (callgrind). Calls given the same number of seconds expire in
    the order they start, so one timer, set for the oldest still waiting, serves them all. A call
    past its deadline is cancelled and, as with `asyncio.timeout`, its CancelledError becomes
    TimeoutError, unless the task was cancelled from elsewhere too.
    """

    def __init__(self) -> None:
        # Calls waiting, by length, oldest first (dicts keep insertion order).
        self.waiting: dict[float, dict[Deadline, None]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def expiring(self, seconds: float) -> Deadline:
        """`with deadlines.expiring(s):` raises TimeoutError in the task if the block takes over `s`."""
        return Deadline(self, seconds)

    def arm(self, loop: asyncio.AbstractEventLoop, deadline: Deadline) -> None:
        """Set the timer of the deadline's length, if none is set (an older deadline's goes first)."""
        if deadline.seconds not in self._timers:
            self._timers[deadline.seconds] = loop.call_at(deadline.when, self._expire, deadline.seconds)

    def _expire(self, seconds: float) -> None:
        """Cancel the calls of this length past their deadline; set the timer for the next one."""
        del self._timers[seconds]
        waiting = self.waiting[seconds]
        loop = asyncio.get_running_loop()
        # Timers fire to the loop's clock resolution (uvloop's: a millisecond), so possibly that
        # early: a deadline within it is due, or the timer would be set again and again meanwhile.
        now = loop.time() + CLOCK_RESOLUTION_SECONDS
        for deadline in list(waiting):
            if deadline.when > now:
                self.arm(loop, deadline)
                return
            del waiting[deadline]
            deadline.expired = True
            deadline.task.cancel()


class Deadline:
    """One call's deadline: a context manager, like `asyncio.timeout`'s, kept by `Deadlines`."""

    __slots__ = ("cancelling", "deadlines", "expired", "seconds", "task", "waiting", "when")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self.deadlines = deadlines
        self.seconds = seconds
        self.expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task")
        self.task = task
        self.cancelling = task.cancelling()
        loop = task.get_loop()
        self.when = loop.time() + self.seconds
        waiting = self.deadlines.waiting.get(self.seconds)
        if waiting is None:
            waiting = self.deadlines.waiting[self.seconds] = {}
        self.waiting = waiting
        waiting[self] = None
        self.deadlines.arm(loop, self)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.waiting.pop(self, None)
        if self.expired and self.task.uncancel() <= self.cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from error


async def open_upstream(
    pool: UpstreamPool,
    deadlines: Deadlines,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
) -> UpstreamResponse:
    """POST to upstream; its response once the headers are in (504 / 502 otherwise). Release it.

    Only this call's own deadline running out is a 504. The pool's TCP connect timeout is an
    `UpstreamError`: a connection that could not be made is a 502.
    """
    try:
        with deadlines.expiring(timeout):
            return await pool.post(url, body, headers)
    except UpstreamError as exc:
        raise UpstreamUnavailable(
            f"The upstream API could not be reached ({exc}); nothing was charged. Retry later."
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(
            f"The upstream API sent no response headers within {timeout:g} seconds; nothing was charged."
        ) from None


def relayed_headers(upstream: UpstreamResponse) -> dict[str, str]:
    """The upstream response headers the client gets."""
    got = upstream.headers
    return {name: got[low] for name, low in _RELAYED if low in got}


@dataclass
class Usage:
    """Token counts reported by upstream, if any."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    def take(self, document: Any) -> None:
        """Record the `usage` object of a response or stream chunk, when it has one."""
        usage = document.get("usage") if isinstance(document, dict) else None
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
                setattr(self, name, value)


def usage_from_body(body: bytes) -> Usage:
    """Token usage from a whole JSON body; empty when there is none or the body is not JSON."""
    usage = Usage()
    if b'"usage"' in body:
        try:
            usage.take(document(body.decode("utf-8"), _SCAN))
        except (ValueError, RecursionError):
            pass
    return usage


@dataclass
class SseUsageScanner:
    """Finds the usage chunk in an SSE stream without holding the stream back."""

    usage: Usage = field(default_factory=Usage)
    _partial: bytes = b""

    def feed(self, chunk: bytes) -> None:
        """Look at one relayed chunk; only lines mentioning "usage" are parsed."""
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data if len(data) <= MAX_USAGE_LINE else b""
            return
        self._partial = data[end + 1 :] if len(data) - end - 1 <= MAX_USAGE_LINE else b""
        complete = data[: end + 1]
        if b'"usage"' not in complete:
            return
        for line in complete.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    self.usage.take(document(line[5:].decode("utf-8"), _SCAN))
                except (ValueError, RecursionError):
                    continue


async def read_whole(message: web.Request, timeout: float) -> bytes:
    """The whole body of a request; TimeoutError if it takes over `timeout` to arrive.

    A body already all here (a small one comes with its headers) is read without a timer.
    """
    if message.content.is_eof():
        return await message.read()
    async with asyncio.timeout(timeout):
        return await message.read()


async def read_upstream_body(upstream: UpstreamResponse, timeout: float) -> bytes:
    """A whole non-streamed upstream body; a body that breaks off is 502 (and not charged).

    A body already all here (a small one comes with its headers) is read without a timer."""
    try:
        if upstream.is_complete():
            return await upstream.read()
        async with asyncio.timeout(timeout):
            return await upstream.read()
    except (TimeoutError, UpstreamError) as exc:
        log.warning("upstream body broke off: %r", exc)
        raise UpstreamUnavailable(
            "The upstream API broke off its answer before it was complete; nothing was charged. Retry later."
        ) from None


@dataclass
class StreamResult:
    """What happened while relaying a stream."""

    client_gone: bool = False
    upstream_failed: bool = False
    upstream_done_at: float = 0.0


async def relay_stream(
    upstream: UpstreamResponse,
    response: web.StreamResponse,
    client: asyncio.BaseTransport | None,
    scanner: SseUsageScanner,
    idle_timeout: float,
    write_timeout: float,
) -> StreamResult:
    """Relay upstream's body chunk by chunk as it arrives, until it ends or either side fails.

    A client that takes over `write_timeout` to accept a chunk counts as gone: it would otherwise
    hold the relay, and the upstream connection, for as long as it cares not to read.
    """
    result = StreamResult()
    while True:
        try:
            # What has arrived already is taken without a timer; only a wait for more gets one.
            chunk = upstream.read_nowait()
            if not chunk and not upstream.at_eof():
                async with asyncio.timeout(idle_timeout):
                    chunk = await upstream.readany()
        except TimeoutError:
            log.warning("upstream stream idle for %ss; ending it", idle_timeout)
            result.upstream_failed = True
            break
        except UpstreamError as exc:
            log.warning("upstream stream broke: %s", exc)
            result.upstream_failed = True
            break
        if not chunk:
            break
        scanner.feed(chunk)
        try:
            if _cannot_wait(client, len(chunk)):
                await response.write(chunk)
            else:
                async with asyncio.timeout(write_timeout):
                    await response.write(chunk)
        except TimeoutError:
            log.warning("client accepted nothing for %ss; dropping it", write_timeout)
            result.client_gone = True
            break
        except (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError):
            result.client_gone = True
            break
    result.upstream_done_at = time.perf_counter()
    return result


def _cannot_wait(client: asyncio.BaseTransport | None, size: int) -> bool:
    """Whether writing `size` bytes to the client returns at once, so it needs no timer.

    aiohttp waits only for a paused transport, and asyncio (or uvloop) pauses one only when its
    buffer goes over the high-water mark: a write that leaves the buffer at or under it cannot wait.
    Asked of the transport itself: uvloop's are not `asyncio.WriteTransport` subclasses.
    """
    try:
        if client is None or client.is_closing():
            return False
        buffered = client.get_write_buffer_size() + size + CHUNK_FRAMING  # type: ignore[attr-defined]
        return bool(buffered <= client.get_write_buffer_limits()[1])  # type: ignore[attr-defined]
    except AttributeError:
        return False


async def end_stream(response: web.StreamResponse) -> None:
    """Finish a relayed stream; a client already gone is not an error."""
    try:
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError):
        log.debug("client left before the end of the stream")
