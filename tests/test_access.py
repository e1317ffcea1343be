"""Keys and access (issue 18): allow-lists, expiry, block, rotation, /v1/models, last use, hostile input."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.core.pricing import DEFAULT_PRICES
from gateway.ops import access, services
from gateway.web.auth import write_last_used
from gateway.web.state import KEYS

from .admin_helpers import call, error, ok
from .conftest import World, assert_counters_match_ledger

PRICED = sorted(DEFAULT_PRICES)
SMALL, BIG, LITE, FLASH, PRO = (
    "openai/gpt-oss-20b",
    "openai/gpt-oss-120b",
    "google/gemini-2.5-flash-lite",
    "google/gemini-2.5-flash",
    "google/gemini-2.5-pro",
)
NOT_ALLOWED = "model_not_allowed"
LISTS = {"key": [SMALL, BIG, FLASH], "user": [SMALL, BIG, PRO], "team": [SMALL, BIG, LITE]}


def _user_budget(limit: int) -> dict[str, Any]:
    return {"scope": "user", "subject": "alice", "period": "daily", "limit": limit}


def _in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def _refused(world: World, key: str, model: str, reason: str | None = None) -> dict[str, Any]:
    resp = await world.chat(key, model=model)
    if reason is None:
        return await error(resp, 403, "model_not_allowed")
    body = await error(resp, 401, "unauthorized")
    assert body["reason"] == reason, body
    return body


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)))
async def test_allow_list_matrix(admin_world: World, present: tuple[bool, bool, bool]) -> None:
    """A model must be in every list that applies; the refusal names the models the key may use."""
    w = admin_world
    on_key, on_user, on_team = present
    body: dict[str, Any] = {"user": "alice"}
    if on_key:
        body["models"] = LISTS["key"]
    key = await ok(w, "POST", "/admin/v1/keys", 201, json=body)
    if on_user:
        await ok(w, "PATCH", "/admin/v1/users/alice", json={"models": LISTS["user"]})
    if on_team:
        await ok(w, "PATCH", "/admin/v1/teams/eng", json={"models": LISTS["team"]})
    expected = set(PRICED)
    for applies, name in zip(present, ("key", "user", "team"), strict=True):
        if applies:
            expected &= set(LISTS[name])
    for model in PRICED:
        forwarded = len(w.upstream.received)
        if model in expected:
            resp = await w.chat(key["key"], model=model)
            assert resp.status == 200, await resp.text()
            assert len(w.upstream.received) == forwarded + 1
            continue
        refusal = await _refused(w, key["key"], model)
        assert refusal["allowed"] == sorted(expected)
        assert len(w.upstream.received) == forwarded, "a refused model was forwarded"
    refused = len(PRICED) - len(expected)
    assert len(await w.sql("SELECT 1 FROM ledger")) == len(expected)
    assert await w.sql("SELECT 1 FROM holds") == []
    sample = w.metrics.registry.get_sample_value
    counted = sum(sample("gateway_requests_total", {"model": m, "outcome": NOT_ALLOWED}) or 0 for m in PRICED)
    assert counted == refused
    # /v1/models lists exactly what the key may use.
    listed = await ok(w, "GET", "/v1/models", token=key["key"])
    assert [m["id"] for m in listed["data"]] == sorted(expected)


async def test_allow_list_changed_applies_at_once_here(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "models": [SMALL]})
    assert (await w.chat(key["key"], model=SMALL)).status == 200
    await _refused(w, key["key"], BIG)
    await ok(w, "PATCH", f"/admin/v1/keys/{key['id']}", json={"models": None})
    assert (await w.chat(key["key"], model=BIG)).status == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"models": ["openai/gpt-oss-20b", "acme/secret-model"]}, "acme/secret-model"),
        ({"models": [5]}, "list of model names"),
        ({"models": "openai/gpt-oss-20b"}, "list of model names"),
        ({"models": []}, "is empty"),
        ({"models": ["x"] * 10_000}, "at most 1000"),
        ({"models": [SMALL], "expires_at": "2001-01-01T00:00:00Z"}, "not in the future"),
        ({"models": [SMALL], "expires_at": "next friday"}, "expires_at"),
        ({"models": [SMALL], "expires_at": 12}, "ISO 8601"),
        ({"name": "n" * 201}, "at most 200"),
    ],
)
async def test_bad_key_settings_are_refused_and_change_nothing(
    admin_world: World, body: dict[str, Any], words: str
) -> None:
    w = admin_world
    resp = await call(w, "POST", "/admin/v1/keys", json={"user": "alice", **body})
    assert words in (await error(resp, 400, "invalid_request"))["message"]
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice"})
    before = await w.admin(services.list_keys, None)
    resp = await call(w, "PATCH", f"/admin/v1/keys/{key['id']}", json=body)
    assert words in (await error(resp, 400, "invalid_request"))["message"]
    assert await w.admin(services.list_keys, None) == before
    if "models" in body and "expires_at" not in body:
        resp = await call(w, "PATCH", "/admin/v1/teams/eng", json={"models": body["models"]})
        await error(resp, 400, "invalid_request", "models")
    audited = await w.sql("SELECT action FROM audit_log WHERE actor <> 'internal'")
    assert [a for (a,) in audited] == ["key.create"]


async def test_expiry_is_checked_at_use_not_at_cache_fill(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "expires_at": _in(1.5)})
    assert key["expires_at"] is not None
    assert (await w.chat(key["key"])).status == 200  # cached now, for 2 s
    await asyncio.sleep(1.6)
    await _refused(w, key["key"], SMALL, "expired")
    resp = await call(w, "GET", "/v1/models", token=key["key"])
    assert (await error(resp, 401, "unauthorized"))["reason"] == "expired"
    # Extended: works again.
    await ok(w, "PATCH", f"/admin/v1/keys/{key['id']}", json={"expires_at": _in(3600)})
    assert (await w.chat(key["key"])).status == 200
    await assert_counters_match_ledger(w)


async def test_block_and_unblock(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice"})
    assert (await w.chat(key["key"])).status == 200
    blocked = await ok(w, "POST", f"/admin/v1/keys/{key['id']}/block")
    assert blocked["blocked"] is True
    forwarded = len(w.upstream.received)
    await _refused(w, key["key"], SMALL, "blocked")
    assert len(w.upstream.received) == forwarded
    assert (await ok(w, "POST", f"/admin/v1/keys/{key['id']}/unblock"))["blocked"] is False
    assert (await w.chat(key["key"])).status == 200


async def test_admission_refuses_a_key_blocked_or_expired_after_its_cache_entry(world: World) -> None:
    """The admission's own key check (both backends) sees a block the cache has not seen yet, and
    an expiry set meanwhile."""
    key = await world.key("alice")
    assert (await world.chat(key["key"])).status == 200  # cached
    await world.admin(access.block_key, key["id"], now_us())
    await _refused(world, key["key"], SMALL, "blocked")
    other = await world.key("alice")
    assert (await world.chat(other["key"])).status == 200  # cached, with no expiry
    expire = text("UPDATE api_keys SET expires_at = 1 WHERE id = :id")  # behind the cache's back
    await world.store.run(lambda conn: conn.execute(expire, {"id": other["id"]}))
    await _refused(world, other["key"], SMALL, "expired")
    assert await world.sql("SELECT 1 FROM holds") == []


async def test_rotation_with_grace(admin_world: World) -> None:
    w = admin_world
    old = await ok(
        w,
        "POST",
        "/admin/v1/keys",
        201,
        json={"user": "alice", "name": "svc", "models": [SMALL, BIG], "expires_at": _in(3600)},
    )
    await ok(w, "PUT", "/admin/v1/budgets", json=_user_budget(1))
    new = await ok(w, "POST", f"/admin/v1/keys/{old['id']}/rotate", 201, json={"grace_seconds": 2})
    assert new["id"] != old["id"] and new["key"] != old["key"] and new["rotated_from"] == old["id"]
    assert (new["user"], new["name"], new["models"], new["expires_at"]) == (
        "alice",
        "svc",
        sorted([SMALL, BIG]),
        old["expires_at"],
    )
    listed = {k["id"]: k for k in await ok(w, "GET", "/admin/v1/keys?user=alice")}
    assert listed[old["id"]]["rotated_to"] == new["id"] and listed[old["id"]]["revoked_at"] is not None
    # Both work during the grace; the user's budget counts spend through either once.
    for secret in (old["key"], new["key"]) * 2:
        assert (await w.chat(secret, messages=2)).status == 200
    budget = (await ok(w, "GET", "/admin/v1/budgets?scope=user&subject=alice"))[0]
    assert budget["spent"] == 0.8
    resp = await call(w, "POST", f"/admin/v1/keys/{old['id']}/rotate", json={"grace_seconds": 2})
    assert "already been rotated" in (await error(resp, 409, "conflict"))["message"]
    await asyncio.sleep(2.1)
    await _refused(w, old["key"], SMALL, "revoked")
    assert (await w.chat(new["key"])).status == 200
    resp = await call(w, "POST", f"/admin/v1/keys/{old['id']}/rotate")
    assert "revoked" in (await error(resp, 409, "conflict"))["message"]
    await assert_counters_match_ledger(w)


async def test_rotation_moves_the_key_budget_with_what_it_spent(admin_world: World) -> None:
    """A key budget is no fresh allowance after a rotation: the new key goes on from what was spent."""
    w = admin_world
    old = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "name": "svc"})
    limit = {"scope": "key", "subject": old["id"], "period": "daily", "limit": 1}
    await ok(w, "PUT", "/admin/v1/budgets", json=limit)
    assert (await w.chat(old["key"], messages=8)).status == 200  # 0.8 of 1
    new = await ok(w, "POST", f"/admin/v1/keys/{old['id']}/rotate", 201, json={"grace_seconds": 0})
    budgets = await ok(w, "GET", f"/admin/v1/budgets?scope=key&subject={new['id']}")
    assert [(b["spent"], b["remaining"]) for b in budgets] == [(0.8, 0.2)]
    assert await ok(w, "GET", f"/admin/v1/budgets?scope=key&subject={old['id']}") == []
    await error(await w.chat(new["key"], messages=3), 402, "budget_exceeded")
    assert (await w.chat(new["key"], messages=2)).status == 200
    await error(await w.chat(new["key"], messages=1), 402, "budget_exceeded")
    await assert_counters_match_ledger(w)


async def test_during_the_grace_the_old_key_spends_from_the_key_budget_that_moved(admin_world: World) -> None:
    """Requests through a rotated key in its grace count on its key budget, which moved to the new key;
    rotated again, the first key follows to the newest."""
    w = admin_world
    old = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "name": "svc"})
    await ok(
        w,
        "PUT",
        "/admin/v1/budgets",
        json={"scope": "key", "subject": old["id"], "period": "daily", "limit": 1},
    )
    new = await ok(w, "POST", f"/admin/v1/keys/{old['id']}/rotate", 201, json={"grace_seconds": 3600})
    assert (await w.chat(old["key"], messages=6)).status == 200
    assert (await w.chat(new["key"], messages=3)).status == 200
    (budget,) = await ok(w, "GET", f"/admin/v1/budgets?scope=key&subject={new['id']}")
    assert (budget["spent"], budget["remaining"]) == (0.9, 0.1)
    await error(await w.chat(old["key"], messages=2), 402, "budget_exceeded")
    newest = await ok(w, "POST", f"/admin/v1/keys/{new['id']}/rotate", 201, json={"grace_seconds": 3600})
    assert (await ok(w, "GET", "/admin/v1/keys?user=alice"))[0]["rotated_to"] == newest["id"]
    await error(await w.chat(old["key"], messages=2), 402, "budget_exceeded")
    assert (await w.chat(old["key"], messages=1)).status == 200
    for key in (old, new, newest):
        await error(await w.chat(key["key"], messages=1), 402, "budget_exceeded")
    (budget,) = await ok(w, "GET", f"/admin/v1/budgets?scope=key&subject={newest['id']}")
    assert (budget["spent"], budget["remaining"]) == (1, 0)
    await assert_counters_match_ledger(w)


async def test_v1_models_with_the_openai_sdk(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "models": [PRO, SMALL]})
    await ok(w, "PUT", "/admin/v1/budgets", json=_user_budget(0))
    base = str(w.client.make_url("/v1"))
    async with openai.AsyncOpenAI(api_key=key["key"], base_url=base, max_retries=0) as client:
        models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [PRO, SMALL]  # never refused for budget
    assert [m.owned_by for m in models] == ["google", "openai"]
    assert models[0].model_extra == {"credits_per_message": 3}
    async with openai.AsyncOpenAI(api_key="gwk_wrong", base_url=base, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    everything = await ok(w, "GET", "/api/v1/models", token=(await w.key("bob"))["key"])
    assert [m["id"] for m in everything["data"]] == PRICED


async def test_last_used_at_at_most_once_a_minute(world: World) -> None:
    key = await world.key("alice")
    assert (await world.admin(services.key_object, key["id"]))["last_used_at"] is None
    assert (await world.chat(key["key"])).status == 200
    keys = world.client.app[KEYS]
    await write_last_used(keys, world.store.run)
    first = (await world.admin(services.key_object, key["id"]))["last_used_at"]
    assert first is not None
    keys.clear()
    assert (await world.chat(key["key"])).status == 200
    await write_last_used(keys, world.store.run)
    assert (await world.admin(services.key_object, key["id"]))["last_used_at"] == first


async def test_duration_parsing() -> None:
    assert access.parse_duration("ttl", "30d") == 30 * 86_400
    assert access.parse_duration("ttl", "90m") == 5400
    assert access.parse_duration("grace", "0", allow_zero=True) == 0
    for bad in ("0", "0d", "-1d", "1y", "", "1.5h"):
        with pytest.raises(Exception, match="ttl"):
            access.parse_duration("ttl", bad)


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PATCH", "/admin/v1/teams/" + "t" * 201, {"models": None}, "name"),
        ("PATCH", "/admin/v1/users/" + "u" * 201, {"models": None}, "name"),
        ("PATCH", "/admin/v1/teams/eng", {}, None),
        ("PATCH", "/admin/v1/teams/eng", {"models": None, "extra": 1}, "extra"),
        ("POST", "/admin/v1/keys/" + "k" * 201 + "/block", None, "id"),
        ("POST", "/admin/v1/keys/{id}/rotate", {"grace_seconds": "1h"}, "grace_seconds"),
        ("POST", "/admin/v1/keys/{id}/rotate", {"grace_seconds": True}, "grace_seconds"),
        ("POST", "/admin/v1/keys/{id}/rotate", {"grace_seconds": 10**12}, "grace_seconds"),
        ("PATCH", "/admin/v1/keys/{id}", {"models": [[SMALL]]}, "models"),
        ("PATCH", "/admin/v1/keys/{id}", {"expires_at": "9" * 100}, "expires_at"),
    ],
)
async def test_hostile_input_is_a_clear_400(
    admin_world: World, method: str, path: str, body: dict[str, Any] | None, field: str | None
) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice"})
    before = await w.sql("SELECT COUNT(*) FROM audit_log")
    resp = await call(w, method, path.replace("{id}", key["id"]), json=body)
    await error(resp, 400, "invalid_request", field)
    assert await w.sql("SELECT COUNT(*) FROM audit_log") == before
