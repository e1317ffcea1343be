"""Helpers for tests of the admin API, the self-service usage endpoint and the CLI's admin commands."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.ops.cli import main

from .conftest import ADMIN_TOKEN, World


async def call(
    world: World, method: str, path: str, *, token: str | None = ADMIN_TOKEN, **kwargs: Any
) -> Any:
    """An HTTP request to the gateway with `Authorization: Bearer <token>` (none when token is None)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await world.client.request(method, path, headers=headers, **kwargs)


async def ok(world: World, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
    """An admin call that must answer `status`; its JSON body (None for 204)."""
    resp = await call(world, method, path, **kwargs)
    assert resp.status == status, await resp.text()
    return None if status == 204 else await resp.json()


async def error(resp: Any, status: int, kind: str, field: str | None = None) -> dict[str, Any]:
    """Assert a gateway error answer; its `error` object."""
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["type"] == kind, body
    assert body["error"]["message"]
    if field is not None:
        assert body["error"].get("field") == field, body
    return dict(body["error"])


async def traffic(world: World, key: str, *calls: tuple[int, str]) -> list[str]:
    """Charged chat requests: (messages, model) each; their request ids."""
    ids = []
    for messages, model in calls:
        resp = await world.chat(key, messages=messages, model=model)
        assert resp.status == 200, await resp.text()
        ids.append(resp.headers["X-Request-Id"])
    return ids


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`gateway ARGS` on the test's database (GATEWAY_DATABASE_URL set by the caller): code, out, err.

    Run in a thread: the CLI starts its own event loop.
    """
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """`gateway ARGS --json`, which must succeed; its parsed output."""
    code, out, err = await cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)
