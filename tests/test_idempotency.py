"""Idempotency-Key: a retried request is answered once and charged once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.core import expiry, idempotency, metering

from .conftest import World, assert_counters_match_ledger

BODY = {"model": "openai/gpt-oss-120b", "messages": [{"role": "user", "content": "hi"}] * 2}  # 0.5


async def _post(w: World, key: str, idem: str | None, body: Any = BODY) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return await w.client.post("/api/v1/chat", data=json.dumps(body), headers=headers)


async def test_retry_is_replayed_and_charged_once(world: World) -> None:
    key = (await world.key("alice"))["key"]
    await world.budget("user", "alice", "10")
    first = await _post(world, key, "order-1")
    assert first.status == 200 and first.headers["X-Credits-Charged"] == "0.5"
    first_body = await first.read()
    again = await _post(world, key, "order-1")
    assert again.status == 200
    assert await again.read() == first_body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-Request-Id"] == first.headers["X-Request-Id"]
    assert again.headers["X-Credits-Charged"] == "0"
    assert len(world.upstream.received) == 1
    assert await world.sql("SELECT COUNT(*), SUM(credits_micros) FROM ledger") == [(1, 500_000)]
    await assert_counters_match_ledger(world)


async def test_same_key_other_body_is_422(world: World) -> None:
    key = (await world.key("alice"))["key"]
    assert (await _post(world, key, "k")).status == 200
    resp = await _post(world, key, "k", dict(BODY, model="openai/gpt-oss-20b"))
    assert resp.status == 422
    assert (await resp.json())["error"]["type"] == "idempotency_mismatch"
    assert len(world.upstream.received) == 1


async def test_concurrent_duplicates_run_once(world: World) -> None:
    key = (await world.key("alice"))["key"]
    await world.budget("user", "alice", "10")
    world.upstream.header_delay = 0.3
    responses = await asyncio.gather(*(_post(world, key, "dup") for _ in range(20)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [409] * 19, statuses
    for r in responses:
        if r.status == 409:
            assert (await r.json())["error"]["type"] == "idempotency_in_flight"
    assert len(world.upstream.received) == 1
    assert await world.sql("SELECT COUNT(*), SUM(credits_micros) FROM ledger") == [(1, 500_000)]
    # Once the first has finished, a retry gets its answer.
    replay = await _post(world, key, "dup")
    assert replay.status == 200 and replay.headers["Idempotent-Replayed"] == "true"
    await assert_counters_match_ledger(world)


async def test_keys_are_scoped_to_the_caller(world: World) -> None:
    alice, bob = (await world.key("alice"))["key"], (await world.key("bob"))["key"]
    assert (await _post(world, alice, "shared")).status == 200
    resp = await _post(world, bob, "shared")
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(world.upstream.received) == 2


async def test_failed_first_attempt_can_be_retried(world: World) -> None:
    key = (await world.key("alice"))["key"]
    failing = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "fake:500"}]}
    assert (await _post(world, key, "retry-me", failing)).status == 500
    assert (await _post(world, key, "retry-me", failing)).status == 500  # not replayed: sent again
    assert len(world.upstream.received) == 2
    assert await world.sql("SELECT COUNT(*), SUM(credits_micros) FROM ledger") == [(2, 0)]


async def test_refused_first_attempt_can_be_retried(world: World) -> None:
    key = (await world.key("alice"))["key"]
    await world.budget("user", "alice", "0.1")
    assert (await _post(world, key, "later")).status == 402
    await world.budget("user", "alice", "1")
    assert (await _post(world, key, "later")).status == 200


async def test_streamed_first_answer_is_not_sent_twice(world: World) -> None:
    key = (await world.key("alice"))["key"]
    body = dict(BODY, stream=True)
    first = await _post(world, key, "s", body)
    assert first.status == 200
    await first.read()
    again = await _post(world, key, "s", body)
    assert again.status == 409
    error = (await again.json())["error"]
    assert error["request_id"] == first.headers["X-Request-Id"]
    assert len(world.upstream.received) == 1


@pytest.mark.parametrize("value", ["", "x" * 256, "bad\u00e9"])
async def test_bad_key_is_400(world: World, value: str) -> None:
    key = (await world.key("alice"))["key"]
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": value}
    resp = await world.client.post("/api/v1/chat", json=BODY, headers=headers)
    assert resp.status == 400
    assert world.upstream.received == []


async def test_expired_hold_frees_the_key(world: World) -> None:
    from gateway.core import metering

    key = (await world.key("alice"))["key"]
    world.upstream.header_delay = 0.5
    task = asyncio.ensure_future(_post(world, key, "crash"))
    while not await world.sql("SELECT 1 FROM holds"):
        await asyncio.sleep(0.02)
    # As if the process had died: its heartbeat is old, the hold expires.
    await world.sql("DELETE FROM instances RETURNING id")
    at = metering.now_us() + 3_600_000_000
    assert await world.admin(expiry.expire_holds, at, at) == 1
    assert await world.sql("SELECT * FROM idempotency_keys") == []
    await task
    world.upstream.header_delay = 0
    resp = await _post(world, key, "crash")
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers


async def test_a_key_older_than_a_day_starts_afresh(world: World) -> None:
    key = (await world.key("alice"))["key"]
    assert (await _post(world, key, "old")).status == 200
    await world.sql("UPDATE idempotency_keys SET created_at = 0 RETURNING key_id")
    resp = await _post(world, key, "old", dict(BODY, model="openai/gpt-oss-20b"))  # another body: no 422
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(world.upstream.received) == 2
    rows = await world.sql("SELECT request_id, state FROM idempotency_keys")
    assert rows == [(resp.headers["X-Request-Id"], "done")]


async def test_old_keys_are_purged_a_batch_at_a_time(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, "PURGE_BATCH", 2)
    key = (await world.key("alice"))["key"]
    for name in ("a", "b", "c", "fresh"):
        assert (await _post(world, key, name)).status == 200
    await world.sql("UPDATE idempotency_keys SET created_at = 0 WHERE idempotency_key <> 'fresh' RETURNING 1")
    now = metering.now_us()
    assert await world.store.run(idempotency.purge, now) == 2
    assert await world.store.run(idempotency.purge, now) == 1
    assert await world.store.run(idempotency.purge, now) == 0
    assert await world.sql("SELECT idempotency_key FROM idempotency_keys") == [("fresh",)]
