"""An Axerity-compatible fake upstream, plain JSON and SSE, with scripted faults for trials and tests.

A message whose content starts with `fake:` picks a behaviour (the last such message wins):

    fake:500 / fake:429 / fake:<status>   answer that error status with a JSON error body
    fake:slow:<seconds>                   wait before the response headers
    fake:reset                            close the connection before any response
    fake:drop                             stream: send two chunks, then drop the connection
    fake:stall:<seconds>                  stream: send one chunk, then go silent that long
    fake:badjson                          2xx with a body that is not JSON
    fake:truncate                         2xx announcing more body than it sends, then close

Everything received is recorded in `FakeUpstream.received` (tests read it).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CHUNK_WORDS = ("Hello", " from", " the", " fake", " upstream", ".")
# Larger than any gateway's body limit is likely to be: the fake refuses nothing the gateway passes.
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class Received:
    """One request as upstream saw it."""

    body: dict[str, Any]
    authorization: str | None
    headers: dict[str, str]


@dataclass
class FakeUpstream:
    """The fake's state: what it received, and a delay between stream chunks."""

    received: list[Received] = field(default_factory=list)
    chunk_delay: float = 0.0
    # Set to make every response wait this long before its headers (tests of timeouts).
    header_delay: float = 0.0
    # Keep only the most recent requests (None: all of them, as tests want); a long-running
    # `gateway fake-upstream` must not grow without bound.
    keep: int | None = None
    # Requests being answered now, and the most ever at once (tests of concurrency limits).
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def messages_received(self) -> int:
        """Messages across every request received."""
        return sum(len(r.body.get("messages") or []) for r in self.received)

    def app(self) -> web.Application:
        """The fake upstream as an aiohttp app."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/api/v1/chat", self.chat)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """Answer a chat request as Axerity would, or misbehave as its messages ask."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        self.received.append(Received(body, request.headers.get("Authorization"), dict(request.headers)))
        if self.keep is not None and len(self.received) > 2 * self.keep:
            del self.received[: -self.keep]
        behaviour = _behaviour(body)
        if self.header_delay:
            await asyncio.sleep(self.header_delay)
        if behaviour[0] == "slow":
            await asyncio.sleep(float(behaviour[1]))
        elif behaviour[0] == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        elif behaviour[0].isdigit():
            status = int(behaviour[0])
            return web.json_response(
                {"error": {"message": f"fake upstream error {status}", "code": status}},
                status=status,
                headers={"Retry-After": "1"} if status in (429, 503) else None,
            )
        elif behaviour[0] == "badjson":
            return web.Response(body=b"{not json", content_type="application/json")
        elif behaviour[0] == "truncate":
            response = web.StreamResponse(
                headers={"Content-Length": "1000", "Content-Type": "application/json"}
            )
            await response.prepare(request)
            await response.write(b'{"id": "x", "choi')
            assert request.transport is not None
            request.transport.abort()
            return response
        model = str(body.get("model", ""))
        prompt_tokens = 7 * len(body.get("messages") or [])
        if body.get("stream"):
            return await self._stream(request, model, prompt_tokens, behaviour)
        return web.json_response(_completion(model, prompt_tokens))

    async def _stream(
        self, request: web.Request, model: str, prompt_tokens: int, behaviour: tuple[str, ...]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        ident = "chatcmpl-" + uuid.uuid4().hex[:12]
        for index, word in enumerate(CHUNK_WORDS):
            if behaviour[0] == "drop" and index == 2:
                assert request.transport is not None
                request.transport.abort()
                return response
            if behaviour[0] == "stall" and index == 1:
                await asyncio.sleep(float(behaviour[1]))
            await response.write(_sse(_chunk(ident, model, {"content": word})))
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        final = _chunk(ident, model, {}, finish="stop")
        await response.write(_sse(final))
        usage = _chunk(ident, model, None)
        usage["usage"] = _usage(prompt_tokens)
        await response.write(_sse(usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _behaviour(body: dict[str, Any]) -> tuple[str, ...]:
    chosen: tuple[str, ...] = ("ok",)
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content.startswith("fake:"):
            chosen = tuple(content[5:].split(":"))
    return chosen


def _usage(prompt_tokens: int) -> dict[str, int]:
    completion = len(CHUNK_WORDS)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _completion(model: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(CHUNK_WORDS)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt_tokens),
    }


def _chunk(ident: str, model: str, delta: dict[str, str] | None, finish: str | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _sse(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"
