"""A webhook receiver for alert tests, and an independent check of Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

SECRET = "whsec_" + base64.b64encode(b"a secret of the tests, 32 bytes!").decode()


def verify(secret: str, headers: Any, body: bytes) -> bool:
    """Standard Webhooks verification, written from the specification (not the gateway's code)."""
    key = base64.b64decode(secret[len("whsec_") :]) if secret.startswith("whsec_") else secret.encode()
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > 300:
        return False
    expected = hmac.new(key, f"{msg_id}.{stamp}.{body.decode()}".encode(), hashlib.sha256).digest()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return True
    return False


@dataclass
class Receiver:
    """A webhook endpoint: records each request; `answers` says the status of each (then 200)."""

    answers: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    secret: str = SECRET

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status, text="ok" if status < 300 else "no")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    def events(self) -> list[dict[str, Any]]:
        """Bodies received with a valid signature, in order (raises on an invalid one)."""
        out = []
        for headers, body in self.received:
            assert verify(self.secret, headers, body), headers
            event = json.loads(body)
            assert headers["webhook-id"] == event["id"]
            out.append(event)
        return out

    def delivered(self) -> list[dict[str, Any]]:
        """Each event answered 200 to: what the receiver accepted."""
        return self.events()


async def serve(receiver: Receiver, port: int = 0) -> TestServer:
    server = TestServer(receiver.app(), host="127.0.0.1", port=port)
    await server.start_server()
    return server


async def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something true (waiting on background delivery, not timing it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        await asyncio.sleep(0.1)
