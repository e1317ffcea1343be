"""The access log (contract §8): one line on stdout per chat request, and per admin call, once it ends.

`GATEWAY_ACCESS_LOG=json` (the default) prints a JSON object a line; `text` the same fields as
one readable `name=value` line; `off` nothing. Lines hold who asked, for what, what became of it
and what it cost: never a key's secret, never a message's content (only how many messages).

A line is a small dict through one JSON encoder, kept in a buffer of whole lines, not a
`logging` record: under load the log costs a few microseconds a request. The buffer is written
out when it nears PIPE_BUF, every FLUSH_SECONDS and when the app stops, so lines reach a pipe
promptly without a system call each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii
from typing import IO, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.core.metering import Caller
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
# Lines are written out once this many bytes wait (under PIPE_BUF, 4096 on Linux), or every second.
FLUSH_BYTES = 3584
# Client-supplied text in a line (an unknown model's name) is cut to this many characters.
MAX_FIELD = 100
# JSON fragments of lines kept for reuse: one per caller, one per route, outcome and model.
MAX_FRAGMENTS = 4096
# The order of the fields in a line, as the contract lists them.
FIELDS = (
    "ts",
    "request_id",
    "method",
    "path",
    "status",
    "outcome",
    "model",
    "key_id",
    "user",
    "team",
    "end_user",
    "tags",
    "messages",
    "credits",
    "stream",
    "duration_ms",
    "upstream_ms",
)


# One encoder for every line: `json.dumps` with options builds a new one each call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


class AccessLog:
    """Writes access log lines in one format ("json", "text" or "off") to a text stream."""

    def __init__(self, fmt: str, out: IO[str] | None = None) -> None:
        self.on = fmt != "off"
        self.fmt = fmt
        self.out = out
        self._second = -1
        self._prefix = ""
        self._pending: list[str] = []
        self._size = 0
        self._fragments: dict[tuple[Any, ...], tuple[str, ...]] = {}

    def timestamp(self) -> str:
        """Now, ISO 8601 UTC to the millisecond; the formatted second is reused within it."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def chat(
        self,
        request: web.Request,
        started: float,
        status: int,
        outcome: str | None,
        request_id: str | None = None,
        model: str | None = None,
        caller: Caller | None = None,
        messages: int | None = None,
        stream: bool | None = None,
        credits: int = 0,
        upstream_ms: float | None = None,
        end_user: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        """The line of a chat request, refused or not; `credits` charged, in micro-credits."""
        duration = round((time.perf_counter() - started) * 1000, 3)
        upstream = round(upstream_ms, 3) if upstream_ms is not None else None
        model = model[:MAX_FIELD] if model is not None else None
        key_id = user = team = None
        if caller is not None:
            key_id, user, team = caller.key_id, caller.user_name, caller.team_name
        stream_text = "null" if stream is None else "true" if stream else "false"
        if self.fmt != "json":
            self._add(
                f"ts={self.timestamp()} request_id={_text(request_id)} method={_text(request.method)} "
                f"path={_text(request.path)} status={status} outcome={_text(outcome)} model={_text(model)} "
                f"key_id={_text(key_id)} user={_text(user)} team={_text(team)} "
                f"end_user={_text(end_user)} tags={_text_value(list(tags))} "
                f"messages={'-' if messages is None else messages} credits={credits / 1_000_000!r} "
                f"stream={'-' if stream is None else stream_text} duration_ms={duration!r} "
                f"upstream_ms={'-' if upstream is None else repr(upstream)}"
            )
            return
        # The JSON line by hand: twice as fast as an encoder walking a dict, and the hot path's.
        # Strings go through the encoder's own escaping, once for each caller and each kind of
        # request (`_fragment`); the request id is the gateway's own 32 hex digits.
        route = (request.method, request.path, outcome, model)
        around_status = self._fragments.get(route)
        if around_status is None:
            around_status = self._keep(
                route,
                f'"method":{_string(request.method)},"path":{_string(request.path)},"status":',
                f',"outcome":{_string(outcome)},"model":{_string(model)},',
            )
        who = (key_id, user, team)
        caller_part = self._fragments.get(who)
        if caller_part is None:
            caller_part = self._keep(
                who, f'"key_id":{_string(key_id)},"user":{_string(user)},"team":{_string(team)},'
            )
        rid = "null" if request_id is None else f'"{request_id}"'
        self._add(
            f'{{"ts":"{self.timestamp()}","request_id":{rid},'
            f"{around_status[0]}{status}{around_status[1]}{caller_part[0]}"
            f'"end_user":{_string(end_user)},"tags":{_encode(list(tags)) if tags else "[]"},'
            f'"messages":{"null" if messages is None else messages},"credits":{credits / 1_000_000!r},'
            f'"stream":{stream_text},'
            f'"duration_ms":{duration!r},"upstream_ms":{"null" if upstream is None else repr(upstream)}}}'
        )

    def _keep(self, key: tuple[Any, ...], *parts: str) -> tuple[str, ...]:
        """Keep the parts of a line that `key` decides, for the next lines (MAX_FRAGMENTS at most)."""
        if len(self._fragments) >= MAX_FRAGMENTS:
            self._fragments.clear()  # client-chosen model names could otherwise grow it for ever
        self._fragments[key] = parts
        return parts

    def admin(self, request: web.Request, started: float, status: int) -> None:
        """The line of an admin call: what was called and how it ended."""
        self.write(
            {
                "ts": self.timestamp(),
                "request_id": None,
                "method": request.method,
                "path": request.path,
                "status": status,
                "outcome": None,
                "model": None,
                "key_id": None,
                "user": None,
                "team": None,
                "end_user": None,
                "tags": [],
                "messages": None,
                "credits": None,
                "stream": None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "upstream_ms": None,
            }
        )

    def write(self, entry: dict[str, Any]) -> None:
        """Print one entry in this log's format (buffered: see `flush`)."""
        if self.fmt == "json":
            self._add(_encode(entry))
        else:
            self._add(" ".join(f"{name}={_text_value(value)}" for name, value in entry.items()))

    def _add(self, line: str) -> None:
        self._pending.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write out the lines buffered, whole lines only; a closed or broken stdout is not fatal.

        Not through `sys.stdout`'s own buffer: with PYTHONUNBUFFERED set (as container images
        often do) each line would be a system call, a tenth of a request's cost. One `os.write`
        of whole lines under PIPE_BUF bytes is atomic on a pipe, so the lines of several worker
        processes sharing one stdout never interleave mid-line.
        """
        if not self._pending:
            return
        data = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._size = 0
        out = self.out if self.out is not None else sys.stdout
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1  # a stream without a file (a test's capture): written as it is
        try:
            if fd < 0:
                out.write(data)
                out.flush()
                return
            out.flush()  # anything printed before goes first
            encoded = data.encode("utf-8", "replace")
            while encoded:
                encoded = encoded[os.write(fd, encoded) :]
        except (OSError, ValueError):
            log.warning("access log lines lost: standard output cannot be written")

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: flush every FLUSH_SECONDS, and once more at the end."""
        task = asyncio.get_running_loop().create_task(self._flush_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.flush()

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.flush()


def _string(value: str | None) -> str:
    """A JSON string, or null; ASCII, so no character of it (U+2028...) can break the line."""
    return "null" if value is None else encode_basestring_ascii(value)


_UNSAFE = re.compile(r'[\s"=\\]')


def _text(value: str | None) -> str:
    """A string in a text line: bare when it has no space, quote, `=` or backslash; JSON otherwise."""
    if value is None:
        return "-"
    if value and value.isprintable() and not _UNSAFE.search(value):
        return value
    return encode_basestring_ascii(value)


def _text_value(value: Any) -> str:
    """A value in a text line: bare when it has no space, quote or `=`, JSON otherwise."""
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\') and value.isprintable():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


class LoggedRoutes:
    """Registers routes as a router would, each handler wrapped to log its calls (admin's).

    A wrapper on those handlers alone, not a middleware: aiohttp builds a middleware's partial
    for every request of every route, chat's included.
    """

    def __init__(self, router: web.UrlDispatcher, log: AccessLog) -> None:
        self.router = router
        self.log = log

    def _logged(self, handler: Handler) -> Handler:
        log = self.log

        async def logged(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except (GatewayError, web.HTTPException) as exc:
                status = exc.status
                raise
            finally:
                log.admin(request, started, status)

        return logged

    def add_get(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_get(path, self._logged(handler), **kwargs)

    def add_post(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_post(path, self._logged(handler), **kwargs)

    def add_put(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_put(path, self._logged(handler), **kwargs)

    def add_patch(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_patch(path, self._logged(handler), **kwargs)

    def add_delete(self, path: str, handler: Handler, **kwargs: Any) -> web.AbstractRoute:
        return self.router.add_delete(path, self._logged(handler), **kwargs)
