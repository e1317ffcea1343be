"""Issue 14's benchmark: one organisation of many users, each with their own key, on four setups.

One team of --users users (200), each with a key of their own and a daily user budget, and a
monthly team budget, all far too large to block: every request is fully metered (key auth, holds
on the user's and the team's budgets, settlement, a ledger row), and the team's counter row is
shared by every request while the users' rows are not. The accounts are made in one unit of work
per database by the gateway's own admin functions (gateway/ops/services.py and budgeting.py, through
the store), not by hundreds of CLI runs.

Setups, each on a database of its own so that its books and its PostgreSQL commits are its own:

- SQLite x1: one `gateway serve` process on a fresh SQLite file;
- SQLite --workers 2: `gateway serve --workers 2` on another fresh file (skipped when `gateway serve
  --help` lists no `--workers`);
- PostgreSQL x1: one process on a fresh database on 127.0.0.1:5432;
- PostgreSQL x2: two processes, on two ports, sharing another fresh database.

Load is wrk (bench/loadgen.py's closed-loop script: no request cut by wrk's stop), --connections in
total (64) over two threads, each thread pointed at one process of the setup; a `request` function
rotates the keys, round-robin over all of them, so consecutive requests of a connection use
different users (the threads start half the list apart). The setups are measured in interleaved
rounds, the median of each figure shown, so other load on the machine touches them alike. On
PostgreSQL, `pg_stat_database.xact_commit` of the setup's database is read before each run and
again once the backends have flushed their statistics after it: commits per admitted request is
the growth over the 2xx answers, summed over the rounds.

Then the gateways are stopped (SIGTERM: they settle what is in flight), and each setup's books are
checked: no hold left, no budget counter spent over its limit nor holding anything, every 2xx
answer exactly one charged ledger row and nothing else in the ledger, every key used; and
`gateway ledger verify` (the CLI) is run against its database. Finally issue 14's goals are printed
as PASS/FAIL lines. Exit status: 0 all PASS, 1 a check of the books or a verify failed, 2 only a
goal was missed.

    python bench/team.py                  # full run: 3 rounds of 5 s, about 2 minutes
    python bench/team.py --quick          # smoke run: 1 round of 3 s, under a minute
    python bench/team.py --users 50 --connections 128
    python bench/team.py --rev 972aa8f --rev 6326214   # and SQLite x1 of two earlier revisions
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadgen
import proxy
import replicas

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PG_SERVER = replicas.PG_SERVER  # postgres@127.0.0.1:5432, trust auth
WRK_THREADS = 2  # each thread drives one process of a setup (the two of PostgreSQL x2 alike)
BUDGET_CREDITS = "1000000000"  # each user's daily and the team's monthly limit: never reached
CREDITS_PER_REQUEST = len(proxy.MESSAGES) * 100_000  # micro-credits: 3 messages at 0.1
STATS_SETTLE_SECONDS = 1.2  # a PostgreSQL 15 backend flushes its statistics at most once a second
WORKERS = 2

GOAL_PG_VS_SQLITE = 0.6
GOAL_PG_SCALING = 1.3
GOAL_PG_COMMITS = 0.2
GOAL_SQLITE_WORKERS = 1.3

# Run with `python -c` in the gateway's environment: the organisation in each database, one unit
# of work each, with the same functions as `gateway teams/users/keys/budgets`. Prints the secrets.
SETUP_SCRIPT = r"""
import asyncio, json, secrets, sys

try:
    from gateway.ops import budgeting, services
    from gateway.core.metering import now_us
except ImportError:  # an older revision's layout (--rev), before gateway/ops and gateway/core
    from gateway import services
    from gateway.metering import now_us
    budgeting = services
from gateway.store import open_store

users, limit, urls = int(sys.argv[1]), sys.argv[2], sys.argv[3:]


def organisation(conn):
    at, suffix = now_us(), secrets.token_hex(3)
    team = f"org-{suffix}"
    services.create_team(conn, team, at)
    budgeting.set_budget(conn, "team", team, "monthly", limit, at)
    keys = []
    for i in range(users):
        user = f"org-{suffix}-user-{i:04d}"
        services.create_user(conn, user, team, at)
        budgeting.set_budget(conn, "user", user, "daily", limit, at)
        keys.append(services.create_key(conn, user, "bench", at)["key"])
    return keys


async def main():
    made = {}
    for url in urls:
        store = open_store(url, pool_size=1)
        try:
            made[url] = await store.run(organisation)
        finally:
            await store.close()
    print(json.dumps(made))


asyncio.run(main())
"""

# Appended to loadgen's wrk script (whose local `threads` its `done` reads; this `setup` replaces
# its own). Thread i is pointed at process i mod n and its count of requests starts at i * stride;
# request number r takes key r mod #keys, round-robin, and with end users (bench_end_users > 0)
# names end user "eu-" .. ((bench_end_base + r) mod bench_end_users) in the X-Gateway-End-User
# header (numbers below 10^14, which LuaJIT prints in full). The requests are formatted once per
# thread; the end user's header is spliced in after the request line.
WRK_KEYS = """
local bench_ports = {{{ports}}}
local bench_keys = {{{keys}}}
local bench_end_users = {end_users}
local bench_end_base = {end_user_base}
local bench_addrs = nil
function setup(thread)
  if bench_addrs == nil then
    bench_addrs = {{}}
    for _, port in ipairs(bench_ports) do
      table.insert(bench_addrs, wrk.lookup("127.0.0.1", tostring(port))[1])
    end
  end
  table.insert(threads, thread)
  thread.addr = bench_addrs[(#threads - 1) % #bench_addrs + 1]
  thread:set("bench_first", (#threads - 1) * {stride})
end
local bench_requests = nil
local bench_lines = {{}}
local bench_rest = {{}}
local bench_next = 0
function request()
  if bench_requests == nil then
    bench_requests = {{}}
    for i, key in ipairs(bench_keys) do
      local headers = {{}}
      for name, value in pairs(wrk.headers) do headers[name] = value end
      headers["Authorization"] = "Bearer " .. key
      local formatted = wrk.format(nil, nil, headers, nil)
      local eol = string.find(formatted, "\\r\\n", 1, true)
      bench_requests[i] = formatted
      bench_lines[i] = string.sub(formatted, 1, eol + 1)
      bench_rest[i] = string.sub(formatted, eol + 2)
    end
    bench_next = bench_first or 0
  end
  local r = bench_next
  bench_next = r + 1
  local i = r % #bench_requests + 1
  if bench_end_users == 0 then return bench_requests[i] end
  local end_user = (bench_end_base + r) % bench_end_users
  return bench_lines[i] .. "X-Gateway-End-User: eu-" .. end_user .. "\\r\\n" .. bench_rest[i]
end
"""


def stride(users: int, end_users: int) -> int:
    """How far apart wrk's threads start in the rotation: half of it apart (for two threads), and
    the keys half their list apart too, so that the threads send different users' requests (and,
    with many end users, different end users') at any time."""
    span = max(users, end_users) // WRK_THREADS
    return max(span - span % users + users // WRK_THREADS, 1)


# ---------------------------------------------------------------------------------------------
# Processes and CPU


@dataclass
class Cpu:
    """CPU seconds so far, of every process on the machine and of this one's finished children (the
    wrk runs), and the machine's idle seconds (all cores)."""

    at: float
    procs: dict[int, proxy.Proc]
    children: float
    idle: float


def scan_cpu() -> Cpu:
    times = os.times()
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    idle = (int(fields[4]) + int(fields[5])) / proxy.CLOCK_TICKS  # idle + iowait
    return Cpu(time.monotonic(), proxy.processes(), times.children_user + times.children_system, idle)


@dataclass
class Spent:
    """Where the CPU went during one run, in seconds."""

    gateway: dict[int, float]  # each process of the setup (a `--workers` parent and its workers)
    postgres: float  # every postgres process on the machine
    load: float  # the upstream and wrk
    others: float  # every other process on the machine: other work sharing it
    idle: float  # the machine's idle time, all cores
    seconds: float  # wall-clock


def spent(before: Cpu, after: Cpu, roots: Sequence[int], upstream: int) -> Spent:
    """The CPU each kind of process used between two scans (processes alive at both)."""
    ours = set().union(*(proxy.family(after.procs, root) for root in roots))
    load = proxy.family(after.procs, upstream)
    gateway: dict[int, float] = {}
    postgres = others = 0.0
    upstream_cpu = after.children - before.children  # wrk
    for pid, proc in after.procs.items():
        used = proc.cpu - before.procs[pid].cpu if pid in before.procs else 0.0
        if pid in ours:
            gateway[pid] = used
        elif pid in load:
            upstream_cpu += used
        elif proc.name == "postgres":
            postgres += used
        else:
            others += used
    return Spent(gateway, postgres, upstream_cpu, others, after.idle - before.idle, after.at - before.at)


# ---------------------------------------------------------------------------------------------
# Setups


@dataclass
class Sample:
    """One wrk run of one setup."""

    result: loadgen.Throughput
    cpu: Spent
    commits: int | None  # growth of the database's xact_commit (PostgreSQL)

    @property
    def gateway_cpu(self) -> float:
        return sum(self.cpu.gateway.values())

    @property
    def postgres_cpu(self) -> float:
        return self.cpu.postgres

    @property
    def load_cpu(self) -> float:
        return self.cpu.load

    @property
    def busiest(self) -> float:
        """Cores used by the setup's busiest process (1.0: its event loop never waited)."""
        return max(self.cpu.gateway.values(), default=0.0) / self.cpu.seconds

    @property
    def idle(self) -> float:
        return self.cpu.idle / self.cpu.seconds

    @property
    def others(self) -> float:
        return self.cpu.others / self.cpu.seconds


@dataclass
class Setup:
    """A backend with some processes, its database and keys, and what was measured on it."""

    label: str
    backend: str  # SQLite or PostgreSQL
    database_url: str
    processes: int = 1
    workers: int = 1  # `gateway serve --workers N` when more than 1
    tree: Path = ROOT  # whose `gateway serve` (--rev: an earlier revision's, in a worktree)
    end_users: int = 0  # requests name one of this many end users, rotating (0: none)
    ports: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    script: Path | None = None
    skipped: str = ""
    samples: list[Sample] = field(default_factory=list)
    ok: int = 0  # 2xx answers of every run, the warm-up included
    problems: list[str] = field(default_factory=list)
    checks: list[tuple[bool, str]] = field(default_factory=list)
    verify: str = "-"
    verify_ok: bool = False

    @property
    def pg(self) -> bool:
        return self.backend == "PostgreSQL"

    @property
    def database(self) -> str:
        return self.database_url.rpartition("/")[2]

    def median(self, attr: str) -> float:
        values = [getattr(s.result, attr) for s in self.samples]
        return statistics.median(values) if values else float("nan")

    def median_cores(self, attr: str) -> float:
        """A sample's figure in cores (busiest, idle, others), median over the rounds."""
        values = [getattr(s, attr) for s in self.samples]
        return statistics.median(values) if values else float("nan")

    def per_request(self, attr: str) -> float:
        """A sample figure over the requests, all rounds together."""
        requests = sum(s.result.requests for s in self.samples)
        return sum(getattr(s, attr) for s in self.samples) / requests if requests else float("nan")

    def commits_per_request(self) -> float:
        """Commits over the 2xx answers (admitted requests), all rounds together."""
        ok = sum(s.result.ok for s in self.samples)
        return sum(s.commits or 0 for s in self.samples) / ok if self.pg and ok else float("nan")


async def _xact_commit(database: str) -> int:
    import asyncpg

    # Read from the postgres database, so that the reading is no commit of the measured one.
    conn = await asyncpg.connect(proxy.asyncpg_dsn(PG_SERVER) + "/postgres", timeout=5)
    try:
        value = await conn.fetchval("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database)
    finally:
        await conn.close()
    return int(value or 0)


def xact_commit(database: str) -> int:
    return asyncio.run(_xact_commit(database))


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on a setup's database."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute(sql).fetchall()
    return asyncio.run(_pg_query(url, sql))


async def _pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(proxy.asyncpg_dsn(url), timeout=5)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


COUNTERS_SQL = (
    "SELECT COUNT(*), "
    "COALESCE(SUM(CASE WHEN c.spent_micros > b.limit_micros THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN c.held_micros <> 0 THEN 1 ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN b.scope = 'team' THEN c.spent_micros ELSE 0 END), 0), "
    "COALESCE(SUM(CASE WHEN b.scope = 'user' THEN c.spent_micros ELSE 0 END), 0) "
    "FROM budget_counters c JOIN budgets b ON b.id = c.budget_id"
)
LEDGER_SQL = "SELECT outcome, COUNT(*), COALESCE(SUM(credits_micros), 0) FROM ledger GROUP BY outcome"


class Bench:
    """The servers, the setups and their measurement."""

    def __init__(self, args: argparse.Namespace, servers: proxy.Servers, pg_databases: list[str]) -> None:
        self.args, self.servers = args, servers
        self.upstream_url = ""
        workdir = servers.workdir
        self.setups = [
            Setup("SQLite x1", "SQLite", f"sqlite+aiosqlite:///{workdir / 'sqlite-x1.db'}"),
            Setup(
                f"SQLite --workers {WORKERS}",
                "SQLite",
                f"sqlite+aiosqlite:///{workdir / 'sqlite-workers.db'}",
                workers=WORKERS,
            ),
            Setup("PostgreSQL x1", "PostgreSQL", f"{PG_SERVER}/{pg_databases[0]}"),
            Setup("PostgreSQL x2", "PostgreSQL", f"{PG_SERVER}/{pg_databases[1]}", processes=2),
        ]
        for rev, tree in args.trees:
            url = f"sqlite+aiosqlite:///{workdir / f'sqlite-x1-{rev}.db'}"
            self.setups.insert(1, Setup(f"SQLite x1 @{rev}", "SQLite", url, tree=tree))

    @property
    def live(self) -> list[Setup]:
        return [s for s in self.setups if not s.skipped]

    def env(self, database_url: str, port: int | None = None, tree: Path = ROOT) -> dict[str, str]:
        return proxy.gateway_env(tree, database_url, self.upstream_url, port)

    def serve_has_workers(self) -> bool:
        """Whether this tree's `gateway serve` takes --workers."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--help"],
            env=self.env("sqlite+aiosqlite:///unused.db"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise SystemExit(f"`gateway serve --help` failed:\n{out.stderr.strip()}")
        return "--workers" in out.stdout

    def start(self) -> None:
        """The upstream; each setup's database migrated and filled, its processes ready."""
        py, args = sys.executable, self.args
        upstream_port = proxy.free_port()
        self.upstream_url = f"http://127.0.0.1:{upstream_port}/api/v1/chat"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.servers.start("upstream", [py, str(BENCH / "upstream.py"), "--port", str(upstream_port)], env)
        if any(s.workers > 1 for s in self.setups) and not self.serve_has_workers():
            for setup in self.setups:
                if setup.workers > 1:
                    setup.skipped = "skipped: no --workers"
                    print(f"{setup.label}: skipped: no --workers (not in `gateway serve --help`)", flush=True)

        began = time.monotonic()
        for setup in self.live:
            proxy.gateway_cli(self.env(setup.database_url, tree=setup.tree), "db", "upgrade")
        migrated = time.monotonic()
        keys = self.make_accounts()
        print(
            f"databases migrated in {migrated - began:.1f} s; in each, 1 team, {args.users} users, "
            f"{args.users} keys and {args.users + 1} budgets made in one unit of work "
            f"({time.monotonic() - migrated:.1f} s for {len(self.live)} databases)",
            flush=True,
        )

        serve = [py, "-m", "gateway", "serve", "--no-migrate"]
        for setup in self.live:
            setup.keys = keys[setup.database_url]
            argv = serve + (["--workers", str(setup.workers)] if setup.workers > 1 else [])
            for i in range(setup.processes):
                port = proxy.free_port()
                name = f"{setup.label} #{i + 1}"
                env = self.env(setup.database_url, port, setup.tree)
                setup.pids.append(self.servers.start(name, argv, env))
                setup.ports.append(port)
            self.write_script(setup)
        self.servers.wait_ready("upstream", f"http://127.0.0.1:{upstream_port}")
        for setup in self.live:
            for i, port in enumerate(setup.ports):
                self.servers.wait_ready(f"{setup.label} #{i + 1}", f"http://127.0.0.1:{port}/readyz")

    def write_script(self, setup: Setup, end_user_base: int = 0) -> None:
        """The setup's wrk script; its end users are numbered from `end_user_base` on."""
        name = "".join(c if c.isalnum() else "-" for c in setup.label)
        script = self.servers.workdir / f"wrk-{name}.lua"
        loadgen.write_wrk_script(script, proxy.chat_body(False), {"Content-Type": "application/json"})
        with script.open("a") as lua:
            lua.write(
                WRK_KEYS.format(
                    ports=", ".join(map(str, setup.ports)),
                    keys=", ".join(f'"{k}"' for k in setup.keys),
                    end_users=setup.end_users,
                    end_user_base=end_user_base,
                    stride=stride(self.args.users, setup.end_users),
                )
            )
        setup.script = script

    def make_accounts(self) -> dict[str, list[str]]:
        """The organisation in each live setup's database (SETUP_SCRIPT, run with the admin functions
        of the setup's own tree): its keys' secrets by URL."""
        keys: dict[str, list[str]] = {}
        for tree in dict.fromkeys(s.tree for s in self.live):
            urls = [s.database_url for s in self.live if s.tree == tree]
            made = subprocess.run(
                [sys.executable, "-c", SETUP_SCRIPT, str(self.args.users), BUDGET_CREDITS, *urls],
                env=self.env(urls[0], tree=tree),
                capture_output=True,
                text=True,
                timeout=300,
            )
            if made.returncode != 0:
                raise SystemExit(f"making the accounts failed:\n{made.stderr.strip()}")
            keys.update(json.loads(made.stdout.strip().splitlines()[-1]))
        return keys

    def run_once(self, setup: Setup, seconds: float) -> Sample:
        """One wrk run across the setup's processes."""
        assert setup.script is not None
        before = xact_commit(setup.database) if setup.pg else 0
        cpu = scan_cpu()
        url = f"http://127.0.0.1:{setup.ports[0]}/api/v1/chat"  # the Host header; threads' addresses differ
        result = loadgen.run_wrk(setup.script, url, seconds, self.args.connections, WRK_THREADS)
        used = spent(cpu, scan_cpu(), setup.pids, self.servers.procs["upstream"].pid)
        commits = None
        if setup.pg:
            time.sleep(STATS_SETTLE_SECONDS)
            commits = xact_commit(setup.database) - before
        setup.ok += result.ok
        if result.non2xx or result.errors or result.cut:
            setup.problems.append(
                f"{result.non2xx} non-2xx, {result.errors} socket errors, {result.cut} cut by wrk's stop"
            )
        return Sample(result, used, commits)

    def measure(self) -> None:
        """A warm-up per setup (pools, key caches), then interleaved rounds."""
        for setup in self.live:
            self.run_once(setup, 1.0)
        self.warmed_up()
        for round_no in range(1, self.args.rounds + 1):
            for setup in self.live:
                setup.samples.append(self.run_once(setup, self.args.duration))
            print(f"round {round_no}/{self.args.rounds}: done", flush=True)

    def warmed_up(self) -> None:
        """Between the warm-up and the rounds (nothing here)."""

    def check(self, setup: Setup) -> None:
        """After the gateways stopped: the books of the setup's database, and `gateway ledger verify`."""
        url, checks = setup.database_url, setup.checks
        deadline = time.monotonic() + proxy.DRAIN_SECONDS
        holds = int(query(url, "SELECT COUNT(*) FROM holds")[0][0])
        while holds and time.monotonic() < deadline:
            time.sleep(0.1)
            holds = int(query(url, "SELECT COUNT(*) FROM holds")[0][0])
        checks.append((holds == 0, f"holds: {holds} left after the drain"))

        windows, over, holding, team_spent, users_spent = (int(x) for x in query(url, COUNTERS_SQL)[0])
        outcomes = {o: (int(n), int(c)) for o, n, c in query(url, LEDGER_SQL)}
        rows, credits = outcomes.pop("charged", (0, 0))
        checks.append(
            (
                windows > 0 and over == 0 and holding == 0,
                f"overspend: {windows} budget windows, {over} spent over their limit, "
                f"{holding} holding credits",
            )
        )
        checks.append(
            (
                rows == setup.ok and not outcomes,
                f"requests: {setup.ok} 2xx answers {'==' if rows == setup.ok else '!='} {rows} charged "
                "ledger rows" + (f"; other outcomes (rows, credits): {outcomes}" if outcomes else ""),
            )
        )
        expected = rows * CREDITS_PER_REQUEST
        ok = credits == expected == team_spent == users_spent
        checks.append(
            (
                ok,
                f"credits: {rows} rows x 0.3 = {expected / 1e6:,.1f}; ledger {credits / 1e6:,.1f}, "
                f"team counter {team_spent / 1e6:,.1f}, user counters {users_spent / 1e6:,.1f}",
            )
        )
        used = int(query(url, "SELECT COUNT(DISTINCT key_id) FROM ledger")[0][0])
        checks.append(
            (used == len(setup.keys), f"keys: {used} of the {len(setup.keys)} keys charged at least once")
        )
        checks.append(
            (
                not setup.problems,
                "load: every request answered 2xx, none cut, no socket errors"
                if not setup.problems
                else "load: " + "; ".join(setup.problems),
            )
        )

        verify = subprocess.run(
            [sys.executable, "-m", "gateway", "ledger", "verify", "--json"],
            env=self.env(url, tree=setup.tree),
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            report = json.loads(verify.stdout)
        except json.JSONDecodeError:
            report = None
        if verify.returncode == 0 and report and report.get("ok"):
            setup.verify_ok = True
            setup.verify = "clean"
            detail = f"{report['windows']} windows, {report['allocations']} allocations"
        elif report and report.get("ok") is False:
            setup.verify = f"{len(report['differences'])} differ"
            detail = json.dumps(report["differences"][:3])
        else:
            setup.verify = f"error (exit {verify.returncode})"
            detail = (verify.stderr.strip().splitlines() or ["no output"])[-1]
        checks.append(
            (setup.verify_ok, f"gateway ledger verify: exit {verify.returncode}, {setup.verify}; {detail}")
        )


# ---------------------------------------------------------------------------------------------
# Report


def table(setups: list[Setup]) -> str:
    """One row per setup."""
    header = ["setup", "req/s", "p50 ms", "p99 ms", "x SQLite x1", "gw CPU/req", "pg CPU/req"]
    header += ["load CPU/req", "busiest", "idle", "others", "commits/req", "verify", "books"]
    base = setups[0].median("rps")
    rows, skipped = [header], []
    for s in setups:
        if s.skipped:
            skipped.append(f"{s.label}: {s.skipped}")
            continue
        books = all(ok for ok, text in s.checks if not text.startswith("gateway ledger verify"))
        rows.append(
            [
                s.label,
                f"{s.median('rps'):,.0f}",
                f"{s.median('p50') * 1000:.1f}",
                f"{s.median('p99') * 1000:.1f}",
                f"{s.median('rps') / base:.2f}",
                f"{s.per_request('gateway_cpu') * 1e6:,.0f} us",
                f"{s.per_request('postgres_cpu') * 1e6:,.0f} us" if s.pg else "-",
                f"{s.per_request('load_cpu') * 1e6:,.0f} us",
                f"{s.median_cores('busiest'):.2f}",
                f"{s.median_cores('idle'):.2f}",
                f"{s.median_cores('others'):.2f}",
                f"{s.commits_per_request():.2f}" if s.pg else "-",
                s.verify,
                "PASS" if books else "FAIL",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += skipped
    return "\n".join(lines)


def legend(args: argparse.Namespace) -> str:
    return f"""\
req/s, p50, p99: one wrk process, {args.connections} connections over {WRK_THREADS} threads, each thread
pointed at one process of the setup, keys rotated round-robin over {args.users} users; median over rounds.
x SQLite x1: req/s over SQLite x1's. gw CPU/req: CPU of the setup's processes (workers included) per
request; pg CPU/req: of every postgres process on the machine; load CPU/req: of the upstream and wrk.
busiest: cores used by the setup's busiest process (near 1.00: its event loop is the limit); idle: the
machine's idle cores; others: cores used by processes of no setup (other work on a shared machine);
medians over rounds. commits/req: growth of the database's pg_stat_database.xact_commit over the 2xx
answers, all rounds. verify: `gateway ledger verify` on the setup's database after the drain. books:
the checks below. This machine's {os.cpu_count()} cores are shared by wrk, the upstream, PostgreSQL and
the gateways: more processes compete for the same CPU."""


def goals(setups: dict[str, Setup]) -> list[tuple[bool | None, str]]:
    """Issue 14's goals; None for a goal whose setup was skipped."""
    sqlite, workers = setups["SQLite x1"], setups[f"SQLite --workers {WORKERS}"]
    pg1, pg2 = setups["PostgreSQL x1"], setups["PostgreSQL x2"]
    lines: list[tuple[bool | None, str]] = []

    def ratio(a: Setup, b: Setup, goal: float) -> None:
        r = a.median("rps") / b.median("rps") if b.median("rps") else float("nan")
        lines.append((r >= goal, f"{a.label} / {b.label} = {r:.2f} >= {goal}"))

    ratio(pg1, sqlite, GOAL_PG_VS_SQLITE)
    ratio(pg2, pg1, GOAL_PG_SCALING)
    for s in (pg1, pg2):
        c = s.commits_per_request()
        lines.append(
            (c <= GOAL_PG_COMMITS, f"{s.label}: {c:.2f} commits per admitted request <= {GOAL_PG_COMMITS}")
        )
    if workers.skipped:
        lines.append((None, f"{workers.label} / {sqlite.label} >= {GOAL_SQLITE_WORKERS}: {workers.skipped}"))
    else:
        ratio(workers, sqlite, GOAL_SQLITE_WORKERS)
    live = [s for s in setups.values() if not s.skipped]
    clean = all(s.verify_ok for s in live)
    lines.append(
        (clean, "gateway ledger verify clean everywhere: " + ", ".join(f"{s.label} {s.verify}" for s in live))
    )
    return lines


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    proxy.add_load_arguments(parser, "setup", WRK_THREADS)
    parser.add_argument("--users", type=int, default=200, help="users in the team, each with a key (1-5000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round of 3 s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and the databases")
    parser.add_argument(
        "--rev",
        action="append",
        default=[],
        help="also SQLite x1 with this git revision's gateway, in the same rounds (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 3.0), 1
    proxy.check_load_arguments(parser, args, WRK_THREADS)
    if not 1 <= args.users <= 5000:
        parser.error("--users must be in 1..5000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 all PASS, 1 a check of the books or a verify failed, 2 only a goal missed."""
    args = parse_args(argv)
    proxy.require_wrk()
    token = secrets.token_hex(4)
    with (
        proxy.fresh_databases(
            PG_SERVER, [f"bench_team_{token}_x1", f"bench_team_{token}_x2"], args.keep
        ) as made,
        proxy.work_directory("gw-team-", args.keep) as servers,
    ):
        args.trees = []
        git = ["git", "-C", str(ROOT), "worktree"]
        try:
            for rev in args.rev:
                tree = servers.workdir / f"tree-{rev}"
                subprocess.run([*git, "add", "--detach", "--quiet", str(tree), rev], check=True)
                args.trees.append((rev, tree))
            return run(args, servers, made)
        finally:
            for _, tree in args.trees:
                subprocess.run([*git, "remove", "--force", str(tree)], check=False)


def run(args: argparse.Namespace, servers: proxy.Servers, databases: list[str]) -> int:
    started = time.monotonic()
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPU cores (load average {load:.2f}); wrk, {args.connections} connections, "
        f"{args.rounds} round(s) of {args.duration:g} s per setup, plain requests, full metering; "
        f"{args.users} users in one team, keys rotated per request\n"
        f"SQLite: temp files; PostgreSQL: fresh databases {', '.join(databases)} on "
        f"{PG_SERVER.rpartition('@')[2]}; upstream: bench/upstream.py",
        flush=True,
    )
    bench = Bench(args, servers, databases)
    bench.start()
    print(f"servers up in {time.monotonic() - started:.0f} s", flush=True)
    bench.measure()
    for setup in bench.live:  # the drain: each settles what it has in flight
        for i in range(setup.processes):
            servers.stop(f"{setup.label} #{i + 1}")
    for setup in bench.live:
        bench.check(setup)

    print()
    print(table(bench.setups))
    print(legend(args))
    for setup in bench.live:
        print(f"\n{setup.label} ({'database ' + setup.database if setup.pg else 'SQLite file'}):")
        for ok, text in setup.checks:
            print(f"  {'PASS' if ok else 'FAIL'} {text}")
    print("\nissue 14's goals:")
    targets = goals({s.label: s for s in bench.setups})
    for met, text in targets:
        print(f"{'SKIP' if met is None else 'PASS' if met else 'FAIL'} {text}")
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    if not all(ok for s in bench.live for ok, _ in s.checks):
        return 1
    return 0 if all(ok is not False for ok, _ in targets) else 2


if __name__ == "__main__":
    sys.exit(main())
