"""The web console's page times at scale: 1,000 users, 1,000 keys and a million ledger rows.

    python bench/console.py [--rows N] [--runs N] [--keep PATH]

Fills a fresh SQLite database the way bench/report.py does (its `fill`, with 1,000 users in 50
teams, a key each, and 60 days of ledger rows ending today, so the overview's last 30 days and this
month are full), adds a daily budget per user and a monthly one per team through the gateway's own
`budgeting.set_budget`, and an end-user default; then serves the gateway in this process on a
loopback port, signs in through the form, and requests each page --runs times one after another.
Server time is measured by a middleware put in front of the gateway's own (from the request
reaching the application to its answer being ready); the p50 and p99 of each page are printed,
with the client's round trip beside them. The overview's first load, which computes the cached
earlier days, is shown on its own line. Loopback only; the loop is bounded by --runs.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from sqlalchemy import Connection, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report as report_bench  # noqa: E402  (bench/report.py's fill)

from gateway.core.metering import now_us  # noqa: E402
from gateway.core.windows import window_keys  # noqa: E402
from gateway.ops import budgeting  # noqa: E402
from gateway.ops.settings import Secret, Settings  # noqa: E402
from gateway.store import migrate, open_store  # noqa: E402
from gateway.web.app import create_app  # noqa: E402

USERS = 1_000
TOKEN = "bench-console-token"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def fill(path: Path, rows: int) -> None:
    """bench/report.py's organisation with 1,000 users, and its 60 days ending today."""
    today = now_us() - now_us() % report_bench.DAY_US
    report_bench.USERS = USERS
    report_bench.START_US = today - (report_bench.DAYS - 1) * report_bench.DAY_US
    report_bench.fill(path, rows)


def budgets(conn: Connection) -> None:
    """A daily budget per user and a monthly one per team (every tenth user and fifth team near its
    limit), an end-user default, and their counters of the current windows from the ledger, as
    admission would have kept them."""
    at = now_us()
    for u in range(1, USERS + 1):
        limit = 120 if u % 10 == 0 else 400
        budgeting.set_budget(conn, "user", f"user-{u}", "daily", limit, at)
    for t in range(1, report_bench.TEAMS + 1):
        budgeting.set_budget(conn, "team", f"team-{t}", "monthly", 22_000 if t % 5 == 0 else 60_000, at)
    budgeting.set_budget(conn, "end_user", "user-1/*", "daily", 2, at)
    windows = window_keys(at)
    today = at - at % report_bench.DAY_US
    month = today - (datetime.now(UTC).day - 1) * report_bench.DAY_US
    for scope, column, period, since in (
        ("user", "user_id", "daily", today),
        ("team", "team_id", "monthly", month),
    ):
        conn.execute(
            text(
                "INSERT INTO budget_counters (budget_id, window_start, spent_micros, held_micros) "
                "SELECT b.id, :window, COALESCE((SELECT SUM(l.credits_micros) FROM ledger l "
                f"WHERE l.{column} = CAST(b.subject AS INTEGER) AND l.outcome = 'charged' "
                "AND l.admitted_at >= :since), 0), 0 "
                "FROM budgets b WHERE b.scope = :scope"
            ),
            {"window": windows[period], "since": since, "scope": scope},
        )


def pages() -> list[tuple[str, str]]:
    day = datetime.now(UTC).date()
    month = day.replace(day=1)
    return [
        ("overview", "/ui/"),
        ("teams & users", "/ui/teams"),
        ("users, page 10", "/ui/teams?page=10"),
        ("team", "/ui/team?name=team-7"),
        ("user", "/ui/user?name=user-7"),
        ("keys", "/ui/keys"),
        ("keys, page 15", "/ui/keys?page=15"),
        ("key", "/ui/keys/key_0000000000000007"),
        ("budgets", "/ui/budgets"),
        ("budgets, page 20", "/ui/budgets?page=20"),
        ("ledger", "/ui/ledger"),
        ("ledger, a user", "/ui/ledger?user=user-7"),
        ("ledger, a team and tag", "/ui/ledger?team=team-7&tag=feature:chat"),
        ("ledger, an end user", "/ui/ledger?end_user=cust-7"),
        ("ledger, a day", f"/ui/ledger?from={day}"),
        ("report, team,model, today", f"/ui/reports?group_by=team&group_by=model&from={day}"),
        ("report, team,model, month", f"/ui/reports?group_by=team&group_by=model&from={month}"),
        ("alerts", "/ui/alerts"),
        ("audit", "/ui/audit"),
    ]


async def measure(url: str, runs: int) -> None:
    store = open_store(url)
    await store.run(budgets)
    settings = Settings(database_url=url, admin_token=Secret(TOKEN), access_log="off")
    app = create_app(settings, store=store)
    server_times: dict[str, list[float]] = {}
    current: list[str] = [""]

    @web.middleware
    async def timed(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            return await handler(request)
        finally:
            server_times.setdefault(current[0], []).append(time.perf_counter() - started)

    app.middlewares.insert(0, timed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    client_times: dict[str, list[float]] = {}
    try:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            form = await (await http.get(base + "/ui/signin")).text()
            token = CSRF.search(form).group(1)  # type: ignore[union-attr]
            signed = await http.post(
                base + "/ui/signin", data={"csrf": token, "token": TOKEN}, allow_redirects=False
            )
            assert signed.status == 303, signed.status
            for label, path in [
                ("overview, first load", "/ui/"),
                *[(f"{n} (warm-up)", p) for n, p in pages()],
            ]:
                current[0] = label
                started = time.perf_counter()
                resp = await http.get(base + path)
                await resp.read()
                client_times.setdefault(label, []).append(time.perf_counter() - started)
                assert resp.status == 200, (path, resp.status)
            for _ in range(runs):
                for label, path in pages():
                    current[0] = label
                    started = time.perf_counter()
                    resp = await http.get(base + path)
                    await resp.read()
                    client_times.setdefault(label, []).append(time.perf_counter() - started)
                    assert resp.status == 200, (path, resp.status)
    finally:
        await runner.cleanup()
        await store.close()
    print(f"\n{'page':<28} {'server p50':>10} {'p99':>8} {'client p50':>11} {'p99':>8}   target < 150 ms")
    labels = ["overview, first load", *(label for label, _ in pages())]
    for label in labels:
        s, c = server_times[label], client_times[label]
        p50, p99 = statistics.median(s) * 1000, _p99(s) * 1000
        verdict = "ok" if p99 < 150 else "SLOW"
        print(
            f"{label:<28} {p50:>8.1f}ms {p99:>6.1f}ms {statistics.median(c) * 1000:>9.1f}ms "
            f"{_p99(c) * 1000:>6.1f}ms   {verdict}"
        )


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30, help="requests of each page (after one warm-up)")
    parser.add_argument("--keep", help="build the database at this path and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "console.db"
        if path.exists():
            path.unlink()
        url = f"sqlite+aiosqlite:///{path}"
        migrate.upgrade(url)
        started = time.perf_counter()
        fill(path, args.rows)
        took = time.perf_counter() - started
        print(f"filled {args.rows:,} ledger rows, {USERS:,} users and keys in {took:.0f} s")
        asyncio.run(measure(url, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
