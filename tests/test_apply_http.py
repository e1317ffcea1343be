"""`POST /admin/v1/apply`, the HTTP twin of `gateway apply`, and an apply racing admissions."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from gateway.core.metering import now_us
from gateway.ops import apply, budgeting, ledger, services
from gateway.ops.orgfile import parse
from gateway.web.openapi import SPEC

from .admin_helpers import call, error, ok
from .conftest import ADMIN_TOKEN, World, assert_counters_match_ledger
from .test_apply import ORG, PRICED
from .test_openapi import _check, _schema


async def test_http_plan_apply_again_and_token(admin_world: World) -> None:
    w = admin_world
    resp = await call(w, "POST", "/admin/v1/apply?plan=1", data=ORG, token=None)
    await error(resp, 401, "unauthorized")
    resp = await call(w, "POST", "/admin/v1/apply", data=ORG, token="wrong")
    await error(resp, 401, "unauthorized")
    assert [t["name"] for t in await w.admin(services.list_teams)] == ["eng"]

    planned = await ok(w, "POST", "/admin/v1/apply?plan=1", data=ORG)
    _check(planned, _schema("/admin/v1/apply", "post", 200))
    assert planned["applied"] is False and planned["summary"] == {"create": 11, "change": 0, "delete": 0}
    assert planned["file"] == "body" and planned["created_keys"] == []
    assert [t["name"] for t in await w.admin(services.list_teams)] == ["eng"]  # nothing made

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/toml"}
    resp = await w.client.post("/admin/v1/apply", data=ORG, headers=headers)
    assert resp.status == 200, await resp.text()
    applied = await resp.json()
    _check(applied, _schema("/admin/v1/apply", "post", 200))
    assert applied["applied"] is True and len(applied["created_keys"]) == 3
    secret = {k["name"]: k["key"] for k in applied["created_keys"]}["laptop"]
    resp = await w.chat(secret)
    assert resp.status == 200, await resp.text()
    audit = await ok(w, "GET", "/admin/v1/audit?action=org.apply")
    assert audit["entries"][0]["actor"].startswith(f"apply sha256:{applied['sha256']} (admin-api ")

    again = await ok(w, "POST", "/admin/v1/apply", data=ORG)
    assert again["changes"] == [] and again["created_keys"] == []
    # With prune=1, the fixture's team and users stay (never deleted): only a plan of nothing to revoke.
    pruned = await ok(w, "POST", "/admin/v1/apply?plan=1&prune=1", data=ORG)
    assert pruned["changes"] == [] and pruned["prune"] is True


async def test_http_bad_file_and_parameters(admin_world: World) -> None:
    w = admin_world
    bad = ORG.replace('team = "ops"', 'team = "nowhere"')
    body = await error(await call(w, "POST", "/admin/v1/apply", data=bad), 400, "invalid_request")
    assert body["field"] == "users[1].team" and body["line"] == 25
    assert body["message"].startswith("body:25: users[1].team: no team named 'nowhere'")
    _check({"error": body}, _schema("/admin/v1/apply", "post", 400))
    assert [t["name"] for t in await w.admin(services.list_teams)] == ["eng"]
    await error(await call(w, "POST", "/admin/v1/apply?plan=yes", data=ORG), 400, "invalid_request", "plan")
    await error(await call(w, "POST", "/admin/v1/apply?dry=1", data=ORG), 400, "invalid_request", "dry")
    resp = await call(w, "POST", "/admin/v1/apply", data=b"\xff\xfe")
    await error(resp, 400, "invalid_request")
    await error(await call(w, "POST", "/admin/v1/apply", data=""), 400, "invalid_request", "version")
    assert "/admin/v1/apply" in SPEC["paths"]


RACE_ORG = """\
version = 1

[[teams]]
name = "eng"

[[users]]
name = "alice"
team = "eng"

[[users]]
name = "bob"
team = "eng"

[[users]]
name = "dora"
team = "eng"

[[users.keys]]
name = "new"

[[budgets]]
scope = "user"
subject = "alice"
period = "daily"
limit = 1.7

[[budgets]]
scope = "team"
subject = "eng"
period = "daily"
limit = 1.5
"""


async def test_apply_racing_admissions_keeps_budgets_exact(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Admissions go on while an apply raises a user budget and adds a team budget (and another
    apply of the same file finds nothing to do): no budget goes over, and the books balance."""
    alice, bob = await world.key("alice"), await world.key("bob")
    await world.budget("user", "alice", "1.0")
    world.upstream.chunk_delay = 0.001
    org = parse(RACE_ORG, PRICED, "race.toml")
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}  # 0.1

    async def one(i: int) -> int:
        key = (alice, bob)[i % 2]["key"]
        resp = await world.client.post(
            "/api/v1/chat", json=dict(body, stream=i % 3 == 0), headers={"Authorization": f"Bearer {key}"}
        )
        await resp.read()
        return resp.status

    async def applies() -> list[dict[str, Any]]:
        outcomes = []
        while len(world.upstream.received) < 5:  # once admissions are under way
            await asyncio.sleep(0.001)
        for _ in range(2):
            outcomes.append(await world.store.run(lambda c: apply.apply(c, org, now_us(), actor="race")))
        return outcomes

    results = await asyncio.gather(applies(), *(one(i) for i in range(300)))
    first, second = results[0]
    statuses = Counter(results[1:])
    assert first["summary"] == {"create": 3, "change": 1, "delete": 0} and second["changes"] == []
    assert set(statuses) <= {200, 402}
    charged = await world.sql(
        "SELECT COUNT(*), COALESCE(SUM(credits_micros), 0) FROM ledger WHERE outcome = 'charged'"
    )
    assert charged[0][0] == statuses[200] == len(world.upstream.received)
    budgets = {(b["scope"], b["subject"]): b for b in await world.admin(budgeting.list_budgets)}
    user, team = budgets[("user", "alice")], budgets[("team", "eng")]
    assert (user["limit"], team["limit"]) == (1.7, 1.5)
    assert user["spent"] <= 1.7 and team["spent"] <= 1.5 and user["held"] == team["held"] == 0
    await assert_counters_match_ledger(world)
    assert (await world.admin(ledger.verify))["ok"]
    # The apply did run among the admissions: requests were admitted before it and after it.
    applied_at = (await world.sql("SELECT MIN(at) FROM audit_log WHERE action = 'org.apply'"))[0][0]
    sides = await world.sql(
        "SELECT SUM(CASE WHEN admitted_at < :at THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN admitted_at > :at THEN 1 ELSE 0 END) FROM ledger",
        at=applied_at,
    )
    assert sides[0][0] > 0 and sides[0][1] > 0, sides
    # Budgets changed in the admissions' lock order: no deadlock for PostgreSQL to break and retry.
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]
