"""The admin HTTP API through the real stack: token checks, every endpoint's answers and errors."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.core.metering import now_us
from gateway.ops import budgeting, services

from .admin_helpers import call, error, ok
from .conftest import ADMIN_TOKEN, World

# Every admin endpoint with a valid request, for the token tests.
ENDPOINTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/v1/teams", {"name": "ops"}),
    ("GET", "/admin/v1/teams", None),
    ("POST", "/admin/v1/users", {"name": "dave", "team": "eng"}),
    ("GET", "/admin/v1/users", None),
    ("POST", "/admin/v1/keys", {"user": "alice"}),
    ("GET", "/admin/v1/keys", None),
    ("DELETE", "/admin/v1/keys/{key}", None),
    ("PUT", "/admin/v1/budgets", {"scope": "team", "subject": "eng", "period": "daily", "limit": 1}),
    ("DELETE", "/admin/v1/budgets", {"scope": "user", "subject": "alice", "period": "daily"}),
    ("GET", "/admin/v1/budgets", None),
    ("GET", "/admin/v1/usage?group_by=team", None),
    ("GET", "/admin/v1/ledger", None),
]


async def _nothing_changed(w: World, key_id: str) -> None:
    assert [t["name"] for t in await w.admin(services.list_teams)] == ["eng"]
    assert [u["name"] for u in await w.admin(services.list_users)] == ["alice", "bob", "carol"]
    keys = await w.admin(services.list_keys, None)
    assert [(k["id"], k["revoked_at"]) for k in keys] == [(key_id, None)]
    budgets = await w.admin(budgeting.list_budgets)
    assert [(b["scope"], b["subject"], b["limit"]) for b in budgets] == [("user", "alice", 5)]


@pytest.mark.parametrize("token", [None, "wrong-token", ADMIN_TOKEN + "x", "gateway-key", "basic"])
async def test_every_endpoint_refuses_a_wrong_token(admin_world: World, token: str | None) -> None:
    w = admin_world
    key = await w.key("alice")
    await w.budget("user", "alice", "5")
    for method, path, body in ENDPOINTS:
        path = path.replace("{key}", key["id"])
        if token == "gateway-key":
            # A user's own gateway key opens no admin endpoint (BFLA).
            resp = await call(w, method, path, token=key["key"], json=body)
        elif token == "basic":
            headers = {"Authorization": "Basic YWRtaW46YWRtaW4="}
            resp = await w.client.request(method, path, json=body, headers=headers)
        else:
            resp = await call(w, method, path, token=token, json=body)
        await error(resp, 401, "unauthorized")
    await _nothing_changed(w, key["id"])
    assert (await w.chat(key["key"])).status == 200


@pytest.mark.parametrize("token", [None, ADMIN_TOKEN])
async def test_every_endpoint_is_disabled_without_a_configured_token(world: World, token: str | None) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "5")
    for method, path, body in ENDPOINTS:
        resp = await call(world, method, path.replace("{key}", key["id"]), token=token, json=body)
        await error(resp, 403, "admin_disabled")
    await _nothing_changed(world, key["id"])


async def test_teams(admin_world: World) -> None:
    w = admin_world
    team = await ok(w, "POST", "/admin/v1/teams", 201, json={"name": "ops"})
    assert team | {"id": 0, "created_at": ""} == {"id": 0, "name": "ops", "created_at": "", "models": None}
    assert team["created_at"].endswith("Z")
    await error(await call(w, "POST", "/admin/v1/teams", json={"name": "ops"}), 409, "conflict", "name")
    listed = await ok(w, "GET", "/admin/v1/teams")
    assert [t["name"] for t in listed] == ["eng", "ops"]
    assert listed[1] == team


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": 5}, "name"),
        ({"name": None}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "nul\x00"}, "name"),
        ({"name": "ok", "colour": "red"}, "colour"),
        ([], None),
        ("ops", None),
    ],
)
async def test_team_bad_fields(admin_world: World, body: Any, field: str | None) -> None:
    resp = await call(admin_world, "POST", "/admin/v1/teams", json=body)
    await error(resp, 400, "invalid_request", field)
    assert len(await admin_world.admin(services.list_teams)) == 1


@pytest.mark.parametrize("raw", [b"", b"not json", b"\xff\xfe", b"[" * 50_000 + b"]" * 50_000])
async def test_body_not_json(admin_world: World, raw: bytes) -> None:
    resp = await call(admin_world, "POST", "/admin/v1/teams", data=raw)
    await error(resp, 400, "invalid_request")


async def test_body_too_large(admin_world: World) -> None:
    big = json.dumps({"name": "x" * (admin_world.settings.max_body_bytes + 1)}).encode()
    resp = await call(admin_world, "POST", "/admin/v1/teams", data=io.BytesIO(big))
    await error(resp, 413, "request_too_large")


async def test_users(admin_world: World) -> None:
    w = admin_world
    user = await ok(w, "POST", "/admin/v1/users", 201, json={"name": "dave", "team": "eng"})
    assert (user["name"], user["team"]) == ("dave", "eng")
    loner = await ok(w, "POST", "/admin/v1/users", 201, json={"name": "erin", "team": None})
    assert loner["team"] is None
    await error(
        await call(w, "POST", "/admin/v1/users", json={"name": "fay", "team": "nope"}),
        404,
        "not_found",
        "team",
    )
    await error(await call(w, "POST", "/admin/v1/users", json={"name": "alice"}), 409, "conflict", "name")
    await error(
        await call(w, "POST", "/admin/v1/users", json={"name": "g", "team": 3}),
        400,
        "invalid_request",
        "team",
    )
    listed = await ok(w, "GET", "/admin/v1/users")
    assert [(u["name"], u["team"]) for u in listed] == [
        ("alice", "eng"),
        ("bob", "eng"),
        ("carol", None),
        ("dave", "eng"),
        ("erin", None),
    ]


async def test_keys_create_list_revoke(admin_world: World) -> None:
    w = admin_world
    key = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "alice", "name": "laptop"})
    assert key["key"].startswith("gwk_") and key["id"].startswith("key_")
    assert (key["user"], key["name"], key["revoked_at"]) == ("alice", "laptop", None)
    other = await ok(w, "POST", "/admin/v1/keys", 201, json={"user": "bob"})
    assert other["name"] is None
    assert (await w.chat(key["key"])).status == 200

    listed = await ok(w, "GET", "/admin/v1/keys?user=alice")
    assert [k["id"] for k in listed] == [key["id"]]
    assert "key" not in listed[0] and key["key"] not in str(listed)
    assert {k["id"] for k in await ok(w, "GET", "/admin/v1/keys")} == {key["id"], other["id"]}
    stored = await w.sql("SELECT key_hash FROM api_keys")
    assert all(key["key"] not in row[0] for row in stored)

    await ok(w, "DELETE", f"/admin/v1/keys/{key['id']}", 204)
    # This process sees the revocation at once, although the key was just cached by a request.
    resp = await w.chat(key["key"])
    await error(resp, 401, "unauthorized")
    await ok(w, "DELETE", f"/admin/v1/keys/{key['id']}", 204)
    revoked = await ok(w, "GET", "/admin/v1/keys?user=alice")
    assert revoked[0]["revoked_at"] is not None
    assert (await w.chat(other["key"])).status == 200


async def test_key_errors(admin_world: World) -> None:
    w = admin_world
    await error(await call(w, "POST", "/admin/v1/keys", json={"user": "nobody"}), 404, "not_found", "user")
    await error(await call(w, "POST", "/admin/v1/keys", json={}), 400, "invalid_request", "user")
    await error(
        await call(w, "POST", "/admin/v1/keys", json={"user": "alice", "name": ["x"]}),
        400,
        "invalid_request",
        "name",
    )
    await error(await call(w, "GET", "/admin/v1/keys?user=nobody"), 404, "not_found", "user")
    await error(await call(w, "GET", "/admin/v1/keys?owner=alice"), 400, "invalid_request", "owner")
    await error(await call(w, "DELETE", "/admin/v1/keys/key_0000000000000000"), 404, "not_found", "id")
    assert await w.sql("SELECT * FROM api_keys") == []


async def test_budgets(admin_world: World) -> None:
    w = admin_world
    key = await w.key("alice")
    body = {"scope": "user", "subject": "alice", "period": "daily", "limit": "0.3"}
    budget = await ok(w, "PUT", "/admin/v1/budgets", json=body)
    assert budget | {"window_start": None, "resets_at": None} == {
        "scope": "user",
        "subject": "alice",
        "period": "daily",
        "limit": 0.3,
        "spent": 0,
        "held": 0,
        "remaining": 0.3,
        "window_start": None,
        "resets_at": None,
        "enforce": True,
        "alert_at": [80, 100],
        "default": False,
        "from_default": None,
        "timezone": "UTC",
        "week_starts": "monday",
        "month_starts_on": 1,
    }
    assert budget["resets_at"].endswith("T00:00:00Z")
    assert (await w.chat(key["key"], messages=2)).status == 200
    # Lowering the limit below what is spent blocks the next request at once.
    lowered = await ok(w, "PUT", "/admin/v1/budgets", json={**body, "limit": 0.1})
    assert (lowered["limit"], lowered["spent"], lowered["remaining"]) == (0.1, 0.2, 0)
    await error(await w.chat(key["key"]), 402, "budget_exceeded")

    await ok(
        w,
        "PUT",
        "/admin/v1/budgets",
        json={"scope": "team", "subject": "eng", "period": "monthly", "limit": 7},
    )
    await ok(
        w,
        "PUT",
        "/admin/v1/budgets",
        json={"scope": "key", "subject": key["id"], "period": "total", "limit": 1},
    )
    listed = await ok(w, "GET", "/admin/v1/budgets")
    assert [(b["scope"], b["subject"], b["period"]) for b in listed] == [
        ("key", key["id"], "total"),
        ("team", "eng", "monthly"),
        ("user", "alice", "daily"),
    ]
    assert listed[0]["resets_at"] is None
    assert await ok(w, "GET", "/admin/v1/budgets?scope=user&subject=alice") == [listed[2]]
    assert await ok(w, "GET", "/admin/v1/budgets?scope=team") == [listed[1]]

    await ok(w, "DELETE", "/admin/v1/budgets", 204, json={k: body[k] for k in ("scope", "subject", "period")})
    assert (await w.chat(key["key"])).status == 200
    gone = {k: body[k] for k in ("scope", "subject", "period")}
    await error(await call(w, "DELETE", "/admin/v1/budgets", json=gone), 404, "not_found", "subject")


async def test_budget_amounts_are_exact_past_15_digits(admin_world: World) -> None:
    """A float keeps ~16 digits (123456789012.34567): the limit goes in and comes out as written."""
    w = admin_world
    # Sent as raw text: aiohttp's json= would round the number through a float on the way in.
    raw = b'{"scope": "team", "subject": "eng", "period": "monthly", "limit": 123456789012.345678}'
    resp = await call(w, "PUT", "/admin/v1/budgets", data=raw)
    assert resp.status == 200, await resp.text()
    answered = await resp.text()
    assert '"limit": 123456789012.345678' in answered
    assert '"remaining": 123456789012.345678' in answered
    assert await w.sql("SELECT limit_micros FROM budgets") == [(123456789012345678,)]
    listed = await (await call(w, "GET", "/admin/v1/budgets")).text()
    assert json.loads(listed, parse_float=Decimal)[0]["limit"] == Decimal("123456789012.345678")
    assert json.loads(listed, parse_float=Decimal)[0]["remaining"] == Decimal("123456789012.345678")
    await error(
        await call(w, "PUT", "/admin/v1/budgets", data=raw.replace(b"345678}", b"3456789}")),
        400,
        "invalid_request",
        "limit",
    )
    for absurd in (b"1e999999", b"1.0000000000000000000000000001"):
        body = b'{"scope": "team", "subject": "eng", "period": "daily", "limit": ' + absurd + b"}"
        await error(await call(w, "PUT", "/admin/v1/budgets", data=body), 400, "invalid_request", "limit")


async def test_a_refusal_writes_small_amounts_as_decimals(admin_world: World) -> None:
    """The 402 body on the chat path: 0.000001, not the float's 1e-06."""
    w = admin_world
    key = await w.key("alice")
    await w.budget("user", "alice", "0.000001")
    resp = await w.chat(key["key"])
    assert resp.status == 402
    text = await resp.text()
    assert '"limit": 0.000001' in text and '"remaining": 0.000001' in text and '"cost": 0.1' in text
    refusal = json.loads(text, parse_float=Decimal)["error"]
    assert (refusal["limit"], refusal["spent"], refusal["cost"]) == (Decimal("0.000001"), 0, Decimal("0.1"))


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"scope": "org", "subject": "eng", "period": "daily", "limit": 1}, 400, "scope"),
        ({"scope": "team", "subject": "eng", "period": "hourly", "limit": 1}, 400, "period"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": -1}, 400, "limit"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": "lots"}, 400, "limit"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": 0.0000001}, 400, "limit"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": True}, 400, "limit"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": 1e20}, 400, "limit"),
        ({"scope": "team", "subject": "eng", "period": "daily"}, 400, "limit"),
        ({"scope": "team", "subject": 7, "period": "daily", "limit": 1}, 400, "subject"),
        ({"scope": "team", "subject": "eng", "period": "daily", "limit": 1, "x": 1}, 400, "x"),
        ({"scope": "team", "subject": "nope", "period": "daily", "limit": 1}, 404, "team"),
        ({"scope": "user", "subject": "nope", "period": "daily", "limit": 1}, 404, "user"),
        ({"scope": "key", "subject": "key_nope", "period": "daily", "limit": 1}, 404, "subject"),
    ],
)
async def test_budget_bad_fields(admin_world: World, body: dict[str, Any], status: int, field: str) -> None:
    resp = await call(admin_world, "PUT", "/admin/v1/budgets", json=body)
    await error(resp, status, "invalid_request" if status == 400 else "not_found", field)
    assert await admin_world.sql("SELECT * FROM budgets") == []


async def test_budget_list_and_delete_errors(admin_world: World) -> None:
    w = admin_world
    await error(await call(w, "GET", "/admin/v1/budgets?subject=eng"), 400, "invalid_request", "subject")
    await error(await call(w, "GET", "/admin/v1/budgets?scope=org"), 400, "invalid_request", "scope")
    await error(await call(w, "GET", "/admin/v1/budgets?scope=user&subject=nobody"), 404, "not_found", "user")
    await error(
        await call(w, "DELETE", "/admin/v1/budgets", json={"scope": "team", "subject": "eng"}),
        400,
        "invalid_request",
        "period",
    )
    await error(
        await call(
            w,
            "DELETE",
            "/admin/v1/budgets",
            json={"scope": "team", "subject": "eng", "period": "daily", "limit": 1},
        ),
        400,
        "invalid_request",
        "limit",
    )


@pytest.mark.parametrize(
    "path",
    ["/admin/v1/teams?x=1", "/admin/v1/users?team=eng", "/admin/v1/budgets?user=alice"],
)
async def test_unknown_query_parameters_are_refused(admin_world: World, path: str) -> None:
    await error(await call(admin_world, "GET", path), 400, "invalid_request")


async def test_wrong_method_and_unknown_path(admin_world: World) -> None:
    resp = await call(admin_world, "PATCH", "/admin/v1/teams", json={"name": "x"})
    assert resp.status == 405 and (await resp.json())["error"]["type"] == "method_not_allowed"
    resp = await call(admin_world, "GET", "/admin/v1/nothing")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"


async def test_http_and_service_share_answers(admin_world: World) -> None:
    """The HTTP body is the services' JSON, so the CLI's --json prints the same."""
    w = admin_world
    await w.budget("team", "eng", "3")
    assert await ok(w, "GET", "/admin/v1/budgets") == await w.admin(
        budgeting.list_budgets, None, None, now_us()
    )
    assert await ok(w, "GET", "/admin/v1/users") == await w.admin(services.list_users)
