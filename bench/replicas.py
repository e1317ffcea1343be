"""Issue 5's "Measure": throughput of 1, 2 and 4 gateway replicas on one PostgreSQL database.

Starts, on free loopback ports, the fake upstream (bench/upstream.py), one gateway on a fresh SQLite
file, and four gateways (`python -m gateway serve --no-migrate`) sharing one PostgreSQL database,
created fresh on 127.0.0.1:5432 (or --database-url) and migrated once with `gateway db upgrade`.
Each configuration (SQLite x1, PostgreSQL x1, x2, x4) gets its own team, two users, a key and
daily user and team budgets too large to block, made with the gateway's CLI (bench/proxy.py's
`make_account`), so every request is fully metered and each configuration's books are separate.

Load is wrk with bench/proxy.py's plain (non-stream) request, at --connections in total. One wrk
process drives all of a configuration's replicas: its Lua `setup` points each of its threads at
one replica (`thread.addr`), so the connections are spread evenly, latency percentiles are over
all requests, and the answers are counted exactly as in bench/proxy.py. Configurations are
measured in interleaved rounds (median shown), so a change in other load on the machine touches
them alike; the idle replicas of a smaller configuration keep running. During the PostgreSQL runs
pg_stat_activity is sampled for the wait events of the database's backends.

Then each configuration's books are checked as bench/proxy.py checks them: every 2xx is one
charged ledger row, each budget counter's spent equals its charged allocations and it holds
nothing after the drain, credits equal messages x price, and the replicas' charged-requests
counters grew by the ledger rows. Exit 1 on any FAIL.

    python bench/replicas.py            # full run: 3 rounds of 5 s, about 2 minutes
    python bench/replicas.py --quick    # smoke run: 1 round of 2 s, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
import profiling
import proxy

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REPLICAS = (1, 2, 4)
WRK_THREADS = 4  # a multiple of every replica count: each thread drives one replica
PG_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432"
SAMPLE_SECONDS = 0.05  # pg_stat_activity sampling period
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Appended to loadgen's wrk script: thread i is pointed at replica i mod n. `threads` is that
# script's local list of threads, which its `done` reads; this `setup` replaces its own.
WRK_ADDRS = """
local bench_ports = {{{ports}}}
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
end
"""


@dataclass
class Replica:
    """One gateway process."""

    name: str
    port: int
    pid: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def charged(self) -> float:
        """Its gateway_requests_total{outcome="charged"}, all models."""
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(m.group(1)) for m in proxy.CHARGED_METRIC.finditer(text))


@dataclass
class Sample:
    """One throughput run of one configuration, and the CPU used meanwhile (cores, on average)."""

    result: loadgen.Throughput
    gateway_cpu: float  # the configuration's replicas together
    postgres_cpu: float  # every postgres process on the machine
    upstream_cpu: float
    wrk_cpu: float
    busy: float  # the whole machine, from /proc/stat

    @property
    def other(self) -> float:
        """Cores used by everything else on the machine (the kernel's softirqs, other people's work)."""
        return max(0.0, self.busy - self.gateway_cpu - self.postgres_cpu - self.upstream_cpu - self.wrk_cpu)


@dataclass
class Config:
    """A backend with some replicas, its account, and what was measured on it."""

    backend: str  # SQLite or PostgreSQL
    replicas: list[Replica]
    database_url: str
    account: proxy.Account | None = None
    script: Path | None = None
    samples: list[Sample] = field(default_factory=list)
    ok: int = 0  # 2xx answers, warm-up included
    charged: float = 0.0  # growth of the replicas' charged counters over this configuration's runs
    by_replica: Counter[str] = field(default_factory=Counter)
    waits: Counter[str] = field(default_factory=Counter)  # backend states summed over samples
    wait_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} x{len(self.replicas)}"


# ---------------------------------------------------------------------------------------------
# CPU accounting and pg_stat_activity


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


class MachineWindow:
    """The machine's busy cores between two moments after now, read from /proc/stat in a thread."""

    def __init__(self, start: float, end: float) -> None:
        self.ticks: list[tuple[int, int]] = []
        self._thread = threading.Thread(target=self._read, args=(start, end), daemon=True)
        self._thread.start()

    def _read(self, start: float, end: float) -> None:
        begun = time.monotonic()
        for moment in (start, end):
            time.sleep(max(0.0, begun + moment - time.monotonic()))
            self.ticks.append(machine_ticks())

    def busy_cores(self) -> float:
        self._thread.join()
        (busy, total), (busy2, total2) = self.ticks
        return (busy2 - busy) / max(total2 - total, 1) * (os.cpu_count() or 1)


def postgres_cpu() -> float:
    """CPU seconds used so far by every process named postgres (server, backends, WAL writer...)."""
    used = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == "postgres":
                    used += profiling.process_cpu(int(proc.name))
    return used


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


WAITS_SQL = (
    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
)


class WaitSampler:
    """Samples the states of the database's backends in a thread while a run goes on."""

    def __init__(self, database_url: str) -> None:
        self.dsn = proxy.asyncpg_dsn(database_url)
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)

    async def _sample(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            while not self._stop.is_set():
                for state, kind, event in await conn.fetch(WAITS_SQL):
                    if state == "active":
                        self.counts[f"{kind}:{event}" if kind else "running (no wait event)"] += 1
                    elif state != "idle":
                        self.counts[state] += 1  # idle in transaction: waiting for its gateway
                self.samples += 1
                await asyncio.sleep(SAMPLE_SECONDS)
        finally:
            await conn.close()

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# The run


class Bench:
    """The servers, the configurations and their measurement."""

    def __init__(self, args: argparse.Namespace, servers: proxy.Servers) -> None:
        self.args, self.servers = args, servers
        self.upstream_pid = 0
        self.configs: list[Config] = []

    def start(self, pg_url: str) -> None:
        """The upstream, a SQLite gateway and four PostgreSQL replicas; an account per configuration."""
        py, workdir = sys.executable, self.servers.workdir
        upstream_port = proxy.free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/api/v1/chat"
        # The repository's own gateway package, installed or not, and no GATEWAY_* settings of the caller's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        upstream = [py, str(BENCH / "upstream.py"), "--port", str(upstream_port)]
        self.upstream_pid = self.servers.start("upstream", upstream, env)

        def gateway_env(database_url: str, port: int | None = None) -> dict[str, str]:
            return proxy.gateway_env(ROOT, database_url, upstream_url, port)

        sqlite_url = f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
        backends = {"SQLite": sqlite_url, "PostgreSQL": pg_url}
        for url in backends.values():  # migrate once per database
            proxy.gateway_cli(gateway_env(url), "db", "upgrade")
        replicas = {
            "SQLite": [Replica("sqlite-1", proxy.free_port())],
            "PostgreSQL": [Replica(f"pg-{i}", proxy.free_port()) for i in range(1, max(REPLICAS) + 1)],
        }
        serve = [py, "-m", "gateway", "serve", "--no-migrate"]
        for backend, group in replicas.items():
            for replica in group:
                replica.pid = self.servers.start(
                    replica.name, serve, gateway_env(backends[backend], replica.port)
                )
        self.configs = [Config("SQLite", replicas["SQLite"], sqlite_url)]
        self.configs += [Config("PostgreSQL", replicas["PostgreSQL"][:n], pg_url) for n in REPLICAS]
        with ThreadPoolExecutor(len(self.configs)) as pool:  # 7 CLI runs each
            accounts = list(pool.map(lambda c: proxy.make_account(gateway_env(c.database_url)), self.configs))
        for config, account in zip(self.configs, accounts, strict=True):
            config.account = account
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {account.secret}"}
            script = workdir / f"wrk-{config.backend}-{len(config.replicas)}.lua"
            loadgen.write_wrk_script(script, proxy.chat_body(False), headers)
            ports = ", ".join(str(r.port) for r in config.replicas)
            with script.open("a") as lua:
                lua.write(WRK_ADDRS.format(ports=ports))
            config.script = script
        self.servers.wait_ready("upstream", f"http://127.0.0.1:{upstream_port}")
        for group in replicas.values():
            for replica in group:
                self.servers.wait_ready(replica.name, f"{replica.base}/readyz")

    def run_once(self, config: Config, seconds: float) -> Sample:
        """One wrk run across the configuration's replicas; its answers and counters are tallied."""
        assert config.script is not None
        before = {r.name: r.charged() for r in config.replicas}
        gw = sum(profiling.process_cpu(r.pid) for r in config.replicas)
        pg, up, wrk = postgres_cpu(), profiling.process_cpu(self.upstream_pid), children_cpu()
        sampler = WaitSampler(config.database_url) if config.backend == "PostgreSQL" else None
        with sampler or contextlib.nullcontext():
            window = MachineWindow(0.1, seconds)  # inside the load: wrk's grace after it is idle
            url = f"{config.replicas[0].base}/api/v1/chat"  # wrk's Host header; the threads' addresses differ
            result = loadgen.run_wrk(config.script, url, seconds, self.args.connections, WRK_THREADS)
        load = result.elapsed or seconds  # the load's span; the grace after it is idle

        def cores(cpu_seconds: float) -> float:
            return cpu_seconds / load

        sample = Sample(
            result,
            gateway_cpu=cores(sum(profiling.process_cpu(r.pid) for r in config.replicas) - gw),
            postgres_cpu=cores(postgres_cpu() - pg),
            upstream_cpu=cores(profiling.process_cpu(self.upstream_pid) - up),
            wrk_cpu=cores(children_cpu() - wrk),
            busy=window.busy_cores(),
        )
        if sampler:
            config.waits.update(sampler.counts)
            config.wait_samples += sampler.samples
        after = {r.name: r.charged() for r in config.replicas}
        for name in after:
            config.by_replica[name] += int(after[name] - before[name])
            config.charged += after[name] - before[name]
        config.ok += result.ok
        if result.non2xx or result.errors or result.cut:
            config.problems.append(
                f"{result.non2xx} non-2xx, {result.errors} socket errors, {result.cut} cut by wrk's stop"
            )
        return sample

    def measure(self) -> None:
        """A warm-up per configuration, then interleaved rounds."""
        for config in self.configs:  # pools fill, caches warm
            self.run_once(config, 1.0)
        for round_no in range(1, self.args.rounds + 1):
            for config in self.configs:
                config.samples.append(self.run_once(config, self.args.duration))
            print(f"round {round_no}/{self.args.rounds}: done", flush=True)

    def check(self, config: Config) -> list[tuple[bool, str]]:
        """bench/proxy.py's checks of the books, on this configuration's account."""
        assert config.account is not None
        books = proxy.Books(config.database_url, config.account)
        deadline = time.monotonic() + proxy.DRAIN_SECONDS
        while books.holds_left() and time.monotonic() < deadline:
            time.sleep(0.1)
        # The replicas also served other configurations, so their counters' growth over this
        # configuration's runs stands in for the whole counter (plain answers are settled before
        # they are sent, so a run's requests are all counted when wrk returns).
        metric = f'gateway_requests_total{{outcome="charged"}} {config.charged:.0f}'
        checks = proxy.check_books(books, config.ok, metric)
        checks.append(
            (not config.problems, "load: every request answered 2xx, none cut, no socket errors")
            if not config.problems
            else (False, "load: " + "; ".join(config.problems))
        )
        return checks


# ---------------------------------------------------------------------------------------------
# Report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(configs: list[Config], verdicts: dict[str, bool], cores: int) -> str:
    """One row per configuration."""
    header = ["backend", "replicas", "req/s", "p50 ms", "p99 ms", "speedup", "split %"]
    header += ["CPU/req", "gw", "pg", "upstream", "wrk", "other", "idle", "check"]
    base = next((c for c in configs if c.backend == "PostgreSQL" and len(c.replicas) == 1), None)
    base_rps = median([s.result.rps for s in base.samples]) if base else float("nan")
    rows = [header]
    for c in configs:
        rps = median([s.result.rps for s in c.samples])
        total = sum(c.by_replica.values()) or 1
        cpu_per_req = median([s.gateway_cpu / s.result.rps for s in c.samples if s.result.rps])
        rows.append(
            [
                c.backend,
                str(len(c.replicas)),
                f"{rps:,.0f}",
                f"{median([s.result.p50 for s in c.samples]) * 1000:.1f}",
                f"{median([s.result.p99 for s in c.samples]) * 1000:.1f}",
                f"{rps / base_rps:.2f}" if c.backend == "PostgreSQL" else "-",
                "/".join(f"{100 * c.by_replica[r.name] / total:.0f}" for r in c.replicas),
                f"{cpu_per_req * 1e6:,.0f} us",
                *(
                    f"{median([getattr(s, a) for s in c.samples]):.2f}"
                    for a in ("gateway_cpu", "postgres_cpu", "upstream_cpu", "wrk_cpu", "other")
                ),
                f"{median([cores - s.busy for s in c.samples]):.2f}",
                "PASS" if verdicts[c.label] else "FAIL",
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
    return "\n".join(lines)


def waits_line(config: Config) -> str:
    """Backends of the database by state, averaged over the samples."""
    n = config.wait_samples or 1
    top = ", ".join(f"{k} {v / n:.1f}" for k, v in config.waits.most_common(6))
    return f"  {config.label}: {config.wait_samples} samples; {top or 'no busy backend seen'}"


WAITS_LEGEND = """
PostgreSQL backends of the database during the runs, by state, on average per sample. All of a
configuration's requests use one key, so every transaction locks the same user and team counter
rows. Lock:transactionid: waiting for another transaction's row lock; Lock:tuple: queued for it;
LWLock:LockManager: contending in PostgreSQL's lock table; idle in transaction: in a transaction,
waiting for its gateway to send the next statement; IO:WALSync: waiting for a commit's flush."""


def legend(cores: int, connections: int) -> str:
    return f"""\
req/s, p50, p99: one wrk process, {connections} connections in total, {WRK_THREADS} threads each pointed at
one replica; median over rounds. speedup: req/s over PostgreSQL x1's. split: the share of the requests
each replica charged. CPU/req: CPU time of the configuration's replicas per request. gw, pg,
upstream, wrk: cores used on average during the load by the replicas together, every postgres
process, the fake upstream and wrk; other: by the rest of the machine (kernel, other people's work);
idle: of {cores} cores, left unused. check: the books (below).
This machine has {cores} CPU cores, shared by the load generator, the fake upstream, PostgreSQL and
every replica: more replicas compete for the same cores, so the speedup here is not what replicas
on their own machines would give."""


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    proxy.add_load_arguments(parser, "configuration", WRK_THREADS)
    parser.add_argument(
        "--database-url",
        help="an existing postgresql+asyncpg://... database to use (migrated, not dropped); "
        f"default: a fresh database on {PG_SERVER}, dropped at the end",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round of 2 s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and the fresh database")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 2.0), 1
    proxy.check_load_arguments(parser, args, WRK_THREADS)
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        parser.error("--database-url must be postgresql+asyncpg://...")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every check passed."""
    args = parse_args(argv)
    proxy.require_wrk()
    fresh = [] if args.database_url else [f"bench_replicas_{secrets.token_hex(4)}"]
    with (
        proxy.fresh_databases(PG_SERVER, fresh, args.keep) as created,
        proxy.work_directory("gw-replicas-", args.keep) as servers,
    ):
        return run(args, servers, args.database_url or f"{PG_SERVER}/{created[0]}")


def run(args: argparse.Namespace, servers: proxy.Servers, pg_url: str) -> int:
    started = time.monotonic()
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    where = pg_url.rpartition("@")[2]
    print(
        f"{cores} CPU cores (load average {load:.2f}); wrk, {args.connections} connections, "
        f"{args.rounds} round(s) of {args.duration:g} s per configuration, plain requests, full metering\n"
        f"SQLite: a temp file; PostgreSQL: {where}; upstream: bench/upstream.py\n"
        f"NB {cores} cores for wrk, the upstream, PostgreSQL and up to {max(REPLICAS)} replicas: "
        "more replicas compete for the same CPU",
        flush=True,
    )
    bench = Bench(args, servers)
    bench.start(pg_url)
    print(f"servers up in {time.monotonic() - started:.0f} s", flush=True)
    bench.measure()
    checks = {c.label: bench.check(c) for c in bench.configs}
    verdicts = {label: all(ok for ok, _ in cs) for label, cs in checks.items()}

    print()
    print(table(bench.configs, verdicts, cores))
    print(legend(cores, args.connections))
    print(WAITS_LEGEND)
    for config in bench.configs:
        if config.backend == "PostgreSQL":
            print(waits_line(config))
    for label, cs in checks.items():
        print(f"\n{label}:")
        for ok, text in cs:
            print(f"  {'PASS' if ok else 'FAIL'} {text}")
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
