"""The fake upstream itself: what tests and trials rely on."""

from __future__ import annotations

from typing import Any

from gateway.ops.fake_upstream import FakeUpstream


async def test_a_long_running_fake_keeps_a_bounded_history(aiohttp_client: Any) -> None:
    fake = FakeUpstream(keep=3)
    client = await aiohttp_client(fake.app())
    for i in range(20):
        body = {"model": "m", "messages": [{"role": "user", "content": str(i)}]}
        resp = await client.post("/api/v1/chat", json=body)
        assert resp.status == 200
    assert 3 <= len(fake.received) <= 6
    assert fake.received[-1].body["messages"][0]["content"] == "19"


async def test_by_default_it_keeps_everything(aiohttp_client: Any) -> None:
    fake = FakeUpstream()
    client = await aiohttp_client(fake.app())
    for _ in range(20):
        await client.post("/api/v1/chat", json={"model": "m", "messages": [{"role": "user"}]})
    assert len(fake.received) == 20
