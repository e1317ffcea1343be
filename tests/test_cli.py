"""The CLI on the database named by the configuration; the demo's printed curl; the OpenAI SDK."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.ops.cli import main, run_loop, tune_collector
from gateway.store import migrate

from .conftest import Backend, World
from .procs import free_port


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_commands(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    code, out, _ = _run(capsys, "teams", "create", "eng", "--json")
    assert code == 0 and json.loads(out)["name"] == "eng"
    code, _, err = _run(capsys, "teams", "create", "eng")
    assert code == 1 and "already exists" in err
    code, _, err = _run(capsys, "users", "create", "alice", "--team", "nope")
    assert code == 1 and "No team named 'nope'" in err
    assert _run(capsys, "users", "create", "alice", "--team", "eng")[0] == 0
    code, out, _ = _run(capsys, "keys", "create", "alice", "--name", "laptop", "--json")
    key = json.loads(out)
    assert key["key"].startswith("gwk_") and key["user"] == "alice" and key["name"] == "laptop"
    code, out, _ = _run(capsys, "keys", "list", "--user", "alice", "--json")
    listed = json.loads(out)
    assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]
    assert key["key"] not in out
    code, out, _ = _run(capsys, "budgets", "set", "team", "eng", "12.5", "--period", "monthly", "--json")
    assert json.loads(out) | {"window_start": None, "resets_at": None} == {
        "scope": "team",
        "subject": "eng",
        "period": "monthly",
        "limit": 12.5,
        "spent": 0,
        "held": 0,
        "remaining": 12.5,
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
    # A zone and a billing cycle (issue 27): windows from the 15th's midnight in California.
    code, out, _ = _run(
        capsys,
        "budgets",
        "set",
        "team",
        "eng",
        "12.5",
        "--period",
        "monthly",
        "--timezone",
        "America/Los_Angeles",
        "--month-starts-on",
        "15",
        "--json",
    )
    cycle = json.loads(out)
    assert (cycle["timezone"], cycle["month_starts_on"]) == ("America/Los_Angeles", 15)
    assert cycle["window_start"][8:19] == "15T00:00:00" and cycle["window_start"][-6:] in ("-08:00", "-07:00")
    code, _, err = _run(
        capsys, "budgets", "set", "team", "eng", "1", "--period", "daily", "--timezone", "Mars/Olympus"
    )
    assert code == 1 and "unknown time zone 'Mars/Olympus'" in err
    code, _, err = _run(
        capsys, "budgets", "set", "team", "eng", "1", "--period", "daily", "--month-starts-on", "31"
    )
    assert code == 1 and "from 1 to 28" in err
    assert _run(capsys, "budgets", "set", "key", key["id"], "1", "--period", "total")[0] == 0
    code, out, _ = _run(capsys, "budgets", "list")
    assert "eng" in out and "monthly" in out and key["id"] in out
    # A soft budget with its own thresholds (issue 17); bad thresholds are named.
    code, out, _ = _run(
        capsys,
        "budgets",
        "set",
        "user",
        "alice",
        "5",
        "--period",
        "daily",
        "--soft",
        "--alert-at",
        "50,90",
        "--json",
    )
    assert (json.loads(out)["enforce"], json.loads(out)["alert_at"]) == (False, [50, 90])
    code, out, _ = _run(capsys, "budgets", "list", "--scope", "user")
    assert "ENFORCE" in out and "ALERT_AT" in out and "False" in out and "50,90" in out
    code, _, err = _run(
        capsys, "budgets", "set", "user", "alice", "5", "--period", "daily", "--alert-at", "0"
    )
    assert code == 1 and "alert_at" in err
    code, _, err = _run(capsys, "budgets", "set", "team", "eng", "-3", "--period", "daily")
    assert code == 1 and "limit" in err
    assert _run(capsys, "budgets", "delete", "team", "eng", "--period", "monthly")[0] == 0
    code, _, err = _run(capsys, "budgets", "delete", "team", "eng", "--period", "monthly")
    assert code == 1 and "No monthly team budget" in err
    code, out, _ = _run(capsys, "keys", "revoke", key["id"])
    assert code == 0 and "revoked" in out
    code, out, _ = _run(capsys, "keys", "list", "--json")
    assert json.loads(out)[0]["revoked_at"] is not None
    code, _, err = _run(capsys, "keys", "revoke", "key_missing")
    assert code == 1 and "No key" in err


def test_json_amounts_are_exact(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json writes credit amounts from the micro-credits: no float rounding, no 1e-06."""
    monkeypatch.setenv("GATEWAY_DATABASE_URL", backend.url)
    assert _run(capsys, "teams", "create", "eng")[0] == 0
    code, out, _ = _run(
        capsys, "budgets", "set", "team", "eng", "123456789012.345678", "--period", "daily", "--json"
    )
    assert code == 0 and '"limit": 123456789012.345678' in out
    assert _run(capsys, "budgets", "set", "team", "eng", "0.000001", "--period", "total")[0] == 0
    code, out, _ = _run(capsys, "budgets", "list", "--json")
    listed = {b["period"]: b for b in json.loads(out, parse_float=Decimal)}
    assert listed["daily"]["limit"] == listed["daily"]["remaining"] == Decimal("123456789012.345678")
    assert listed["total"]["limit"] == Decimal("0.000001") and '"limit": 0.000001' in out
    code, out, _ = _run(capsys, "budgets", "list")
    assert code == 0 and "123456789012.345678" in out and "0.000001" in out


def test_database_down_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql+asyncpg://nobody@127.0.0.1:9/none")
    code, _, err = _run(capsys, "teams", "list")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "cannot use the database" in err


def test_database_without_schema_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    code, _, err = _run(capsys, "teams", "create", "eng")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "no such table" in err and "gateway db upgrade" in err


def test_serve_without_migrating_refuses_a_database_behind_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica started with --no-migrate before `gateway db upgrade` would fail every request."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "0004")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", url)
    monkeypatch.setenv("GATEWAY_UPSTREAM_URL", "http://127.0.0.1:9/api/v1/chat")
    code, _, err = _run(capsys, "serve", "--no-migrate")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"at migration 0004 but this gateway needs {migrate.head()}" in err
    assert "gateway db upgrade" in err


def test_servers_run_on_uvloop() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(loop_module()).startswith("uvloop")


def test_serving_the_collector_leaves_requests_objects_alone() -> None:
    """After `tune_collector` (as `gateway serve` calls it), a burst of objects made and dropped, as
    the requests in flight make them, starts no collection; at the default threshold it did."""

    def collections() -> int:
        return sum(int(stats["collections"]) for stats in gc.get_stats())

    def burst() -> int:
        before = collections()
        for _ in range(20):
            held = [{"request": i} for i in range(2_000)]
            del held
        return collections() - before

    default = gc.get_threshold()
    try:
        assert burst() > 0
        tune_collector()
        assert burst() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*default)


async def test_the_tests_run_on_the_servers_event_loop() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


@pytest.mark.slow
def test_demo_prints_a_curl_that_works(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_LOG_LEVEL": "WARNING"}
    env.pop("GATEWAY_DATABASE_URL", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            lines.append(line)
            if lines and lines[-1].strip() == "" and any(x.startswith("curl") for x in lines):
                break
        start = next(i for i, x in enumerate(lines) if x.startswith("curl"))
        command = "".join(lines[start:]).strip()
        for _ in range(50):
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=10)
            if result.returncode == 0:
                break
            time.sleep(0.2)
        assert result.returncode == 0, result.stderr
        assert "X-Credits-Charged: 0.1" in result.stdout
        assert '"chat.completion"' in result.stdout
        assert (tmp_path / "gateway.db").exists()
    finally:
        demo.terminate()
        demo.wait(timeout=10)
        if demo.stdout is not None:
            demo.stdout.close()


async def test_openai_sdk_plain_and_streamed(world: World) -> None:
    openai = pytest.importorskip("openai")
    key = await world.key("alice")
    client = openai.AsyncOpenAI(base_url=str(world.client.make_url("/v1")), api_key=key["key"], max_retries=0)
    try:
        plain = await client.chat.completions.create(
            model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}]
        )
        assert plain.choices[0].message.content == "Hello from the fake upstream."
        raw = await client.chat.completions.with_raw_response.create(
            model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-credits-charged"] == "1"
        stream = await client.chat.completions.create(
            model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert text == "Hello from the fake upstream."
        with pytest.raises(openai.AuthenticationError):
            await client.with_options(api_key="wrong").chat.completions.create(
                model="google/gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await client.close()
    rows = await world.sql("SELECT outcome, credits_micros, stream FROM ledger ORDER BY admitted_at")
    assert [(r[0], r[1], bool(r[2])) for r in rows] == [
        ("charged", 1_000_000, False),
        ("charged", 1_000_000, False),
        ("charged", 1_000_000, True),
    ]
