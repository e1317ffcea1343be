"""Budget alerts (issue 17): thresholds crossed once per window, delivered over signed webhooks."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from gateway.core import alerts
from gateway.core.admission import admit
from gateway.core.metering import Caller, Charge, Settlement, now_us
from gateway.core.settlement import settle
from gateway.ops import budgeting, webhooks
from gateway.ops.settings import ConfigError, Secret, Settings, Webhook

from .alert_helpers import SECRET, Receiver, serve, until, verify
from .conftest import ADMIN_TOKEN, World

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# ------------------------------------------------------------------ pure


def test_thresholds_crossed_exactly() -> None:
    limit = 1_000_000
    assert alerts.crossed(0, 799_999, limit, (80, 100)) == []
    assert alerts.crossed(799_999, 800_000, limit, (80, 100)) == [80]
    assert alerts.crossed(700_000, 1_200_000, limit, (50, 80, 100, 150)) == [80, 100]
    assert alerts.crossed(800_000, 900_000, limit, (80, 100)) == []  # already past 80
    # A zero limit: the first credit spent reaches every threshold.
    assert alerts.crossed(0, 1, 0, (80, 100)) == [80, 100]
    assert alerts.crossed(0, 0, 0, (80,)) == []
    # Lower limit below spent: 80 was reached at 1.0 (0.85 spent), 100 is new at 0.8.
    assert alerts.newly_reached(850_000, (1_000_000, (80, 100)), (800_000, (80, 100))) == ([100], [])
    # Raised: both re-armed.
    assert alerts.newly_reached(850_000, (1_000_000, (80, 100)), (2_000_000, (80, 100))) == ([], [80, 100])
    # A new budget over what its window already spent emits what it reaches.
    assert alerts.newly_reached(850_000, None, (1_000_000, (50, 80, 100))) == ([50, 80], [100])


def test_thresholds_checked() -> None:
    assert alerts.check("100, 50,80", "x") == (50, 80, 100)
    assert alerts.check([100, 50, 100], "x") == (50, 100)
    assert alerts.check([], "x") == ()
    for bad in ([0], [1001], ["5O"], [True], [1.5], "a,b", 80):
        with pytest.raises(ValueError, match="x"):
            alerts.check(bad, "x")


def test_signature_matches_an_independent_implementation() -> None:
    event = {"id": "evt_1", "type": "budget.threshold_crossed", "created_at": "x", "data": {"a": 1}}
    for secret, other in ((SECRET, "whsec_" + "QUJD" * 8), ("plain secret", "plain secreT")):
        body, headers = webhooks.request_of(Webhook("http://h/", Secret(secret)), event, int(time.time()))
        assert verify(secret, headers, body)
        assert not verify(other, headers, body)
        assert not verify(secret, headers, body.replace(b'"a": 1', b'"a": 2'))
    body, headers = webhooks.request_of(Webhook("http://h/", None, "slack"), event | {"data": _data()}, 0)
    assert "webhook-signature" not in headers and body.startswith(b'{"text": "Budget alert: the daily team')


def _data() -> dict[str, Any]:
    return {
        "scope": "team",
        "subject": "eng",
        "period": "daily",
        "window_start": "2026-12-06T00:00:00Z",
        "resets_at": "2026-12-07T00:00:00Z",
        "threshold": 80,
        "limit": 1,
        "spent": 0.8,
        "remaining": 0.2,
        "enforce": True,
    }


def test_retry_delays_grow_with_jitter() -> None:
    rng = random.Random(1)
    delays = [webhooks.retry_delay(n, 2.0, rng) for n in range(1, 30)]
    assert 1.0 <= delays[0] <= 2.0 and 4.0 <= delays[2] <= 8.0
    assert max(delays) <= webhooks.RETRY_DELAY_MAX_SECONDS
    # With a one-hour cap, 24 hours of retries are about 24 + log2(3600/2) attempts.
    assert sum(webhooks.retry_delay(n, 2.0, rng) for n in range(1, 60)) > 24 * 3600


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"GATEWAY_WEBHOOK_URL": "ftp://example.com/x", "GATEWAY_WEBHOOK_SECRET": "s"},
            "GATEWAY_WEBHOOK_URL",
        ),
        (
            {"GATEWAY_WEBHOOK_URL": "http://example.com/x", "GATEWAY_WEBHOOK_SECRET": " "},
            "GATEWAY_WEBHOOK_SECRET",
        ),
        ({"GATEWAY_WEBHOOK_URL": "http://example.com/x"}, "GATEWAY_WEBHOOK_SECRET"),
        ({"GATEWAY_WEBHOOK_SECRET": "s"}, "GATEWAY_WEBHOOK_SECRET"),
        ({"GATEWAY_ALERT_THRESHOLDS": "80,1001"}, "GATEWAY_ALERT_THRESHOLDS"),
        ({"GATEWAY_ALERT_THRESHOLDS": "0"}, "GATEWAY_ALERT_THRESHOLDS"),
        ({"GATEWAY_WEBHOOK_URL": "http://e.com/x", "GATEWAY_WEBHOOK_SECRET": "whsec_!!"}, "whsec_"),
    ],
)
def test_bad_alert_settings_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.load(environ=env)


def test_webhook_tables(tmp_path: Any) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[webhooks]]\nurl = "https://hooks.example.com/a"\nsecret = "s1"\n'
        '[[webhooks]]\nurl = "https://hooks.slack.example/b"\nformat = "slack"\n'
    )
    settings = Settings.load(path, environ={"GATEWAY_ALERT_THRESHOLDS": "50,80,100"})
    assert [(h.url, h.format) for h in settings.webhooks] == [
        ("https://hooks.example.com/a", "standard"),
        ("https://hooks.slack.example/b", "slack"),
    ]
    assert settings.alert_thresholds == (50, 80, 100)
    path.write_text('[[webhooks]]\nurl = "https://hooks.example.com/a"\nsecret = ""\n')
    with pytest.raises(ConfigError, match=r"webhooks\[1\]\.secret"):
        Settings.load(path, environ={})
    path.write_text('[[webhooks]]\nurl = "https://hooks.example.com/a"\nformat = "xml"\n')
    with pytest.raises(ConfigError, match=r"webhooks\[1\]\.format"):
        Settings.load(path, environ={})


# ------------------------------------------------------------------ through the gateway


async def _with_webhook(w: World, receiver: Receiver, **overrides: Any) -> Any:
    server = await serve(receiver)
    hook = Webhook(str(server.make_url("/hook")), Secret(receiver.secret))
    await w.reconfigure(
        admin_token=Secret(ADMIN_TOKEN), webhooks=(hook,), webhook_retry_base_seconds=0.05, **overrides
    )
    return server


async def _events(w: World, query: str = "") -> list[dict[str, Any]]:
    resp = await w.client.get("/admin/v1/events" + query, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return list((await resp.json())["events"])


async def test_each_threshold_once_under_concurrency(world: World) -> None:
    w = world
    receiver = Receiver()
    before = w.metrics  # the first gateway on this database runs too: it may count events
    server = await _with_webhook(w, receiver)
    try:
        key = await w.key("alice")
        await w.admin(
            lambda c: budgeting.set_budget(c, "team", "eng", "daily", "4", now_us(), alert_at=[50, 80, 100])
        )
        # 60 requests of 0.1 at once on a 4-credit budget: 40 pass, crossing 50, 80 and 100 %.
        statuses = await asyncio.gather(*(w.chat(key["key"]) for _ in range(60)))
        assert Counter(r.status for r in statuses) == {200: 40, 402: 20}
        await until(lambda: len(receiver.received) >= 3, what="three deliveries")
        await asyncio.sleep(1.5)  # a second dispatch round would show duplicates
        got = receiver.events()
        assert sorted(e["data"]["threshold"] for e in got) == [50, 80, 100]
        assert len({e["id"] for e in got}) == 3
        first = min(got, key=lambda e: e["data"]["threshold"])
        assert first["type"] == "budget.threshold_crossed"
        assert first["data"] | {
            "spent": None,
            "remaining": None,
            "window_start": None,
            "resets_at": None,
        } == {
            "scope": "team",
            "subject": "eng",
            "period": "daily",
            "threshold": 50,
            "limit": 4,
            "enforce": True,
            "spent": None,
            "remaining": None,
            "window_start": None,
            "resets_at": None,
        }
        assert first["data"]["spent"] >= 2
        listed = await _events(w)
        assert [(e["id"], e["state"], e["attempts"]) for e in listed] == [
            (e["id"], "delivered", 1) for e in sorted(listed, key=lambda e: (e["created_at"], e["id"]))
        ]
        assert {e["id"] for e in listed} == {e["id"] for e in got}
        text = w.metrics.registry.get_sample_value
        for threshold in ("50", "80", "100"):
            labels = {"scope": "team", "threshold": threshold}
            counted = [
                m.registry.get_sample_value("gateway_alerts_emitted_total", labels)
                for m in (before, w.metrics)
            ]
            assert sum(n or 0 for n in counted) == 1, counted
        assert text("gateway_webhook_deliveries_total", {"outcome": "delivered"}) == 3
        await until(lambda: text("gateway_webhook_pending") == 0, what="pending 0")
    finally:
        await server.close()


async def test_failing_receiver_gets_the_same_event_until_it_answers(world: World) -> None:
    w = world
    receiver = Receiver(answers=[500, 500, 500])
    server = await _with_webhook(w, receiver)
    try:
        key = await w.key("alice")
        await w.admin(
            lambda c: budgeting.set_budget(c, "user", "alice", "daily", "0.1", now_us(), alert_at=[100])
        )
        assert (await w.chat(key["key"])).status == 200  # 100 % at once
        await until(lambda: len(receiver.received) >= 4, what="4 attempts")
        await asyncio.sleep(1.0)  # nothing more comes
        assert len(receiver.received) == 4
        ids = {h["webhook-id"] for h, _ in receiver.received}
        assert len(ids) == 1 and len({body for _, body in receiver.received}) == 1
        assert len(receiver.events()) == 4  # every attempt validly signed
        (event,) = await _events(w)
        assert (event["id"], event["state"], event["attempts"]) == (ids.pop(), "delivered", 4)
        assert event["last_error"] == "HTTP 500" and event["deliveries"][0]["last_status"] == 200
        text = w.metrics.registry.get_sample_value
        assert text("gateway_webhook_deliveries_total", {"outcome": "failed"}) == 3
        assert text("gateway_webhook_deliveries_total", {"outcome": "delivered"}) == 1
    finally:
        await server.close()


async def test_soft_budget_passes_and_alerts(world: World) -> None:
    w = world
    receiver = Receiver()
    server = await _with_webhook(w, receiver)
    try:
        key = await w.key("alice")
        resp = await w.client.put(
            "/admin/v1/budgets",
            headers=AUTH,
            json={
                "scope": "user",
                "subject": "alice",
                "period": "daily",
                "limit": 0.2,
                "enforce": False,
                "alert_at": [100, 200],
            },
        )
        assert resp.status == 200 and (await resp.json())["enforce"] is False
        for _ in range(5):
            assert (await w.chat(key["key"])).status == 200
        await until(lambda: len(receiver.received) >= 2, what="two alerts")
        got = receiver.events()
        assert sorted(e["data"]["threshold"] for e in got) == [100, 200]
        assert all(e["data"]["enforce"] is False for e in got)
        listed = await (await w.client.get("/admin/v1/budgets?scope=user", headers=AUTH)).json()
        assert (listed[0]["spent"], listed[0]["enforce"], listed[0]["alert_at"]) == (0.5, False, [100, 200])
    finally:
        await server.close()


async def test_bad_alert_at_is_a_400_naming_it(admin_world: World) -> None:
    for bad in ([0], [80, 1001], "x", [True], {"a": 1}):
        resp = await admin_world.client.put(
            "/admin/v1/budgets",
            headers=AUTH,
            json={"scope": "team", "subject": "eng", "period": "daily", "limit": 1, "alert_at": bad},
        )
        body = await resp.json()
        assert resp.status == 400 and body["error"]["field"] == "alert_at", body
    resp = await admin_world.client.put(
        "/admin/v1/budgets",
        headers=AUTH,
        json={"scope": "team", "subject": "eng", "period": "daily", "limit": 1, "enforce": "no"},
    )
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "enforce"


async def _thresholds(w: World) -> list[tuple[int, int, bool]]:
    rows = await w.sql("SELECT window_start, threshold, rearmed_at FROM alert_events ORDER BY created_at, id")
    return [(int(r[0]), int(r[1]), r[2] is not None) for r in rows]


async def test_next_window_fires_again(world: World) -> None:
    """Admitted tomorrow (the time each call is given), the same spending alerts again."""
    w = world
    key = await w.key("alice")
    await w.budget("user", "alice", "1")
    user_id, team_id = (await w.sql("SELECT id, team_id FROM users WHERE name = 'alice'"))[0]
    caller = Caller(key["id"], user_id, "alice", team_id, "eng")
    today = now_us()
    tomorrow = today + int(timedelta(days=1).total_seconds() * 1_000_000)
    for n, at in enumerate((today, today, tomorrow, tomorrow)):
        charge = Charge(f"r{n}", caller, "openai/gpt-oss-20b", 5, 100_000, 500_000, False)
        admission = await w.store.run(admit, charge, "here", at)
        assert await w.store.run(settle, admission, Settlement("charged", 200), at)
    windows = sorted({window for window, _, _ in await _thresholds(w)})
    assert len(windows) == 2
    assert sorted((window, t) for window, t, _ in await _thresholds(w)) == [
        (windows[0], 80),
        (windows[0], 100),
        (windows[1], 80),
        (windows[1], 100),
    ]


async def test_limit_changes_rearm_and_emit(world: World) -> None:
    w = world
    key = await w.key("alice")
    await w.budget("user", "alice", "1")
    for _ in range(9):
        assert (await w.chat(key["key"])).status == 200  # 0.9: 80 % reached
    assert [t for _, t, _ in await _thresholds(w)] == [80]
    # Raised to 2: 0.9 is under 80 % again, so 80 is re-armed (its event kept, marked).
    await w.budget("user", "alice", "2")
    assert [(t, rearmed) for _, t, rearmed in await _thresholds(w)] == [(80, True)]
    for _ in range(7):
        assert (await w.chat(key["key"])).status == 200  # 1.6: 80 % of 2 reached again
    assert [(t, rearmed) for _, t, rearmed in await _thresholds(w)] == [(80, True), (80, False)]
    # Lowered to 1.5, below what is spent: 100 % is emitted by the change itself, once.
    await w.budget("user", "alice", "1.5")
    await w.budget("user", "alice", "1.5")
    assert [(t, rearmed) for _, t, rearmed in await _thresholds(w)] == [(80, True), (80, False), (100, False)]
    # A raise that leaves spending past 80 % re-arms only 100.
    await w.budget("user", "alice", "1.9")
    assert [(t, rearmed) for _, t, rearmed in await _thresholds(w)] == [(80, True), (80, False), (100, True)]


async def test_webhooks_test_endpoint(world: World) -> None:
    w = world
    receiver = Receiver(answers=[200, 503])
    server = await _with_webhook(w, receiver)
    try:
        resp = await w.client.post("/admin/v1/webhooks/test", headers=AUTH)
        results = await resp.json()
        assert resp.status == 200 and [(r["ok"], r["status"]) for r in results] == [(True, 200)]
        assert receiver.events()[0]["type"] == "webhook.test"
        resp = await w.client.post("/admin/v1/webhooks/test", headers=AUTH)
        assert [(r["ok"], r["error"]) for r in await resp.json()] == [(False, "HTTP 503")]
    finally:
        await server.close()


async def test_events_are_listed_a_page_at_a_time(world: World) -> None:
    w = world
    key = await w.key("alice")
    await w.admin(
        lambda c: budgeting.set_budget(
            c, "user", "alice", "daily", "1", now_us(), alert_at=[10, 20, 30, 40, 50]
        )
    )
    for _ in range(5):
        assert (await w.chat(key["key"])).status == 200  # one threshold each
    await w.reconfigure(admin_token=Secret(ADMIN_TOKEN))
    seen, cursor = [], None
    while True:
        resp = await w.client.get(
            "/admin/v1/events", params={"limit": "2", **({"cursor": cursor} if cursor else {})}, headers=AUTH
        )
        page = await resp.json()
        assert resp.status == 200 and len(page["events"]) <= 2
        seen += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["data"]["threshold"] for e in seen] == [10, 20, 30, 40, 50]
    # No webhook configured: nothing is sent, and nothing waits for a sender.
    assert all(e["deliveries"] == [] for e in seen)
    for query, field in (
        ("?type=nope", "type"),
        ("?limit=0", "limit"),
        ("?cursor=x", "cursor"),
        ("?x=1", "x"),
    ):
        resp = await w.client.get("/admin/v1/events" + query, headers=AUTH)
        assert resp.status == 400 and (await resp.json())["error"]["field"] == field


async def test_cli_lists_events_and_tests_webhooks(
    world: World, backend: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.ops.cli import main

    w = world
    key = await w.key("alice")
    await w.budget("user", "alice", "0.1")
    assert (await w.chat(key["key"])).status == 200
    receiver = Receiver(answers=[200])
    server = await serve(receiver)
    try:
        monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)

        def run(*args: str) -> tuple[int, str]:
            code = main(list(args))
            return code, capsys.readouterr().out

        code, out = await asyncio.to_thread(run, "events", "list", "--json")
        listed = json.loads(out)["events"]
        assert code == 0 and sorted(e["data"]["threshold"] for e in listed) == [80, 100]
        code, out = await asyncio.to_thread(run, "events", "list")
        assert code == 0 and "has reached 100% of its limit" in out
        code, out = await asyncio.to_thread(run, "webhooks", "test")
        assert code == 1 and "no webhook is configured" in out
        monkeypatch.setenv("GATEWAY_WEBHOOK_URL", str(server.make_url("/hook")))
        monkeypatch.setenv("GATEWAY_WEBHOOK_SECRET", SECRET)
        code, out = await asyncio.to_thread(run, "webhooks", "test", "--json")
        assert code == 0 and json.loads(out)[0]["status"] == 200
        assert receiver.events()[0]["type"] == "webhook.test"
        code, out = await asyncio.to_thread(run, "webhooks", "test")
        assert code == 0 and "answered 200" in out
    finally:
        await server.close()
