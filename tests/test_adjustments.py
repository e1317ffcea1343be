"""Ledger adjustments (contract §11): appended, applied to the request's windows, seen everywhere."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import pytest
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.errors import InvalidRequest
from gateway.ops import adjustments
from gateway.store import Store, open_store

from .admin_helpers import call, cli, cli_json, ok
from .conftest import Backend, World, assert_counters_match_ledger


async def _charged(w: World) -> tuple[str, str]:
    """alice (team eng) with key, user and team budgets; one request of 4 messages (0.4 credits)."""
    key = await w.key("alice")
    for scope, subject in (("key", key["id"]), ("user", "alice"), ("team", "eng")):
        await w.budget(scope, subject, "10")
    await w.budget("user", "alice", "20", period="monthly")
    resp = await w.client.post(
        "/api/v1/chat",
        json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}] * 4},
        headers={"Authorization": f"Bearer {key['key']}", "X-Gateway-Tags": "a,b"},
    )
    assert resp.status == 200
    return resp.headers["X-Request-Id"], key["key"]


async def test_a_refund_of_half_a_charge_agrees_everywhere(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    request_id, key = await _charged(w)
    result = await ok(
        w,
        "POST",
        f"/admin/v1/ledger/{request_id}/adjust",
        201,
        json={"credits": -0.2, "reason": "half refund"},
    )
    assert result == {
        "request_id": request_id,
        "credits": -0.2,
        "reason": "half refund",
        "total": 0.2,
        "windows": 4,
    }
    # Counters: every budget window the request was counted in.
    for budget in await ok(w, "GET", "/admin/v1/budgets"):
        assert budget["spent"] == 0.2, budget
    await assert_counters_match_ledger(w)
    # The ledger row is unchanged; the entry shows its adjustments.
    (entry,) = (await ok(w, "GET", "/admin/v1/ledger"))["entries"]
    assert (entry["credits"], entry["adjustments"]) == (0.4, -0.2)
    # Reports: its own column, and in credits; in each tag's row, once in totals.
    report = await ok(w, "GET", "/admin/v1/usage", params={"group_by": "tag"})
    assert [(r["tag"], r["credits"], r["adjustments"]) for r in report["rows"]] == [
        ("a", 0.2, -0.2),
        ("b", 0.2, -0.2),
    ]
    assert (report["totals"]["credits"], report["totals"]["adjustments"], report["totals"]["requests"]) == (
        0.2,
        -0.2,
        1,
    )
    assert (await cli_json(capsys, "ledger", "verify"))["ok"] is True
    # The caller's own view agrees.
    resp = await w.client.get("/api/v1/usage", headers={"Authorization": f"Bearer {key}"})
    own = await resp.json()
    assert {b["spent"] for b in own["budgets"]} == {0.2}
    assert [(u["key"]["credits"], u["user"]["credits"]) for u in own["usage"]] == [(0.2, 0.2)] * 3
    # The CLI appends the same way; the audit log has both.
    code, out, err = await cli(capsys, "ledger", "adjust", request_id, "-0.2", "--reason", "the rest")
    assert code == 0, err
    assert "by -0.2 credits (now 0)" in out
    for budget in await ok(w, "GET", "/admin/v1/budgets"):
        assert budget["spent"] == 0
    assert (await cli_json(capsys, "ledger", "verify"))["ok"] is True
    audit = await ok(w, "GET", "/admin/v1/audit", params={"action": "ledger.adjust"})
    assert [e["after"]["credits"] for e in audit["entries"]] == [-0.2, -0.2]
    assert [e["target"] for e in audit["entries"]] == [request_id, request_id]
    assert len(await w.sql("SELECT * FROM ledger_adjustments")) == 2


async def test_verify_still_catches_a_hand_edited_row(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    request_id, _ = await _charged(w)
    await ok(w, "POST", f"/admin/v1/ledger/{request_id}/adjust", 201, json={"credits": "0.1", "reason": "r"})
    assert (await cli_json(capsys, "ledger", "verify"))["ok"] is True
    for edit in (
        "UPDATE ledger SET credits_micros = 100000 WHERE request_id = :r",
        "UPDATE ledger_adjustments SET credits_micros = 1 WHERE request_id = :r",
    ):
        await w.store.run(lambda conn, sql=edit: conn.execute(text(sql), {"r": request_id}))
        code, out, _ = await cli(capsys, "ledger", "verify", "--json")
        assert code == 1
        assert len(json.loads(out)["differences"]) == 4


@pytest.mark.parametrize(
    ("path", "body", "status", "named"),
    [
        ("nope", {"credits": -0.1, "reason": "r"}, 404, "No ledger row has request id 'nope'"),
        (None, {"credits": -0.5, "reason": "r"}, 400, "below zero"),
        (None, {"credits": 0, "reason": "r"}, 400, "`credits`"),
        (None, {"credits": "abc", "reason": "r"}, 400, "`credits`"),
        (None, {"credits": True, "reason": "r"}, 400, "`credits`"),
        (None, {"credits": -0.1, "reason": ""}, 400, "`reason`"),
        (None, {"credits": -0.1}, 400, "`reason`"),
        (None, {"credits": -0.1, "reason": "r", "extra": 1}, 400, "extra"),
    ],
)
async def test_refused_adjustments_change_nothing(
    admin_world: World, path: str | None, body: dict[str, Any], status: int, named: str
) -> None:
    w = admin_world
    request_id, _ = await _charged(w)
    resp = await call(w, "POST", f"/admin/v1/ledger/{path or request_id}/adjust", json=body)
    assert resp.status == status, await resp.text()
    assert named in (await resp.json())["error"]["message"]
    assert await w.sql("SELECT * FROM ledger_adjustments") == []
    assert await w.sql("SELECT * FROM audit_log WHERE action = 'ledger.adjust'") == []
    for budget in await ok(w, "GET", "/admin/v1/budgets"):
        assert budget["spent"] == 0.4
    await assert_counters_match_ledger(w)


async def test_cli_unknown_request_and_negative_total(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    request_id, _ = await _charged(w)
    code, _, err = await cli(capsys, "ledger", "adjust", "missing", "-0.1", "--reason", "r")
    assert code != 0 and "No ledger row" in err
    code, _, err = await cli(capsys, "ledger", "adjust", request_id, "-0.41", "--reason", "r")
    assert code != 0 and "below zero" in err
    assert await w.sql("SELECT * FROM ledger_adjustments") == []


async def test_concurrent_refunds_never_take_a_request_below_zero(
    admin_world: World, backend: Backend
) -> None:
    w = admin_world
    request_id, _ = await _charged(w)
    # Each from a store of its own (as from several replicas or CLIs): its own connections.
    stores = [open_store(backend.url, pool_size=1) for _ in range(6)]
    try:

        async def refund(store: Store, i: int) -> bool:
            try:
                unit = functools.partial(adjustments.adjust, actor="test")
                await store.run(unit, request_id, "-0.3", f"refund {i}", now_us())
            except InvalidRequest:
                return False
            return True

        done = await asyncio.gather(*(refund(store, i) for i, store in enumerate(stores)))
    finally:
        for store in stores:
            await store.close()
    assert sorted(done) == [False] * 5 + [True]
    assert [int(r[0]) for r in await w.sql("SELECT credits_micros FROM ledger_adjustments")] == [-300_000]
    for budget in await ok(w, "GET", "/admin/v1/budgets"):
        assert budget["spent"] == 0.1
    await assert_counters_match_ledger(w)


async def test_a_charge_added_by_adjustment_crosses_alert_thresholds(admin_world: World) -> None:
    w = admin_world
    request_id, _ = await _charged(w)
    await w.budget("team", "eng", "1")
    assert await w.sql("SELECT threshold FROM alert_events") == []
    await ok(w, "POST", f"/admin/v1/ledger/{request_id}/adjust", 201, json={"credits": 0.45, "reason": "r"})
    events = await w.sql(
        "SELECT b.scope, e.threshold, e.spent_micros FROM alert_events e JOIN budgets b ON b.id = e.budget_id"
    )
    assert events == [("team", 80, 850_000)]
    await assert_counters_match_ledger(w)
