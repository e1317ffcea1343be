"""The access log (contract §8): one line per chat request and per admin call, never a secret."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from gateway.web.access_log import FIELDS
from gateway.web.state import ACCESS_LOG

from .conftest import ADMIN_TOKEN, World, _secret

SECRET_CONTENT = "the-message-content-nobody-may-log"


@pytest.fixture
async def logged(world: World) -> tuple[World, str]:
    """A gateway with the JSON access log and the admin API on; alice's key, with a small budget."""
    await world.reconfigure(access_log="json", admin_token=_secret(ADMIN_TOKEN))
    key = await world.key("alice")
    await world.budget("user", "alice", "0.5")
    return world, str(key["key"])


def _lines(w: World, capsys: Any) -> list[str]:
    """The lines printed so far (written out as the buffer fills, every second, or at a flush)."""
    w.client.app[ACCESS_LOG].flush()
    return [line for line in capsys.readouterr().out.splitlines() if line]


async def _traffic(w: World, key: str) -> dict[str, Any]:
    """One of each kind of ending; returns the request id of the charged one."""
    content = [{"role": "user", "content": SECRET_CONTENT}] * 3
    charged = await w.client.post(
        "/api/v1/chat",
        json={"model": "openai/gpt-oss-20b", "messages": content},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert charged.status == 200
    streamed = await w.client.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-oss-20b", "messages": content[:1], "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert streamed.status == 200
    await streamed.read()
    assert (await w.chat(None)).status == 401
    assert (await w.chat(key, messages=5)).status == 402
    assert (
        await w.client.get("/admin/v1/teams", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    ).status == 200
    assert (await w.client.get("/admin/v1/teams", headers={"Authorization": "Bearer wrong"})).status == 401
    return {"charged": charged.headers["X-Request-Id"], "streamed": streamed.headers["X-Request-Id"]}


async def test_json_lines_have_the_contracts_fields_and_no_secret(
    logged: tuple[World, str], capsys: Any
) -> None:
    w, key = logged
    capsys.readouterr()
    ids = await _traffic(w, key)
    lines = _lines(w, capsys)
    assert len(lines) == 6, lines
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert tuple(entry) == FIELDS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
        assert entry["end_user"] is None and entry["tags"] == []
        assert entry["duration_ms"] >= 0
    charged, streamed, unauthorized, over_budget, admin_ok, admin_refused = entries
    assert charged | {"ts": None, "duration_ms": None, "upstream_ms": None} == {
        "ts": None,
        "request_id": ids["charged"],
        "method": "POST",
        "path": "/api/v1/chat",
        "status": 200,
        "outcome": "charged",
        "model": "openai/gpt-oss-20b",
        "key_id": charged["key_id"],
        "user": "alice",
        "team": "eng",
        "end_user": None,
        "tags": [],
        "messages": 3,
        "credits": 0.3,
        "stream": False,
        "duration_ms": None,
        "upstream_ms": None,
    }
    assert isinstance(charged["key_id"], str) and charged["key_id"] != key
    assert 0 <= charged["upstream_ms"] <= charged["duration_ms"]
    assert (streamed["request_id"], streamed["path"], streamed["stream"], streamed["credits"]) == (
        ids["streamed"],
        "/v1/chat/completions",
        True,
        0.1,
    )
    assert (unauthorized["status"], unauthorized["outcome"], unauthorized["request_id"]) == (
        401,
        "unauthorized",
        None,
    )
    assert (unauthorized["user"], unauthorized["credits"], unauthorized["upstream_ms"]) == (None, 0, None)
    assert (over_budget["status"], over_budget["outcome"], over_budget["user"]) == (
        402,
        "budget_exceeded",
        "alice",
    )
    assert (over_budget["request_id"], over_budget["messages"], over_budget["credits"]) == (None, 5, 0)
    assert over_budget["model"] == "openai/gpt-oss-20b"
    assert (admin_ok["method"], admin_ok["path"], admin_ok["status"]) == ("GET", "/admin/v1/teams", 200)
    assert admin_refused["status"] == 401
    everything = "\n".join(lines)
    for secret in (key, ADMIN_TOKEN, "upstream-secret", SECRET_CONTENT):
        assert secret not in everything


async def test_text_lines_carry_the_same_fields(logged: tuple[World, str], capsys: Any) -> None:
    w, key = logged
    await w.reconfigure(access_log="text")
    capsys.readouterr()
    ids = await _traffic(w, key)
    lines = _lines(w, capsys)
    assert len(lines) == 6, lines
    for line in lines:
        assert [pair.split("=", 1)[0] for pair in line.split(" ")] == list(FIELDS)
    assert f"request_id={ids['charged']} method=POST path=/api/v1/chat status=200 outcome=charged" in lines[0]
    assert "user=alice team=eng end_user=- tags=[] messages=3 credits=0.3 stream=false" in lines[0]
    assert "status=401 outcome=unauthorized" in lines[2]
    everything = "\n".join(lines)
    for secret in (key, ADMIN_TOKEN, "upstream-secret", SECRET_CONTENT):
        assert secret not in everything


async def test_off_prints_nothing(logged: tuple[World, str], capsys: Any) -> None:
    w, key = logged
    await w.reconfigure(access_log="off")
    capsys.readouterr()
    await _traffic(w, key)
    assert _lines(w, capsys) == []


async def test_an_overloaded_refusal_is_logged(logged: tuple[World, str], capsys: Any) -> None:
    w, key = logged
    await w.reconfigure(max_concurrent_requests=1)
    w.upstream.header_delay = 0.5

    first = asyncio.ensure_future(w.chat(key))
    while not w.upstream.received:
        await asyncio.sleep(0.01)
    capsys.readouterr()
    assert (await w.chat(key)).status == 503
    (line,) = _lines(w, capsys)
    entry = json.loads(line)
    assert (entry["status"], entry["outcome"], entry["request_id"], entry["key_id"]) == (
        503,
        "overloaded",
        None,
        None,
    )
    assert (await first).status == 200


def test_lines_go_out_whole_in_writes_under_pipe_buf(tmp_path: Any) -> None:
    """Buffered, written with os.write in whole lines: a pipe shared by workers never splits one."""
    from gateway.web.access_log import FLUSH_BYTES, AccessLog

    path = tmp_path / "out.log"
    with path.open("w") as out:
        log = AccessLog("json", out)
        entry = {name: "x" * 50 for name in FIELDS}
        for _ in range(100):
            log.write(entry)
        written = path.read_text()
        assert written and len(written) < 100 * (len(json.dumps(entry)) + 1)
        assert written.endswith("\n")
        log.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line) == entry for line in lines)
    assert FLUSH_BYTES < 4096


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_odd_characters_stay_on_one_line(logged: tuple[World, str], capsys: Any, fmt: str) -> None:
    w, key = logged
    await w.reconfigure(access_log=fmt)
    capsys.readouterr()
    odd = 'a"b\nc=d \\ é\u2028'
    assert (await w.chat(key, model=odd)).status == 400
    (line,) = _lines(w, capsys)
    assert line.isascii()
    if fmt == "json":
        entry = json.loads(line)
        assert (entry["model"], entry["outcome"], entry["status"]) == (odd, "unknown_model", 400)
    else:
        assert f"model={json.dumps(odd)} " in line
