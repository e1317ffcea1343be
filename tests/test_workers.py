"""`gateway serve --workers N`: N processes on one port that count, sweep and stop as one server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.ops.cli import main
from gateway.ops.metrics import Metrics, exposition, merge, snapshot, totals
from gateway.ops.settings import ConfigError, Settings
from gateway.ops.workers import WORKER_HEADER, Worker
from gateway.store import open_store

from .conftest import Backend, counters_equal_ledger_sql
from .procs import GatewayProcess, start_gateway, wait_ready

TTL = 4.0
ENV = {"GATEWAY_UPSTREAM_TIMEOUT_SECONDS": "3", "GATEWAY_HOLD_TTL_SECONDS": str(TTL), "GATEWAY_WORKERS": "2"}
BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}] * 2}


# ------------------------------------------------------------------ settings


def test_workers_come_from_flag_environment_or_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("workers = 3\n")
    assert Settings.load(environ={}).workers == 1
    assert Settings.load(config, environ={}).workers == 3
    assert Settings.load(config, environ={"GATEWAY_WORKERS": "4"}).workers == 4
    assert Settings.load(config, environ={"GATEWAY_WORKERS": "4"}, flags={"workers": "2"}).workers == 2
    assert Settings.load(config, environ={}, flags={"workers": None}).workers == 3


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--workers", "0"], {}, "--workers"),
        (["--workers", "two"], {}, "--workers"),
        ([], {"GATEWAY_WORKERS": "-1"}, "GATEWAY_WORKERS"),
        ([], {"GATEWAY_WORKERS": "100000"}, "GATEWAY_WORKERS"),
    ],
)
def test_a_bad_worker_count_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    names: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=names):
        Settings.load(environ=env, flags={"workers": argv[1] if argv else None})
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert names in err and "Traceback" not in err


# ------------------------------------------------------------------ adding processes' metrics up


def _two_processes() -> tuple[Metrics, Metrics]:
    first, second = Metrics(), Metrics()
    first.requests.labels("m", "charged").inc(3)
    second.requests.labels("m", "charged").inc(4)
    second.requests.labels("m", "budget_exceeded").inc()
    first.request_duration.labels("m", "false").observe(0.2)
    second.request_duration.labels("m", "false").observe(7.0)
    first.holds_expired.inc(2)
    first.inflight.inc(2)
    second.inflight.inc()
    for metrics, spent in ((first, 5.0), (second, 4.0)):
        metrics.budget_limit.labels("team", "eng", "daily").set(100)
        metrics.budget_spent.labels("team", "eng", "daily").set(spent)
    return first, second


def _samples(exposed: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(exposed.decode()):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"{key} exposed twice"
            out[key] = s.value
    return out


def test_merged_metrics_add_counters_and_histograms_and_show_budgets_once() -> None:
    first, second = _two_processes()
    merged = _samples(exposition(merge([snapshot(first.registry), snapshot(second.registry)])))
    charged = ("model", "m"), ("outcome", "charged")
    assert merged[("gateway_requests_total", charged)] == 7
    assert merged[("gateway_requests_total", (("model", "m"), ("outcome", "budget_exceeded")))] == 1
    assert merged[("gateway_requests_created", charged)] == first.requests.labels("m", "charged").created
    duration = ("model", "m"), ("stream", "false")
    assert merged[("gateway_request_duration_seconds_count", duration)] == 2
    assert merged[("gateway_request_duration_seconds_sum", duration)] == pytest.approx(7.2)
    assert merged[("gateway_request_duration_seconds_bucket", (("le", "0.25"), *duration))] == 1
    assert merged[("gateway_request_duration_seconds_bucket", (("le", "10.0"), *duration))] == 2
    assert merged[("gateway_holds_expired_total", ())] == 2
    assert merged[("gateway_inflight_requests", ())] == 3
    budget = ("period", "daily"), ("scope", "team"), ("subject", "eng")
    assert merged[("gateway_budget_limit_credits", budget)] == 100  # once, from the first
    assert merged[("gateway_budget_spent_credits", budget)] == 5


def test_one_process_is_exposed_as_prometheus_client_exposes_it() -> None:
    first, _ = _two_processes()
    assert exposition(merge([snapshot(first.registry)])) == generate_latest(first.registry)


def test_a_stopped_process_leaves_its_counts_not_its_gauges() -> None:
    first, second = _two_processes()
    left = totals(snapshot(first.registry))
    merged = _samples(exposition(merge([snapshot(second.registry), left])))
    assert merged[("gateway_requests_total", (("model", "m"), ("outcome", "charged")))] == 7
    assert merged[("gateway_inflight_requests", ())] == 1
    budget = ("period", "daily"), ("scope", "team"), ("subject", "eng")
    assert merged[("gateway_budget_spent_credits", budget)] == 4


# ------------------------------------------------------------------ one worker's part


async def test_only_worker_0_sweeps_and_reads_the_budgets(
    store: Any, fake: Any, settings_for: Any, aiohttp_client: Any, tmp_path: Path
) -> None:
    """Worker 1 beats and names itself, but leaves a dead process's hold and the budget gauges to
    worker 0, which releases the one and shows the other as soon as it starts."""
    from gateway.core import admission
    from gateway.core.metering import Caller, Charge
    from gateway.web.app import create_app

    _, upstream_url = fake
    at = now_us()
    await store.run(services.create_team, "eng", at)
    user = await store.run(services.create_user, "alice", "eng", at)
    key = await store.run(services.create_key, "alice", None, at)
    await store.run(budgeting.set_budget, "user", "alice", "total", "10", at)
    caller = Caller(key["id"], user["id"], "alice", None, None)
    charge = Charge("dead-one", caller, "openai/gpt-oss-20b", 1, 100_000, 100_000, False)
    await store.run(admission.admit, charge, "dead", at - 3_600_000_000)
    settings = settings_for(upstream_url, workers=2)

    started: dict[int, Metrics] = {}
    for index in (1, 0):
        metrics = started[index] = Metrics()
        worker = Worker(index, 2, tmp_path)
        client = await aiohttp_client(create_app(settings, store=store, metrics=metrics, worker=worker))
        resp = await client.get("/healthz")
        assert resp.headers[WORKER_HEADER] == str(os.getpid())
        if index == 1:
            assert await _count(store, "SELECT COUNT(*) FROM holds") == 1
            assert await _count(store, "SELECT COUNT(*) FROM instances") == 1
    assert await _count(store, "SELECT COUNT(*) FROM holds") == 0
    assert await _count(store, "SELECT COUNT(*) FROM instances") == 2
    await _until(lambda: _has_budget(started[0]), 5, "worker 0's budget gauges")
    assert not list(started[1].budget_limit.collect())[0].samples


async def _has_budget(metrics: Metrics) -> bool:
    return bool(list(metrics.budget_limit.collect())[0].samples)


# ------------------------------------------------------------------ real servers


async def _alice_of_eng(store: Any) -> str:
    """Team eng with a daily budget of 100, its user alice, and her key's secret."""
    at = now_us()
    await store.run(services.create_team, "eng", at)
    await store.run(services.create_user, "alice", "eng", at)
    key = (await store.run(services.create_key, "alice", None, at))["key"]
    await store.run(budgeting.set_budget, "team", "eng", "daily", "100", at)
    return str(key)


async def _count(store: Any, query: str) -> int:
    return int(await store.run(lambda conn: conn.execute(text(query)).scalar_one()))


def _workers_of(server: GatewayProcess) -> dict[int, int]:
    """The live worker processes of a server: index -> pid."""
    parent = server.process.pid
    found: dict[int, int] = {}
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                if arg.startswith(b"--worker-index="):
                    found[int(arg.partition(b"=")[2])] = int(pid)
    return found


def _fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new connection a request, so the kernel picks a worker each time."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def _serving_pids(server: GatewayProcess, tries: int = 40) -> set[int]:
    async with _fresh_connections() as session:
        pids = set()
        for _ in range(tries):
            async with session.get(server.url + "/healthz") as resp:
                pids.add(int(resp.headers[WORKER_HEADER]))
        return pids


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def _scrape(session: aiohttp.ClientSession, server: GatewayProcess) -> tuple[int, dict[str, float]]:
    """(pid of the worker that answered, per metric: the sum of its samples, `_created` left out)."""
    async with session.get(server.url + "/metrics") as resp:
        body = await resp.text()
        pid = int(resp.headers[WORKER_HEADER])
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if not s.name.endswith("_created"):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    return pid, sums


async def _chat(session: aiohttp.ClientSession, server: GatewayProcess, key: str, stream: bool) -> int:
    """One chat request; the pid of the worker that answered it (0 if the connection broke)."""
    try:
        async with session.post(
            server.url + "/api/v1/chat",
            json=dict(BODY, stream=stream),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
            return int(resp.headers[WORKER_HEADER])
    except aiohttp.ClientError:
        return 0


async def _stop(server: GatewayProcess, pids: list[int]) -> None:
    """SIGTERM to the parent: it and every worker exit, the parent with 0."""
    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.process.wait, 20) == 0, server.log.read_text()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def _verify(database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ledger", "verify"], env=env, capture_output=True, text=True
    )


@pytest.mark.slow
async def test_two_workers_serve_one_port_and_count_as_one_server(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    _, upstream_url = fake
    store = open_store(backend.url)
    server = start_gateway(backend.url, upstream_url, tmp_path, **ENV)
    try:
        key = await _alice_of_eng(store)
        await wait_ready(server)
        await _until(lambda: asyncio.to_thread(lambda: len(_workers_of(server)) == 2), 20, "two workers")
        pids = sorted(_workers_of(server).values())
        await _until(lambda: _both(server, pids), 20, "both workers serving")

        requests = 40
        async with _fresh_connections() as session:
            answered = await asyncio.gather(
                *(_chat(session, server, key, i % 2 == 0) for i in range(requests))
            )
            assert sorted(set(answered)) == pids  # both workers answered chat requests

            scraped: dict[int, dict[str, float]] = {}

            async def every_worker_counts_all() -> bool:
                pid, sums = await _scrape(session, server)
                assert sums["gateway_requests_total"] <= requests
                scraped[pid] = sums
                return set(scraped) == set(pids) and all(
                    s["gateway_requests_total"] == requests for s in scraped.values()
                )

            await _until(every_worker_counts_all, 10, "a scrape of either worker counting every request")
        for sums in scraped.values():
            assert sums["gateway_request_duration_seconds_count"] == requests
            assert sums["gateway_credits_charged_total"] == pytest.approx(requests * 0.2)
            assert sums["gateway_messages_charged_total"] == 2 * requests
            assert sums["gateway_inflight_requests"] == 0
        # One budget, shown once (by worker 0, the one that reads them); both workers beat.
        async with _fresh_connections() as session:

            async def budget_shown_once() -> bool:
                return (await _scrape(session, server))[1].get("gateway_budget_limit_credits") == 100

            await _until(budget_shown_once, 10, "the budget gauge")
        assert await _count(store, "SELECT COUNT(*) FROM instances") == 2

        await _stop(server, pids)
        assert await _count(store, "SELECT COUNT(*) FROM instances") == 0
        assert await _count(store, "SELECT COUNT(*) FROM ledger WHERE outcome = 'charged'") == requests
        assert _verify(backend.url).returncode == 0
    finally:
        server.stop()
        await store.close()


async def _both(server: GatewayProcess, pids: list[int]) -> bool:
    return await _serving_pids(server) == set(pids)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_killed_worker_is_replaced_and_its_holds_expire(
    backend: Backend, fake: Any, tmp_path: Any
) -> None:
    upstream, upstream_url = fake
    store = open_store(backend.url)
    server = start_gateway(backend.url, upstream_url, tmp_path, **ENV)
    watching: asyncio.Future[None] | None = None
    try:
        key = await _alice_of_eng(store)
        await wait_ready(server)
        await _until(lambda: asyncio.to_thread(lambda: len(_workers_of(server)) == 2), 20, "two workers")
        before = _workers_of(server)
        await _until(lambda: _both(server, sorted(before.values())), 20, "both workers serving")

        async with _fresh_connections() as session:
            first = 10
            assert 0 not in await asyncio.gather(*(_chat(session, server, key, False) for _ in range(first)))

            async def counted(total: float) -> bool:
                return (await _scrape(session, server))[1]["gateway_requests_total"] == total

            await _until(lambda: counted(first), 10, "the first requests counted")

            # Every scrape from here on, to see that no counter goes down across the restart.
            totals: list[tuple[float, float]] = []

            async def watch() -> None:
                async with _fresh_connections() as watcher:
                    while True:
                        with contextlib.suppress(aiohttp.ClientError):
                            sums = (await _scrape(watcher, server))[1]
                            totals.append(
                                (
                                    sums["gateway_requests_total"],
                                    sums["gateway_request_duration_seconds_count"],
                                )
                            )
                        await asyncio.sleep(0.05)

            watching = asyncio.ensure_future(watch())

            # Requests in flight on both workers when worker 1 (not the sweeper) is killed.
            upstream.header_delay = 2.5
            in_flight = 30
            calls = [asyncio.ensure_future(_chat(session, server, key, i % 2 == 0)) for i in range(in_flight)]
            await _until(
                lambda: _count_is(store, "SELECT COUNT(*) FROM holds", in_flight),
                10,
                "holds of every request",
            )
            os.kill(before[1], signal.SIGKILL)
            killed_at = time.monotonic()
            answered = await asyncio.gather(*calls)
            upstream.header_delay = 0
            lost = answered.count(0)
            assert 0 < lost < in_flight and set(answered) - {0} == {before[0]}

            # Replaced: a new process for index 1, serving beside worker 0.
            await _until(
                lambda: asyncio.to_thread(lambda: _workers_of(server).get(1, before[1]) != before[1]),
                10,
                "a new worker 1",
            )
            after = _workers_of(server)
            assert after[0] == before[0]
            await _until(lambda: _both(server, sorted(after.values())), 20, "the new worker serving")

            # Its holds are released by worker 0, after the TTL and not before.
            await _until(
                lambda: _count_is(store, "SELECT COUNT(*) FROM holds", 0), TTL + 10, "holds released"
            )
            assert time.monotonic() - killed_at >= TTL * 0.9, "holds were released before the TTL"

            # The counters went on from the dead worker's: every answered request is counted.
            async def all_counted() -> bool:
                sums = (await _scrape(session, server))[1]
                return (
                    sums["gateway_requests_total"] == first + in_flight - lost
                    and sums["gateway_holds_expired_total"] == lost
                )

            await _until(all_counted, 10, "every answered request and expired hold counted")
            await _cancel(watching)
            assert len(totals) > 50 and totals[0][0] >= first
            for series in zip(*totals, strict=True):
                assert list(series) == sorted(series), f"a counter went down: {series}"

        rows = await store.run(
            lambda c: c.execute(
                text("SELECT outcome, COUNT(*) FROM ledger GROUP BY outcome ORDER BY 1")
            ).all()
        )
        assert [tuple(r) for r in rows] == [("charged", first + in_flight - lost), ("expired", lost)]
        for row in await store.run(lambda c: c.execute(text(counters_equal_ledger_sql())).all()):
            assert (row[2], row[3]) == (row[4], row[5]), row
        verify = _verify(backend.url)
        assert verify.returncode == 0, verify.stdout + verify.stderr

        await _stop(server, sorted(after.values()))
        assert "was killed by SIGKILL; starting another" in server.log.read_text()
    finally:
        if watching is not None:
            await _cancel(watching)
        server.stop()
        await store.close()


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _count_is(store: Any, query: str, expected: int) -> bool:
    return await _count(store, query) == expected
