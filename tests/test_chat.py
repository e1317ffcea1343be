"""The chat endpoints through the real HTTP stack: refusals, charges, headers, streaming, upstream faults."""

from __future__ import annotations

import asyncio
import gc
import io
import json
from typing import Any

import pytest

from gateway.core import admission_sqlite
from gateway.core.metering import now_us
from gateway.core.pricing import format_credits
from gateway.errors import BudgetExceeded
from gateway.ops import budgeting, services
from gateway.store import sql as store_module

from .conftest import World, assert_counters_match_ledger

pytestmark = pytest.mark.usefixtures("world")


async def _nothing_happened(w: World) -> None:
    assert w.upstream.received == []
    assert await w.sql("SELECT * FROM ledger") == []
    assert await w.sql("SELECT * FROM holds") == []
    assert await w.sql("SELECT * FROM budget_counters WHERE spent_micros > 0 OR held_micros > 0") == []


async def _error(resp: Any, status: int, kind: str) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["type"] == kind
    assert body["error"]["message"]
    return dict(body["error"])


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer gwk_not-a-real-key", "Basic dXNlcjpwYXNz"],
)
async def test_unauthorized(world: World, authorization: str | None) -> None:
    await world.budget("user", "alice", "10")
    headers = {"Authorization": authorization} if authorization else {}
    resp = await world.client.post(
        "/api/v1/chat", json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user"}]}, headers=headers
    )
    await _error(resp, 401, "unauthorized")
    await _nothing_happened(world)


async def test_revoked_key_is_refused(world: World) -> None:
    key = await world.key("alice")
    await world.admin(services.revoke_key, key["id"], now_us())
    await _error(await world.chat(key["key"]), 401, "unauthorized")
    await _nothing_happened(world)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"\xff\xfe\x00",
        json.dumps({"model": 5, "messages": [{"role": "user"}]}).encode(),
        json.dumps({"messages": [{"role": "user"}]}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b"}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": []}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": "hi"}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": ["hi"]}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": [{"content": "no role"}]}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": [{"role": 1}]}).encode(),
        json.dumps({"model": "openai/gpt-oss-20b", "messages": [{"role": "user"}], "stream": "yes"}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
async def test_invalid_request(world: World, body: bytes) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "10")
    resp = await world.client.post(
        "/api/v1/chat", data=body, headers={"Authorization": f"Bearer {key['key']}"}
    )
    await _error(resp, 400, "invalid_request")
    await _nothing_happened(world)


async def test_unknown_model(world: World) -> None:
    key = await world.key("alice")
    error = await _error(await world.chat(key["key"], model="acme/none"), 400, "unknown_model")
    assert "openai/gpt-oss-20b" in error["message"]
    await _nothing_happened(world)


async def test_request_too_large(world: World) -> None:
    key = await world.key("alice")
    big = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    resp = await world.client.post(
        "/api/v1/chat",
        data=io.BytesIO(json.dumps(big).encode()),
        headers={"Authorization": f"Bearer {key['key']}", "Content-Type": "application/json"},
    )
    await _error(resp, 413, "request_too_large")
    await _nothing_happened(world)


async def test_request_too_large_chunked(world: World) -> None:
    key = await world.key("alice")

    async def body() -> Any:
        yield b'{"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 65536
        yield b'"}]}'

    resp = await world.client.post(
        "/api/v1/chat", data=body(), headers={"Authorization": f"Bearer {key['key']}"}
    )
    await _error(resp, 413, "request_too_large")
    await _nothing_happened(world)


@pytest.mark.parametrize("scope", ["key", "user", "team"])
async def test_budget_exceeded(world: World, scope: str) -> None:
    key = await world.key("alice")
    subject = {"key": key["id"], "user": "alice", "team": "eng"}[scope]
    await world.budget(scope, subject, "0.25")
    error = await _error(await world.chat(key["key"], messages=3), 402, "budget_exceeded")
    shown = {"key": key["id"], "user": "alice", "team": "eng"}[scope]
    assert error | {"message": ""} == {
        "type": "budget_exceeded",
        "message": "",
        "scope": scope,
        "subject": shown,
        "period": "daily",
        "limit": 0.25,
        "spent": 0,
        "held": 0,
        "remaining": 0.25,
        "cost": 0.3,
        "resets_at": error["resets_at"],
    }
    assert error["resets_at"].endswith("T00:00:00Z")
    await _nothing_happened(world)


async def test_a_counter_refusing_what_its_read_allowed_is_a_500_that_leaves_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite an admission reads its counters, then updates them conditionally under the same
    write lock. Should an update ever refuse what the read allowed (a bug), nothing of it stays."""
    if world.store.dialect != "sqlite":
        pytest.skip("on PostgreSQL an admission is one function call")
    key = await world.key("alice")
    await world.budget("user", "alice", "1")
    await world.budget("team", "eng", "1")
    many = store_module._DriverSql.many
    placed: list[str] = []

    def one_refuses(self: Any, sql: str, rows: Any) -> int:
        changed = many(self, sql, rows)
        if sql == admission_sqlite.PLACE_HOLD:
            placed.append(sql)
            assert changed == len(rows) == 2  # both took the hold: say the second did not
            return changed - 1
        return changed

    monkeypatch.setattr(store_module._DriverSql, "many", one_refuses)
    await _error(await world.chat(key["key"]), 500, "internal_error")
    assert len(placed) == 1  # both counters in one statement
    await _nothing_happened(world)
    assert await world.sql("SELECT * FROM allocations") == []


async def test_total_budget_never_resets(world: World) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "0.1", period="total")
    assert (await world.chat(key["key"])).status == 200
    error = await _error(await world.chat(key["key"]), 402, "budget_exceeded")
    assert error["resets_at"] is None and error["period"] == "total"


async def test_lowered_budget_blocks(world: World) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "1")
    for _ in range(3):
        assert (await world.chat(key["key"])).status == 200
    await world.budget("user", "alice", "0.2")
    await _error(await world.chat(key["key"]), 402, "budget_exceeded")
    assert len(world.upstream.received) == 3


@pytest.mark.parametrize(
    ("model", "messages", "charged"),
    [
        ("openai/gpt-oss-20b", 3, "0.3"),
        ("openai/gpt-oss-120b", 3, "0.75"),
        ("google/gemini-2.5-flash-lite", 7, "1.05"),
        ("google/gemini-2.5-flash", 2, "2"),
        ("google/gemini-2.5-pro", 1, "3"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_charge_is_messages_times_price(
    world: World, model: str, messages: int, charged: str, stream: bool
) -> None:
    key = await world.key("alice")
    await world.budget("team", "eng", "100")
    resp = await world.chat(key["key"], messages=messages, model=model, stream=stream)
    assert resp.status == 200
    text = await resp.text()
    assert resp.headers["X-Credits-Charged"] == charged
    micros = round(float(charged) * 1_000_000)
    assert resp.headers["X-Credits-Remaining"] == format_credits(100_000_000 - micros)
    request_id = resp.headers["X-Request-Id"]
    rows = await world.sql(
        "SELECT model, message_count, unit_price_micros, credits_micros, outcome, upstream_status, stream, "
        "prompt_tokens, completion_tokens, total_tokens FROM ledger WHERE request_id = :r",
        r=request_id,
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row[0], row[1], row[3], row[4], row[5], bool(row[6])) == (
        model,
        messages,
        micros,
        "charged",
        200,
        stream,
    )
    assert row[2] * messages == micros
    assert (row[7], row[8], row[9]) == (7 * messages, 6, 7 * messages + 6)
    if stream:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert text.rstrip().endswith("data: [DONE]")
    else:
        assert json.loads(text)["object"] == "chat.completion"
    assert await world.sql("SELECT * FROM holds") == []
    await assert_counters_match_ledger(world)


async def test_no_budget_means_no_limit_and_no_remaining_header(world: World) -> None:
    key = await world.key("carol")
    resp = await world.chat(key["key"], messages=50, model="google/gemini-2.5-pro")
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "150"
    assert "X-Credits-Remaining" not in resp.headers


async def test_remaining_is_smallest_across_budgets(world: World) -> None:
    key = await world.key("alice")
    await world.budget("team", "eng", "10")
    await world.budget("user", "alice", "2")
    await world.budget("key", key["id"], "5", period="monthly")
    resp = await world.chat(key["key"], messages=5)
    assert resp.headers["X-Credits-Remaining"] == "1.5"


async def test_callers_key_never_reaches_upstream(world: World) -> None:
    key = await world.key("alice")
    for stream in (False, True):
        resp = await world.chat(key["key"], stream=stream)
        assert resp.status == 200
        await resp.read()
    assert len(world.upstream.received) == 2
    for received in world.upstream.received:
        assert received.authorization == "Bearer upstream-secret"
        assert key["key"] not in json.dumps(received.headers)
        assert key["key"] not in json.dumps(received.body)


async def test_openai_path_behaves_the_same(world: World) -> None:
    key = await world.key("alice")
    resp = await world.client.post(
        "/v1/chat/completions",
        json={
            "model": "openai/gpt-oss-120b",
            "messages": [{"role": "system", "content": "s"}, {"role": "user"}],
        },
        headers={"Authorization": f"Bearer {key['key']}"},
    )
    assert resp.status == 200
    assert resp.headers["X-Credits-Charged"] == "0.5"


async def test_stream_first_chunk_arrives_before_upstream_finishes(world: World) -> None:
    key = await world.key("alice")
    world.upstream.chunk_delay = 0.3  # six chunks: upstream takes about two seconds in all
    resp = await world.chat(key["key"], stream=True)
    assert resp.status == 200
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await resp.content.readuntil(b"\n\n")
    first_at = loop.time() - started
    assert b'"Hello"' in first
    rest = await resp.read()
    total = loop.time() - started
    assert b"[DONE]" in rest
    assert first_at < 0.25 and total > 1.0, (first_at, total)


@pytest.mark.parametrize(("trigger", "status"), [("fake:500", 500), ("fake:429", 429), ("fake:400", 400)])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_is_relayed_and_not_charged(
    world: World, trigger: str, status: int, stream: bool
) -> None:
    key = await world.key("alice")
    await world.budget("user", "alice", "1")
    body = {
        "model": "openai/gpt-oss-20b",
        "messages": [{"role": "user", "content": trigger}],
        "stream": stream,
    }
    resp = await world.client.post(
        "/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert resp.status == status
    assert (await resp.json())["error"]["message"] == f"fake upstream error {status}"
    assert resp.headers["X-Credits-Charged"] == "0"
    assert resp.headers["X-Credits-Remaining"] == "1"
    rows = await world.sql("SELECT outcome, upstream_status, credits_micros FROM ledger")
    assert rows == [("upstream_error", status, 0)]
    assert await world.sql("SELECT * FROM holds") == []
    await assert_counters_match_ledger(world)
    budget = (await world.admin(budgeting.list_budgets, "user", "alice"))[0]
    assert (budget["spent"], budget["held"]) == (0, 0)


async def _refused_upstream(w: World, expected_status: int, kind: str, outcome: str) -> None:
    key = await w.key("alice")
    await w.budget("user", "alice", "1")
    error = await _error(await w.chat(key["key"]), expected_status, kind)
    assert error["message"]
    rows = await w.sql("SELECT outcome, credits_micros FROM ledger")
    assert rows == [(outcome, 0)]
    assert await w.sql("SELECT * FROM holds") == []
    await assert_counters_match_ledger(w)


async def test_upstream_connection_refused(world: World) -> None:
    await world.reconfigure(upstream_url="http://127.0.0.1:9/api/v1/chat")
    await _refused_upstream(world, 502, "upstream_unavailable", "upstream_unavailable")


async def test_upstream_timeout_before_headers(world: World) -> None:
    await world.reconfigure(upstream_timeout_seconds=0.3)
    world.upstream.header_delay = 2
    await _refused_upstream(world, 504, "upstream_timeout", "upstream_timeout")


async def test_upstream_reset_before_headers(world: World) -> None:
    key = await world.key("alice")
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:reset"}]}
    resp = await world.client.post(
        "/api/v1/chat", json=body, headers={"Authorization": f"Bearer {key['key']}"}
    )
    await _error(resp, 502, "upstream_unavailable")
    assert await world.sql("SELECT outcome, credits_micros FROM ledger") == [("upstream_unavailable", 0)]
    await assert_counters_match_ledger(world)


async def test_healthz_and_readyz(world: World) -> None:
    assert (await world.client.get("/healthz")).status == 200
    resp = await world.client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["status"] == "ready"


async def test_unknown_route_is_json(world: World) -> None:
    resp = await world.client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "not_found"


async def test_a_refused_request_is_freed_at_once_not_left_for_the_collector(world: World) -> None:
    """A refusal's traceback holds the frames it came through, the handler's with the request body
    (up to the size limit) among them: if a reference cycle ran through it, a flood of refused large
    requests would be kept until a collection (it took a gateway to nearly 1 GB). Through the
    store's batch (a lone unit, which raises), a group (whose refusals are returned), and units
    raising in a batch of several."""
    key = await world.key("alice")
    await world.budget("user", "alice", "0")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await _error(await world.chat(key["key"]), 402, "budget_exceeded")
        answers = await asyncio.gather(*(world.chat(key["key"]) for _ in range(5)))
        # With an Idempotency-Key, a unit of its own in the batch, which raises the refusal.
        answers += await asyncio.gather(
            *(
                world.client.post(
                    "/api/v1/chat",
                    json={"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {key['key']}", "Idempotency-Key": f"refused-{i}"},
                )
                for i in range(5)
            )
        )
        assert [a.status for a in answers] == [402] * 10
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, BudgetExceeded)]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
