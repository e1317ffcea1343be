"""Issue 7's benchmark: the metering gateway against a bare aiohttp proxy and the upstream itself.

Starts, on free loopback ports, a fake upstream (bench/upstream.py), a bare pass-through proxy
(bench/bare_proxy.py) and the gateway (`python -m gateway serve`) on a freshly migrated SQLite file,
or on --database-url. A team, two users, a key and daily user and team budgets too large to block
are made with the gateway's CLI, so every request is fully metered: key auth, holds on the user and
team budgets, settlement and a ledger row.

Then, in one run, each target is measured plain and streamed: at concurrency 1 with a sequential
client (latency p50/p99; for streams, time to the first body chunk) and at --connections with wrk
(or a bundled asyncio client when wrk is missing), in interleaved rounds whose medians are shown.
One table is printed. Finally the books are checked: every budget counter equals the charged
allocations in the ledger and holds nothing, credits equal messages x unit price, and every 2xx
the load generators got from the gateway is exactly one charged ledger row. Exit 1 on any FAIL.

    python bench/proxy.py                  # full run, about 2.5 minutes
    python bench/proxy.py --quick          # smoke run, under a minute
    python bench/proxy.py --profile plain  # then py-spy the gateway during two more runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadgen
import profiling

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODEL = "openai/gpt-oss-20b"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello there."},
    {"role": "user", "content": "Summarise the plot of Hamlet in one sentence."},
]
MODES = ("plain", "stream")
TARGETS = ("direct", "bare", "gateway")
BUDGET_CREDITS = "1000000000"  # daily; far more than any run can spend
STARTUP_SECONDS = 30.0
DRAIN_SECONDS = 10.0
PROFILE_HZ = 200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def chat_body(stream: bool) -> bytes:
    """The benchmark's chat request: three messages, so 0.3 credits at 0.1 a message."""
    payload: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Target:
    """Something to send chat requests to, and the process that answers them."""

    name: str
    url: str
    headers: dict[str, str]
    pid: int


def headers(target: Target) -> dict[str, str]:
    """The request headers for a target: JSON, and the gateway key for the gateway."""
    return {"Content-Type": "application/json", **target.headers}


@dataclass
class Cell:
    """Figures for one target in one mode."""

    runs: list[loadgen.Throughput] = field(default_factory=list)
    c1: loadgen.Run | None = None


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A loopback port free right now."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Servers:
    """The processes this benchmark started; each logs to a file, all are stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> int:
        """Start a server in its own session (a Ctrl-C here reaches it only through `stop`); its pid."""
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
            )
        self.procs[name] = proc
        return proc.pid

    def wait_ready(self, name: str, url: str) -> None:
        """Wait until `url` answers (any HTTP status), or fail with the server's log."""
        proc = self.procs[name]
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.05)
        log = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{name} did not start; the end of its log:\n" + "\n".join(log))

    def stop(self, name: str) -> None:
        """SIGTERM to the server (the gateway shuts down cleanly on it; a `--workers` parent passes
        it on to its workers); after 10 s, SIGKILL, then SIGTERM to those of its processes still
        running (workers, in process groups of their own), and SIGKILL 5 s later."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        members = family(processes(), proc.pid) - {proc.pid}
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
            left = running(members)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while running(left) and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop_all(self) -> None:
        """Stop every server still running, newest first."""
        for name in reversed(list(self.procs)):
            self.stop(name)


@dataclass(frozen=True)
class Proc:
    """A process, from /proc/PID/stat."""

    ppid: int
    state: str
    cpu: float  # user + system seconds so far
    name: str


def processes() -> dict[int, Proc]:
    """Every process on the machine, by pid."""
    found: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        found[int(entry.name)] = Proc(int(fields[1]), fields[0], cpu, name)
    return found


def family(procs: dict[int, Proc], root: int) -> set[int]:
    """A process and its descendants (the workers of `--workers`, in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for pid, proc in procs.items():
        children.setdefault(proc.ppid, []).append(pid)
    members, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in members:
            members.add(pid)
            todo += children.get(pid, [])
    return members


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies left out)."""
    procs = processes()
    return {p for p in pids if p in procs and procs[p].state != "Z"}


@contextlib.contextmanager
def work_directory(prefix: str, keep: bool) -> Iterator[Servers]:
    """A benchmark's run: its servers and their work directory, stopped and removed (or kept) at the
    end, however the run ends; SIGTERM ends it as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    servers = Servers(workdir)
    try:
        yield servers
    finally:
        servers.stop_all()
        if keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def require_wrk() -> str:
    """wrk's path, or the end of the run saying how to install it."""
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return wrk


def asyncpg_dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _pg_admin(server_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(asyncpg_dsn(server_url) + "/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_databases(server_url: str, names: Sequence[str], keep: bool) -> Iterator[list[str]]:
    """New PostgreSQL databases on `server_url` for a run, dropped at its end (unless `keep`)."""
    created: list[str] = []
    try:
        for name in names:
            try:
                asyncio.run(_pg_admin(server_url, f"CREATE DATABASE {name}"))
            except (OSError, TimeoutError) as exc:
                raise SystemExit(f"PostgreSQL at {server_url} is not reachable: {exc}") from None
            created.append(name)
        yield created
    finally:
        if keep and created:
            print(f"databases kept: {', '.join(created)}")
        elif created:
            for name in created:
                with contextlib.suppress(Exception):
                    asyncio.run(_pg_admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def add_load_arguments(parser: argparse.ArgumentParser, runs: str, threads: int | None = None) -> None:
    """--duration, --rounds and --connections, as the benchmarks here take them (`runs`: what a
    round runs once, for the help; `threads`: wrk's, which --connections must be a multiple of)."""
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per run (<= 10)")
    parser.add_argument("--rounds", type=int, default=3, help=f"runs per {runs} (median shown)")
    spread = f" (a multiple of {threads})" if threads else ""
    parser.add_argument("--connections", type=int, default=64, help=f"connections in total{spread}")


def check_load_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, threads: int | None = None
) -> None:
    """Refuse, through the parser, a run no benchmark here makes: over 10 s, no round, no
    connection, or connections that `threads` wrk threads cannot share evenly."""
    if not 0 < args.duration <= 10:
        parser.error("--duration must be in (0, 10] seconds")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.connections < (threads or 1) or args.connections % (threads or 1):
        parser.error(
            f"--connections must be a positive multiple of {threads}"
            if threads
            else "--connections must be at least 1"
        )


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


# ---------------------------------------------------------------------------------------------
# The gateway's database and its account


@dataclass
class Account:
    """What the benchmark made in the gateway's database."""

    team_id: int
    user_ids: tuple[int, int]
    key_id: str
    secret: str
    user: str = ""  # the name of the key's user


def gateway_cli(env: dict[str, str], *args: str) -> Any:
    """Run `python -m gateway ARGS` with the gateway's environment; its JSON answer with --json."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise SystemExit(f"gateway {' '.join(args)} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout) if "--json" in args else None


def make_account(env: dict[str, str]) -> Account:
    """A team, two users in it, a key for the first, and daily user and team budgets that never block."""
    suffix = secrets.token_hex(3)  # names stay unique on a PostgreSQL database used before
    team, users = f"bench-team-{suffix}", (f"bench-user-a-{suffix}", f"bench-user-b-{suffix}")
    team_id = gateway_cli(env, "teams", "create", team, "--json")["id"]
    user_ids = [gateway_cli(env, "users", "create", u, "--team", team, "--json")["id"] for u in users]
    key = gateway_cli(env, "keys", "create", users[0], "--name", "bench", "--json")
    for user in users:
        gateway_cli(env, "budgets", "set", "user", user, BUDGET_CREDITS, "--period", "daily", "--json")
    gateway_cli(env, "budgets", "set", "team", team, BUDGET_CREDITS, "--period", "daily", "--json")
    return Account(team_id, (user_ids[0], user_ids[1]), key["id"], key["key"], users[0])


class Books:
    """Read-only SQL over the gateway's database, scoped to the benchmark's key and budgets."""

    BUDGETS = (
        "SELECT id FROM budgets WHERE (scope = 'team' AND subject = :team) "
        "OR (scope = 'user' AND subject IN (:user_a, :user_b))"
    )

    def __init__(self, database_url: str, account: Account) -> None:
        self.url = database_url
        self.params = {
            "key": account.key_id,
            "team": str(account.team_id),
            "user_a": str(account.user_ids[0]),
            "user_b": str(account.user_ids[1]),
        }

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of `sql`, whose :names are the account's ids."""
        if self.url.startswith("sqlite"):
            path = self.url.split(":///", 1)[1]
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
                return conn.execute(sql, self.params).fetchall()
        return asyncio.run(self._pg_query(sql))

    async def _pg_query(self, sql: str) -> list[tuple[Any, ...]]:
        import asyncpg

        names: list[str] = []

        def placeholder(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        positional = re.sub(r"(?<!:):(\w+)", placeholder, sql)
        conn = await asyncpg.connect(self.url.replace("postgresql+asyncpg://", "postgresql://"), timeout=5)
        try:
            rows = await conn.fetch(positional, *(self.params[n] for n in names))
        finally:
            await conn.close()
        return [tuple(r) for r in rows]

    def holds_left(self) -> int:
        """Holds of the benchmark's key not yet settled."""
        return int(self.query("SELECT COUNT(*) FROM holds WHERE key_id = :key")[0][0])


CHARGED_ALLOCATIONS = (
    "SELECT COALESCE(SUM(a.credits_micros), 0) FROM allocations a "
    "JOIN ledger l ON l.request_id = a.request_id "
    "WHERE a.budget_id = c.budget_id AND a.window_start = c.window_start AND l.outcome = 'charged'"
)
CHARGED_SUMS = (
    "SELECT COUNT(*), COALESCE(SUM(message_count * unit_price_micros), 0), "
    "COALESCE(SUM(credits_micros), 0), COALESCE(SUM(message_count), 0) "
    "FROM ledger WHERE key_id = :key AND outcome = 'charged'"
)
CHARGED_METRIC = re.compile(r'^gateway_requests_total\{[^}]*outcome="charged"[^}]*\} (\S+)$', re.MULTILINE)


def check_books(books: Books, gateway_ok: int, metrics_text: str) -> list[tuple[bool, str]]:
    """Counters equal the ledger; credits equal messages x price; every 2xx is one charged ledger row."""
    checks: list[tuple[bool, str]] = []

    def check(ok: bool, text: str) -> None:
        checks.append((ok, text.replace(" == ", " == " if ok else " != ")))

    counters = books.query(
        "SELECT c.budget_id, c.window_start, c.spent_micros, c.held_micros, "
        f"({CHARGED_ALLOCATIONS}) FROM budget_counters c WHERE c.budget_id IN ({Books.BUDGETS})"
    )
    wrong = [r for r in counters if r[2] != r[4] or r[3] != 0]
    check(
        bool(counters) and not wrong,
        f"counters: {len(counters)} budget windows, each spent == sum of its charged allocations, held == 0"
        + (f"; (budget, window, spent, held, charged): {wrong}" if wrong else ""),
    )
    holds = books.holds_left()
    check(holds == 0, f"holds: {holds} left after the drain")

    rows, priced, credits, messages = (int(x) for x in books.query(CHARGED_SUMS)[0])  # PostgreSQL: Decimal
    check(
        priced == credits and credits > 0,
        f"credits: sum(messages x unit price) = {priced / 1e6:,.1f} == sum(credits) = {credits / 1e6:,.1f}",
    )
    expected = gateway_ok * len(MESSAGES) * 100_000  # 0.1 credits a message
    check(
        messages == gateway_ok * len(MESSAGES) and credits == expected,
        f"messages: {gateway_ok} answers x {len(MESSAGES)} messages x 0.1 = {expected / 1e6:,.1f} "
        f"credits == ledger's {messages} messages, {credits / 1e6:,.1f} credits",
    )
    outcomes = dict(books.query("SELECT outcome, COUNT(*) FROM ledger WHERE key_id = :key GROUP BY outcome"))
    others = {k: v for k, v in outcomes.items() if k != "charged"}
    check(
        rows == gateway_ok and not others,
        f"requests: {gateway_ok} 2xx answers from the gateway to the load generators == "
        f"{rows} charged ledger rows" + (f"; other outcomes: {others}" if others else ""),
    )
    metric = sum(float(m.group(1)) for m in CHARGED_METRIC.finditer(metrics_text))
    check(
        int(metric) == rows,
        f'metrics: gateway_requests_total{{outcome="charged"}} = {metric:.0f} == {rows} ledger rows',
    )
    return checks


# ---------------------------------------------------------------------------------------------
# Load


class Bench:
    """The measurements of one run, and the count of 2xx answers the gateway gave."""

    def __init__(self, args: argparse.Namespace, wrk: str | None, targets: dict[str, Target], workdir: Path):
        self.args, self.wrk, self.targets = args, wrk, targets
        self.scripts = {
            (t, m): loadgen.write_wrk_script(
                workdir / f"wrk-{t}-{m}.lua", chat_body(m == "stream"), headers(targets[t])
            )
            for t in TARGETS
            for m in MODES
        }
        self.cells = {(t, m): Cell() for t in TARGETS for m in MODES}
        self.gateway_ok = 0
        self.problems: list[str] = []

    def throughput(self, name: str, mode: str, seconds: float) -> loadgen.Throughput:
        """One run at the throughput concurrency, with the serving process's CPU per request."""
        target, args = self.targets[name], self.args
        cpu = profiling.process_cpu(target.pid)
        if self.wrk:
            script = self.scripts[(name, mode)]
            result = loadgen.run_wrk(script, target.url, seconds, args.connections, args.threads)
        else:
            load = loadgen.concurrent(
                target.url,
                chat_body(mode == "stream"),
                headers(target),
                stream=mode == "stream",
                connections=args.connections,
                seconds=seconds,
            )
            result = asyncio.run(load).throughput()
        if result.requests:
            result.cpu_per_request = (profiling.process_cpu(target.pid) - cpu) / result.requests
        if name == "gateway":
            self.gateway_ok += result.ok
        if result.non2xx or result.errors or result.cut:
            self.problems.append(
                f"{name} {mode} @{args.connections}: {result.non2xx} non-2xx, {result.errors} socket errors, "
                f"{result.cut} cut by wrk's stop"
            )
        return result

    def sequential(self, name: str, mode: str, count: int, max_seconds: float) -> loadgen.Run:
        """A concurrency-1 run."""
        target, stream = self.targets[name], mode == "stream"
        run = asyncio.run(
            loadgen.sequential(
                target.url,
                chat_body(stream),
                headers(target),
                stream=stream,
                count=count,
                max_seconds=max_seconds,
            )
        )
        if name == "gateway":
            self.gateway_ok += run.ok2xx
        if run.errors or run.ok2xx != run.requests:
            self.problems.append(f"{name} {mode} @1: {run.errors} errors, statuses {dict(run.statuses)}")
        return run

    def measure(self) -> None:
        """Concurrency 1 on fresh servers, then throughput in interleaved rounds."""
        args = self.args
        for mode in MODES:
            for name in TARGETS:
                self.sequential(name, mode, min(100, args.requests), 5)  # warm-up
                self.cells[(name, mode)].c1 = self.sequential(name, mode, args.requests, args.c1_seconds)
            print(f"concurrency 1, {mode}: done", flush=True)
        for name in TARGETS:  # the connection pools fill
            self.throughput(name, "plain", 0.5 if args.quick else 1.0)
        for round_no in range(1, args.rounds + 1):
            for mode in MODES:
                for name in TARGETS:
                    self.cells[(name, mode)].runs.append(self.throughput(name, mode, args.duration))
            print(f"throughput round {round_no}/{args.rounds}: done", flush=True)

    def profile(self, workdir: Path) -> list[str]:
        """py-spy the gateway during two more throughput runs: all CPU, then the GIL holder only."""
        if not shutil.which("py-spy"):
            return ["profile skipped: py-spy is not installed (pip install py-spy)"]
        mode, seconds, pid = self.args.profile, self.args.duration, self.targets["gateway"].pid
        lines: list[str] = []
        for gil in (False, True):
            raw = workdir / f"gateway-profile{'-gil' if gil else ''}.txt"
            with profiling.py_spy(pid, seconds, raw, rate=PROFILE_HZ, gil=gil):
                before = profiling.thread_cpu(pid)
                result = self.throughput("gateway", mode, seconds)
                after = profiling.thread_cpu(pid)
            used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
            profile = profiling.Profile.read(raw)
            cpu = ", ".join(
                f"{profile.thread_names.get(tid, f'thread {tid}')} {100 * s / result.elapsed:.0f}%"
                for s, tid in used
                if s >= 0.01
            )
            lines += [
                "",
                f"== {'GIL holder only (py-spy --gil)' if gil else 'CPU (py-spy, waits left out)'}; "
                f"{mode}, {self.args.connections} connections, {result.rps:,.0f} req/s while sampled",
                f"CPU from /proc, % of one core: {cpu}",
                *profile.summary(seconds, PROFILE_HZ),
            ]
        return lines


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ms(seconds: float | None, signed: bool = False) -> str:
    """Milliseconds with two decimals; '-' for nothing."""
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:+.2f}" if signed else f"{seconds * 1000:.2f}"


def median_of(runs: list[loadgen.Throughput], attr: str) -> float:
    """Median of one figure across rounds."""
    return statistics.median(getattr(r, attr) for r in runs) if runs else float("nan")


def table(cells: dict[tuple[str, str], Cell], rss: dict[str, float | None], connections: int) -> str:
    """The one table: throughput, latency at both concurrencies, what the proxies add, CPU, peak RSS."""
    c = connections
    header = ["target", "mode", f"req/s@{c}", "x bare", f"p50@{c}", f"p99@{c}", "CPU/req"]
    header += ["p50@1", "p99@1", "+p50@1", "+p99@1", "ttfb50@1", "ttfb99@1", "+ttfb50", "peak RSS"]
    rows = [header]
    for mode in MODES:
        bare_rps = median_of(cells[("bare", mode)].runs, "rps")
        direct = c1_figures(cells[("direct", mode)].c1)
        for name in TARGETS:
            cell = cells[(name, mode)]
            rps, cpu = median_of(cell.runs, "rps"), median_of(cell.runs, "cpu_per_request")
            mine = c1_figures(cell.c1)
            added = [x - d for x, d in zip(mine, direct, strict=True)] if name != "direct" else [math.nan] * 4
            rows.append(
                [
                    name,
                    mode,
                    f"{rps:,.0f}",
                    f"{rps / bare_rps:.2f}",
                    fmt_ms(median_of(cell.runs, "p50")),
                    fmt_ms(median_of(cell.runs, "p99")),
                    f"{cpu * 1e6:,.0f} us",
                    fmt_ms(mine[0]),
                    fmt_ms(mine[1]),
                    fmt_ms(added[0], signed=True),
                    fmt_ms(added[1], signed=True),
                    fmt_ms(mine[2]),
                    fmt_ms(mine[3]),
                    fmt_ms(added[2], signed=True),
                    f"{rss[name]:.0f} MiB" if rss.get(name) else "-",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def c1_figures(run: loadgen.Run | None) -> list[float]:
    """Latency p50, p99 and time to first byte p50, p99 (NaN when not measured) of a sequential run."""
    if run is None:
        return [math.nan] * 4
    return [loadgen.percentile(v, q) for v in (run.latencies, run.first_bytes) for q in (50, 99)]


LEGEND = """\
req/s@N, p50@N, p99@N: wrk at N connections, median over rounds (latency in ms). x bare: req/s over the
bare proxy's. CPU/req: CPU time of the process serving the target (all its threads) per request, median.
@1: a sequential client, one request at a time, ms. +: added to direct-to-upstream. ttfb: time to the
first body chunk (streams). peak RSS: VmHWM of the process serving the target (direct: the upstream)."""


# ---------------------------------------------------------------------------------------------
# The run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_load_arguments(parser, "target and mode")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--requests", type=int, default=3000, help="requests per concurrency-1 measurement")
    parser.add_argument("--database-url", help="postgresql+asyncpg://... instead of a fresh temp SQLite file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s runs, one round, 300 requests")
    parser.add_argument("--profile", choices=MODES, help="then py-spy the gateway during two more runs")
    parser.add_argument(
        "--uvloop", action="store_true", help="run the bare proxy on uvloop too (`gateway serve` always does)"
    )
    parser.add_argument(
        "--stock-upstream",
        action="store_true",
        help="use `gateway fake-upstream`, which keeps every request and slows down under long load",
    )
    parser.add_argument(
        "--no-wrk", action="store_true", help="use the bundled asyncio client even if wrk exists"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, database, profiles)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.requests = min(args.duration, 2.0), 1, min(args.requests, 300)
    args.c1_seconds = 3.0 if args.quick else 8.0
    check_load_arguments(parser, args)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        parser.error("--database-url must be postgresql+asyncpg://... (SQLite is the default)")
    return args


def gateway_env(tree: Path, database_url: str, upstream_url: str, port: int | None = None) -> dict[str, str]:
    """A benchmarked gateway's environment: the `gateway` package of `tree` (installed or not), no
    GATEWAY_* settings of the caller's, the benchmark's database, upstream and port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    # `python -m` would put the working directory first, before PYTHONPATH: another tree's package.
    env["PYTHONSAFEPATH"] = "1"
    return env | {
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_HOST": "127.0.0.1",
        **({"GATEWAY_PORT": str(port)} if port else {}),
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_UPSTREAM_API_KEY": "bench-upstream-key",
    }


def start_servers(args: argparse.Namespace, servers: Servers) -> tuple[dict[str, Target], str, Account]:
    """The upstream, the bare proxy and the gateway (database migrated, account made), all ready."""
    py, workdir = sys.executable, servers.workdir
    ports = {name: free_port() for name in TARGETS}
    base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    upstream_url = f"{base['direct']}/api/v1/chat"
    if args.stock_upstream:
        upstream = [py, "-m", "gateway", "fake-upstream", "--port", str(ports["direct"])]
    else:
        upstream = [py, str(BENCH / "upstream.py"), "--port", str(ports["direct"])]
    # The repository's own gateway package, installed or not, and no GATEWAY_* settings of the caller's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    pids = {"direct": servers.start("direct", upstream, env)}
    bare = [py, str(BENCH / "bare_proxy.py"), "--port", str(ports["bare"]), "--upstream", upstream_url]
    pids["bare"] = servers.start("bare", bare + (["--uvloop"] if args.uvloop else []), env)

    database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
    env_of_gateway = gateway_env(ROOT, database_url, upstream_url, ports["gateway"])
    gateway_cli(env_of_gateway, "db", "upgrade")
    account = make_account(env_of_gateway)
    pids["gateway"] = servers.start("gateway", [py, "-m", "gateway", "serve", "--no-migrate"], env_of_gateway)

    servers.wait_ready("direct", base["direct"])
    servers.wait_ready("bare", base["bare"])
    servers.wait_ready("gateway", f"{base['gateway']}/readyz")
    auth = {"Authorization": f"Bearer {account.secret}"}
    targets = {
        "direct": Target("direct", upstream_url, {}, pids["direct"]),
        "bare": Target("bare", f"{base['bare']}/api/v1/chat", {}, pids["bare"]),
        "gateway": Target("gateway", f"{base['gateway']}/api/v1/chat", auth, pids["gateway"]),
    }
    return targets, database_url, account


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every check passed."""
    args = parse_args(argv)
    wrk = None if args.no_wrk else shutil.which("wrk")
    with work_directory("gw-bench-", args.keep) as servers:
        return run(args, wrk, servers)


def run(args: argparse.Namespace, wrk: str | None, servers: Servers) -> int:
    """Start, measure, drain, check, report."""
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    targets, database_url, account = start_servers(args, servers)
    generator = f"wrk, {args.threads} threads" if wrk else "the bundled asyncio client, one process"
    if not wrk:
        generator += " (--no-wrk)" if args.no_wrk else " (wrk is not installed: apt-get install wrk)"
    database = "PostgreSQL " + database_url.rpartition("@")[2] if args.database_url else "SQLite temp file"
    print(
        f"load: {generator}, {args.connections} connections, {args.rounds} round(s) of {args.duration:g} s "
        f"per target and mode; concurrency 1: {args.requests} sequential requests (aiohttp client)\n"
        f"gateway database: {database}; event loops: gateway uvloop, bare proxy "
        f"{'uvloop' if args.uvloop else 'asyncio'}; upstream: "
        f"{'gateway fake-upstream' if args.stock_upstream else 'bench/upstream.py'}; "
        f"load average {load_at_start:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    bench = Bench(args, wrk, targets, servers.workdir)
    bench.measure()
    profile = bench.profile(servers.workdir) if args.profile else []

    books = Books(database_url, account)
    deadline = time.monotonic() + DRAIN_SECONDS
    while books.holds_left() and time.monotonic() < deadline:
        time.sleep(0.1)
    with urllib.request.urlopen(targets["gateway"].url.replace("/api/v1/chat", "/metrics"), timeout=5) as r:
        metrics_text = r.read().decode()
    rss = {name: peak_rss_mib(t.pid) for name, t in targets.items()}
    servers.stop("gateway")
    checks = check_books(books, bench.gateway_ok, metrics_text)
    checks.append(
        (
            not bench.problems,
            "load: every request to every target answered 2xx, none cut, no socket errors"
            if not bench.problems
            else "load: " + "; ".join(bench.problems),
        )
    )

    print()
    print(table(bench.cells, rss, args.connections))
    print(LEGEND)
    if profile:
        print(f"\ngateway profile, two more {args.profile} runs:" + "\n".join(profile))
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'} {text}")
    print(
        f"total {time.monotonic() - started:.0f} s; load average {load_at_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (other work on the machine moves req/s; CPU/req moves least)"
    )
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
