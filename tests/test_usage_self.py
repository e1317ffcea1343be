"""Self-service `GET /api/v1/usage`: a key sees its own budgets and usage, and no one else's."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.core.metering import now_us
from gateway.ops import budgeting

from .admin_helpers import call, error, ok, traffic
from .conftest import ADMIN_TOKEN, World

PATH = "/api/v1/usage"


def _usage(body: dict[str, Any], period: str) -> dict[str, Any]:
    return next(u for u in body["usage"] if u["period"] == period)


async def test_own_budgets_and_usage(world: World) -> None:
    laptop, phone, bob = await world.key("alice"), await world.key("alice"), await world.key("bob")
    await world.budget("key", laptop["id"], "10")
    await world.budget("user", "alice", "20", period="weekly")
    await world.budget("team", "eng", "50", period="monthly")
    await world.budget("user", "bob", "1")
    await world.budget("key", bob["id"], "2")
    await world.budget("user", "carol", "3")
    await traffic(world, laptop["key"], (3, "openai/gpt-oss-20b"), (2, "openai/gpt-oss-120b"))
    await traffic(world, phone["key"], (1, "google/gemini-2.5-flash"))
    await traffic(world, bob["key"], (4, "openai/gpt-oss-20b"))
    # Not charged: upstream refused it.
    refused = await world.client.post(
        "/api/v1/chat",
        json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:500"}]},
        headers={"Authorization": f"Bearer {laptop['key']}"},
    )
    assert refused.status == 500

    body = await ok(world, "GET", PATH, token=laptop["key"])
    assert body["key"] == {"id": laptop["id"], "user": "alice", "team": "eng"}
    budgets = {(b["scope"], b["subject"], b["period"]): b for b in body["budgets"]}
    assert set(budgets) == {
        ("key", laptop["id"], "daily"),
        ("user", "alice", "weekly"),
        ("team", "eng", "monthly"),
    }
    assert budgets[("key", laptop["id"], "daily")]["spent"] == 0.8
    assert budgets[("user", "alice", "weekly")]["spent"] == 1.8
    # The team budget limits alice too, so its spend (bob's included) is hers to see.
    assert budgets[("team", "eng", "monthly")]["spent"] == 2.2
    assert budgets[("team", "eng", "monthly")]["remaining"] == 47.8
    everything = await world.admin(budgeting.list_budgets, None, None, now_us())
    for budget in body["budgets"]:
        assert budget in everything
    for period in ("daily", "weekly", "monthly"):
        usage = _usage(body, period)
        assert usage["key"] == {"requests": 2, "messages": 5, "credits": 0.8}
        assert usage["user"] == {"requests": 3, "messages": 6, "credits": 1.8}
        assert usage["resets_at"] > usage["window_start"]
    assert _usage(body, "daily")["window_start"].endswith("T00:00:00Z")

    text = str(body)
    for secret in (laptop["key"], phone["key"], bob["key"], bob["id"], phone["id"]):
        assert secret not in text
    assert "bob" not in text and "carol" not in text


async def test_amounts_are_exact_past_15_digits(world: World) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "123456789012.345678")
    await traffic(world, key["key"], (1, "openai/gpt-oss-20b"))
    resp = await call(world, "GET", PATH, token=key["key"])
    assert resp.status == 200
    text = await resp.text()
    assert '"limit": 123456789012.345678' in text and '"remaining": 123456789012.245678' in text
    budget = json.loads(text, parse_float=Decimal)["budgets"][0]
    assert (budget["spent"], budget["remaining"]) == (Decimal("0.1"), Decimal("123456789012.245678"))


async def test_another_users_key_sees_only_their_own(world: World) -> None:
    alice, carol = await world.key("alice"), await world.key("carol")
    await world.budget("user", "alice", "5")
    await world.budget("team", "eng", "5")
    await traffic(world, alice["key"], (2, "openai/gpt-oss-20b"))
    body = await ok(world, "GET", PATH, token=carol["key"])
    assert body["key"] == {"id": carol["id"], "user": "carol", "team": None}
    assert body["budgets"] == []
    for usage in body["usage"]:
        assert usage["key"] == usage["user"] == {"requests": 0, "messages": 0, "credits": 0}


@pytest.mark.parametrize("query", ["?user=bob", "?key=x", "?scope=team&subject=eng"])
async def test_takes_no_parameters(world: World, query: str) -> None:
    """No parameter can point the endpoint at someone else's data (BOLA)."""
    alice = await world.key("alice")
    await error(await call(world, "GET", PATH + query, token=alice["key"]), 400, "invalid_request")


@pytest.mark.parametrize("token", [None, "gwk_not-a-key", ADMIN_TOKEN, "revoked"])
async def test_needs_a_live_gateway_key(admin_world: World, token: str | None) -> None:
    if token == "revoked":
        key = await admin_world.key("alice")
        assert (await call(admin_world, "GET", PATH, token=key["key"])).status == 200
        await ok(admin_world, "DELETE", f"/admin/v1/keys/{key['id']}", 204)
        token = key["key"]
    await error(await call(admin_world, "GET", PATH, token=token), 401, "unauthorized")
