"""The ledger read back over HTTP and the CLI: filters, stable cursor pagination, and `ledger verify`."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from sqlalchemy import text

from gateway.core import admission
from gateway.core.metering import Caller, Charge, now_us
from gateway.ops import ledger

from .admin_helpers import call, cli, cli_json, error, ok, traffic
from .conftest import Backend, World

MINUTE = 60_000_000


async def _seed(w: World) -> dict[str, dict[str, Any]]:
    keys = {name: await w.key(name) for name in ("alice", "bob", "carol")}
    await traffic(w, keys["alice"]["key"], (3, "openai/gpt-oss-20b"), (1, "google/gemini-2.5-pro"))
    await traffic(w, keys["bob"]["key"], (2, "openai/gpt-oss-120b"))
    await traffic(w, keys["carol"]["key"], (7, "openai/gpt-oss-20b"))
    refused = await w.client.post(
        "/api/v1/chat",
        json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:500"}]},
        headers={"Authorization": f"Bearer {keys['bob']['key']}"},
    )
    assert refused.status == 500
    return keys


async def test_entries(admin_world: World) -> None:
    w = admin_world
    keys = await _seed(w)
    page = await ok(w, "GET", "/admin/v1/ledger")
    assert page["next_cursor"] is None
    entries = page["entries"]
    assert [(e["user"], e["model"], e["outcome"]) for e in entries] == [
        ("alice", "openai/gpt-oss-20b", "charged"),
        ("alice", "google/gemini-2.5-pro", "charged"),
        ("bob", "openai/gpt-oss-120b", "charged"),
        ("carol", "openai/gpt-oss-20b", "charged"),
        ("bob", "openai/gpt-oss-20b", "upstream_error"),
    ]
    first = entries[0]
    assert first | {"request_id": "", "admitted_at": "", "settled_at": "", "duration_ms": 0} == {
        "request_id": "",
        "admitted_at": "",
        "settled_at": "",
        "team": "eng",
        "user": "alice",
        "key_id": keys["alice"]["id"],
        "model": "openai/gpt-oss-20b",
        "message_count": 3,
        "unit_price": 0.1,
        "credits": 0.3,
        "outcome": "charged",
        "upstream_status": 200,
        "prompt_tokens": 21,
        "completion_tokens": 6,
        "total_tokens": 27,
        "stream": False,
        "duration_ms": 0,
        "end_user": None,
        "tags": [],
        "adjustments": 0,
    }
    assert first["admitted_at"].endswith("Z") and first["settled_at"] >= first["admitted_at"]
    assert entries[1]["credits"] == 3 and isinstance(entries[1]["credits"], int)
    assert entries[3]["team"] is None
    assert (entries[4]["credits"], entries[4]["upstream_status"], entries[4]["prompt_tokens"]) == (
        0,
        500,
        None,
    )
    ids = [r[0] for r in await w.sql("SELECT request_id FROM ledger ORDER BY admitted_at, request_id")]
    assert [e["request_id"] for e in entries] == ids


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("user=alice", [0, 1]),
        ("team=eng", [0, 1, 2, 4]),
        ("model=openai/gpt-oss-20b", [0, 3, 4]),
        ("outcome=upstream_error", [4]),
        ("user=bob&outcome=charged", [2]),
        ("key={carol}", [3]),
        ("from={2}", [2, 3, 4]),
        ("to={2}", [0, 1]),
        ("from={1}&to={3}", [1, 2]),
        ("user=carol&model=google/gemini-2.5-pro", []),
    ],
)
async def test_filters(admin_world: World, query: str, expected: list[int]) -> None:
    w = admin_world
    keys = await _seed(w)
    everything = (await ok(w, "GET", "/admin/v1/ledger"))["entries"]
    times = [e["admitted_at"] for e in everything]
    filled = query.replace("{carol}", keys["carol"]["id"])
    for i, at in enumerate(times):
        filled = filled.replace(f"{{{i}}}", at)
    page = await ok(w, "GET", "/admin/v1/ledger", params=dict(p.split("=", 1) for p in filled.split("&")))
    assert page["entries"] == [everything[i] for i in expected]


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("user=nobody", 404, "user"),
        ("team=nobody", 404, "team"),
        ("outcome=paid", 400, "outcome"),
        ("limit=0", 400, "limit"),
        ("limit=1001", 400, "limit"),
        ("limit=ten", 400, "limit"),
        ("cursor=not-a-cursor", 400, "cursor"),
        ("cursor=WzEsMl0", 400, "cursor"),
        ("cursor=WzE5OTk5OTk5OTk5OTk5OTk5OTk5LCJhIl0", 400, "cursor"),
        ("from=soon", 400, "from"),
        ("from=2026-02-02&to=2026-02-01", 400, "to"),
        ("page=2", 400, "page"),
    ],
)
async def test_bad_filters(admin_world: World, query: str, status: int, field: str) -> None:
    resp = await call(admin_world, "GET", f"/admin/v1/ledger?{query}")
    await error(resp, status, "invalid_request" if status == 400 else "not_found", field)


def test_cursor_round_trip() -> None:
    for at, request_id in [(0, ""), (-5, "x"), (2**62, "f" * 32), (1_767_225_600_000_000, "abc")]:
        cursor = ledger.encode_cursor(at, request_id)
        assert cursor.isascii() and "=" not in cursor
        assert ledger.decode_cursor(cursor) == (at, request_id)


async def _insert_rows(w: World, count: int, seed: int) -> list[str]:
    """`count` rows with many equal admission times, inserted in random order; their ids in ledger order."""
    (alice,) = (await w.sql("SELECT id FROM users WHERE name = 'alice'"))[0]
    rng = random.Random(seed)
    base = now_us() - 60 * MINUTE
    rows = [(base + rng.randrange(5) * MINUTE, f"{rng.getrandbits(64):016x}") for _ in range(count)]
    rng.shuffle(rows)

    def insert(conn: Any) -> None:
        conn.execute(
            text(
                "INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model, "
                "message_count, unit_price_micros, credits_micros, outcome, stream, duration_us) VALUES "
                "(:id, :at, :at, NULL, :user, 'key_x', 'openai/gpt-oss-20b', 1, 100000, 100000, 'charged', "
                "false, 0)"
            ),
            [{"id": request_id, "at": at, "user": alice} for at, request_id in rows],
        )

    await w.store.run(insert)
    return [request_id for _, request_id in sorted(rows)]


async def _walk(w: World, limit: int, **params: str) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        query = {**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        page = await ok(w, "GET", "/admin/v1/ledger", params=query)
        pages.append([e["request_id"] for e in page["entries"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(page["entries"]) == limit


@pytest.mark.parametrize("limit", [1, 4, 7, 37, 1000])
async def test_pagination_is_complete_and_stable(admin_world: World, limit: int) -> None:
    w = admin_world
    expected = await _insert_rows(w, 37, seed=limit)
    pages = await _walk(w, limit)
    walked = [request_id for page in pages for request_id in page]
    assert walked == expected
    assert len(pages) == max(1, -(-37 // limit))
    assert await _walk(w, limit) == pages
    # A cursor keeps its place when a newer row arrives (all these tests' limits leave it off page two).
    first = await ok(w, "GET", "/admin/v1/ledger", params={"limit": str(limit)})
    if first["next_cursor"]:
        await traffic(w, (await w.key("bob"))["key"], (1, "openai/gpt-oss-20b"))
        second = await ok(
            w, "GET", "/admin/v1/ledger", params={"limit": str(limit), "cursor": first["next_cursor"]}
        )
        assert [e["request_id"] for e in second["entries"]] == expected[limit : 2 * limit]


async def test_pagination_with_a_filter(admin_world: World) -> None:
    w = admin_world
    expected = await _insert_rows(w, 20, seed=3)
    await _seed(w)
    pages = await _walk(w, 6, user="alice", model="openai/gpt-oss-20b")
    walked = [request_id for page in pages for request_id in page]
    assert walked[:20] == expected and len(walked) == 21


async def test_verify_is_clean_after_traffic(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    keys = await _seed_with_budgets(w)
    code, out, _ = await cli(capsys, "ledger", "verify")
    assert code == 0, out
    assert "DIFFERENCE" not in out
    assert "every counter matches the ledger" in out
    result = await cli_json(capsys, "ledger", "verify")
    assert result["ok"] is True and result["differences"] == []
    # Four budgets, one window each: key, user and team budgets of alice, and bob's.
    assert result["windows"] == 4
    assert keys


async def _seed_with_budgets(w: World) -> dict[str, dict[str, Any]]:
    await w.budget("team", "eng", "100", period="monthly")
    await w.budget("user", "alice", "50")
    await w.budget("user", "bob", "50", period="total")
    keys = await _seed(w)
    await w.budget("key", keys["alice"]["id"], "20", period="weekly")
    await traffic(w, keys["alice"]["key"], (2, "openai/gpt-oss-20b"))
    # A request still in flight: its hold counts as held.
    user_id, team_id = (await w.sql("SELECT id, team_id FROM users WHERE name = 'alice'"))[0]
    caller = Caller(keys["alice"]["id"], user_id, "alice", team_id, "eng")
    charge = Charge("in-flight", caller, "openai/gpt-oss-20b", 4, 100_000, 400_000, False)
    await w.store.run(admission.admit, charge, "elsewhere", now_us())
    budgets = await ok(w, "GET", "/admin/v1/budgets?scope=user&subject=alice")
    assert budgets[0]["held"] == 0.4
    return keys


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE budget_counters SET spent_micros = spent_micros + 1 WHERE budget_id = {budget}",
        "UPDATE budget_counters SET held_micros = 0 WHERE budget_id = {budget}",
        "DELETE FROM budget_counters WHERE budget_id = {budget}",
    ],
)
async def test_verify_reports_a_tampered_counter(
    admin_world: World,
    backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tamper: str,
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    await _seed_with_budgets(w)
    (budget,) = (await w.sql("SELECT b.id FROM budgets b WHERE b.scope = 'user' AND b.period = 'daily'"))[0]
    await w.store.run(lambda conn: conn.execute(text(tamper.format(budget=budget))))
    code, out, _ = await cli(capsys, "ledger", "verify")
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.startswith("DIFFERENCE")]
    assert len(lines) == 1, out
    assert "daily user budget of alice" in lines[0] and "ledger says spent 3.5, held 0.4" in lines[0]
    assert "1 window(s) differ from the ledger" in out
    code, out, _ = await cli(capsys, "ledger", "verify", "--json")
    result = json.loads(out)
    assert code == 1 and result["ok"] is False
    (difference,) = result["differences"]
    assert (difference["scope"], difference["subject"], difference["period"]) == ("user", "alice", "daily")
    assert difference["ledger"] == {"spent": 3.5, "held": 0.4}
    assert difference["counter"] == (
        None
        if tamper.startswith("DELETE")
        else {"spent": 3.500001, "held": 0.4}
        if "spent" in tamper
        else {"spent": 3.5, "held": 0}
    )


async def test_cli_ledger_list(
    admin_world: World, backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    w = admin_world
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    await _seed(w)
    http = await ok(w, "GET", "/admin/v1/ledger", params={"team": "eng", "limit": "2"})
    assert await cli_json(capsys, "ledger", "list", "--team", "eng", "--limit", "2") == http
    code, out, _ = await cli(capsys, "ledger", "list", "--team", "eng", "--limit", "2")
    assert code == 0
    assert out.splitlines()[0].split() == [
        "REQUEST_ID",
        "ADMITTED_AT",
        "TEAM",
        "USER",
        "END_USER",
        "TAGS",
        "MODEL",
        "CREDITS",
        "OUTCOME",
    ]
    assert out.splitlines()[-1] == f"next page: --cursor {http['next_cursor']}"
    rest = await cli_json(capsys, "ledger", "list", "--team", "eng", "--cursor", http["next_cursor"])
    assert [e["user"] for e in http["entries"] + rest["entries"]] == ["alice", "alice", "bob", "bob"]
    assert rest["next_cursor"] is None
    code, _, err = await cli(capsys, "ledger", "list", "--user", "nobody")
    assert code == 1 and "nobody" in err
