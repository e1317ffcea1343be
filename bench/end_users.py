"""What end-user budgets cost on the hot path: four variants side by side, on SQLite and PostgreSQL.

bench/team.py's organisation (one team of --users users, 200, each with a key, a daily user budget
and the team's monthly budget, all too large to block) and its machinery (wrk rotating the keys,
interleaved rounds, the CPU of each kind of process, commits, the checks of the books), on eight
setups, each a gateway process on a database of its own:

- (a) no end user: the requests name none (team.py's load);
- (b) end users, no budget: each request names one of --end-users end users (1000) in the
  `X-Gateway-End-User` header, rotating with the keys (end user e always comes with key e mod
  --users, so there are --end-users pairs of user and end user); no end-user budget anywhere;
- (c) end users with a default: as (b), and every user has a default end-user budget `USER/*`
  (daily, too large to block), so each of the --end-users end users gets their own budget and
  counter on their first request (in the warm-up) and every request is then held on three counters;
- (d) a new end user each request, with the defaults: as (c), but the end users never repeat
  within the run, so every request creates its end user's budget and counter (the worst case).

on SQLite x1 and PostgreSQL x1. Shown for each: req/s, gateway CPU per request and their ratios to
(a) of the same backend, PostgreSQL's CPU and commits per admitted request, and, during the
PostgreSQL runs, what the database's backends were waiting for (pg_stat_activity sampled every 50
ms by one connection, whose queries are taken off the commits). After the drain, team.py's checks
of the books and `gateway ledger verify` on every setup; and, per variant, that every ledger row
names an end user (or none), that (b) made no end-user budget, and that in (c) and (d) every pair
of user and end user in the ledger has exactly one budget made from the default, whose counters
add up to what the ledger charged it. Exit status: 0 all PASS, 1 otherwise.

With --analyze, every PostgreSQL database is ANALYZEd after the warm-up (which has made (c)'s
end-user budgets), as autovacuum would in time; without it the planner has no statistics of the
run's rows (a new database; or a server with autovacuum off, as on this project's VM).

    python bench/end_users.py              # 3 rounds of 5 s, about 4 minutes
    python bench/end_users.py --quick      # 1 round of 3 s, about 1.5 minutes
    python bench/end_users.py --rounds 5 --analyze
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import proxy
import replicas
import team

# (d): end users numbered from 10^9 x the number of the run on: none repeats (a run sends far fewer
# than 10^9 requests, and wrk's threads start 5 x 10^11 apart).
NEW_END_USERS = 10**12
RUN_SPAN = 10**9
DEFAULT_LIMIT = team.BUDGET_CREDITS  # each end user's daily limit from `USER/*`: never reached

# Run with `python -c`: a default end-user budget `USER/*` for every user of each database, in one
# unit of work each, with the function behind `gateway budgets set end_user 'USER/*' ...`.
DEFAULTS_SCRIPT = r"""
import asyncio, sys

from sqlalchemy import text

from gateway.core.metering import now_us
from gateway.ops import budgeting, services
from gateway.store import open_store

limit, urls = sys.argv[1], sys.argv[2:]


def defaults(conn):
    at = now_us()
    for (name,) in conn.execute(text("SELECT name FROM users ORDER BY id")).all():
        budgeting.set_budget(conn, "end_user", f"{name}/*", "daily", limit, at)


async def main():
    for url in urls:
        store = open_store(url, pool_size=1)
        try:
            await store.run(defaults)
        finally:
            await store.close()


asyncio.run(main())
"""

# Per pair of user and end user in the ledger, against the budgets made from the defaults: pairs,
# pairs without such a budget, budgets made, and those whose counters' spent (all windows) differ
# from the pair's charged credits. (The subject is "USER_ID/END_USER".)
END_USER_BOOKS_SQL = """
WITH pairs AS (
    SELECT CAST(user_id AS TEXT) || '/' || end_user AS subject, SUM(credits_micros) AS credits
    FROM ledger WHERE end_user IS NOT NULL GROUP BY user_id, end_user
), made AS (
    SELECT b.subject, COALESCE(SUM(c.spent_micros), 0) AS spent
    FROM budgets b LEFT JOIN budget_counters c ON c.budget_id = b.id
    WHERE b.scope = 'end_user' AND b.default_id IS NOT NULL GROUP BY b.id, b.subject
)
SELECT (SELECT COUNT(*) FROM pairs),
       (SELECT COUNT(*) FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM made m WHERE m.subject = p.subject)),
       (SELECT COUNT(*) FROM made),
       (SELECT COUNT(*) FROM made m JOIN pairs p ON p.subject = m.subject WHERE m.spent <> p.credits)
"""


@dataclass
class Variant(team.Setup):
    """A setup of this benchmark: team.py's, with end users, their defaults and the waits seen."""

    key: str = ""  # a, b, c or d
    defaults: bool = False  # every user has a default end-user budget `USER/*`
    waits: Counter[str] = field(default_factory=Counter)  # PostgreSQL backends' states, summed
    wait_samples: int = 0
    runs: int = 0


VARIANTS = (
    ("a", "no end user"),
    ("b", "end users"),
    ("c", "end users + defaults"),
    ("d", "new end users + defaults"),
)


class Bench(team.Bench):
    """team.py's bench on the eight variants."""

    def __init__(self, args: argparse.Namespace, servers: proxy.Servers, pg_databases: list[str]) -> None:
        super().__init__(args, servers, pg_databases)
        self.setups = []
        backends = {"SQLite": None, "PostgreSQL": iter(pg_databases)}
        for backend, databases in backends.items():
            for key, what in VARIANTS:
                if databases is None:
                    url = f"sqlite+aiosqlite:///{servers.workdir / f'sqlite-{key}.db'}"
                else:
                    url = f"{team.PG_SERVER}/{next(databases)}"
                end_users = {"a": 0, "b": args.end_users, "c": args.end_users, "d": NEW_END_USERS}[key]
                label = f"{backend} ({key}) {what}"
                self.setups.append(
                    Variant(label, backend, url, end_users=end_users, key=key, defaults=key in "cd")
                )

    def make_accounts(self) -> dict[str, list[str]]:
        keys = super().make_accounts()
        urls = [s.database_url for s in self.variants if s.defaults]
        made = subprocess.run(
            [sys.executable, "-c", DEFAULTS_SCRIPT, DEFAULT_LIMIT, *urls],
            env=self.env(urls[0]),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if made.returncode != 0:
            raise SystemExit(f"setting the default end-user budgets failed:\n{made.stderr.strip()}")
        return keys

    @property
    def variants(self) -> list[Variant]:
        return [s for s in self.setups if isinstance(s, Variant)]

    def run_once(self, setup: team.Setup, seconds: float) -> team.Sample:
        """team.py's run, (d)'s with end users never sent before, PostgreSQL's with its backends
        sampled (the sampler's queries are no commits of the gateway's)."""
        assert isinstance(setup, Variant)
        setup.runs += 1
        if setup.end_users == NEW_END_USERS:  # new end users in every run
            self.write_script(setup, setup.runs * RUN_SPAN)
        if not setup.pg:
            return super().run_once(setup, seconds)
        sampler = replicas.WaitSampler(setup.database_url)
        with sampler:
            sample = super().run_once(setup, seconds)
        if seconds >= self.args.duration:  # not the warm-up
            setup.waits.update(sampler.counts)
            setup.wait_samples += sampler.samples
        if sample.commits is not None:
            sample.commits -= sampler.samples
        return sample

    def warmed_up(self) -> None:
        """With --analyze, statistics for PostgreSQL's planner, as autovacuum gathers them in time."""
        if self.args.analyze:
            for setup in self.live:
                if setup.pg:
                    team.query(setup.database_url, "ANALYZE")

    def check(self, setup: team.Setup) -> None:
        """team.py's checks, and the end users' books."""
        super().check(setup)
        assert isinstance(setup, Variant)
        url, rows = setup.database_url, setup.ok
        named, distinct = (
            int(x) for x in team.query(url, "SELECT COUNT(end_user), COUNT(DISTINCT end_user) FROM ledger")[0]
        )
        want = 0 if not setup.end_users else rows
        setup.checks.append(
            (named == want, f"end users: {named} of {rows} ledger rows name one ({distinct} distinct)")
        )
        pairs, missing, made, differ = (int(x) for x in team.query(url, END_USER_BOOKS_SQL)[0])
        own = int(team.query(url, "SELECT COUNT(*) FROM budgets WHERE scope = 'end_user'")[0][0])
        if setup.defaults:
            ok = missing == differ == 0 and made == pairs > 0
            text = (
                f"end-user budgets: {pairs} pairs of user and end user in the ledger, {made} budgets made "
                f"from the defaults, {missing} pairs without one, {differ} whose counters differ from "
                "the ledger's credits"
            )
        else:
            ok, text = own == 0, f"end-user budgets: {own} (none expected)"
        setup.checks.append((ok, text))


# ---------------------------------------------------------------------------------------------
# Report


def table(variants: list[Variant]) -> str:
    """One row per variant; ratios to (a) of the same backend."""
    header = ["setup", "req/s", "rps/(a)", "p50 ms", "p99 ms", "gw CPU/req", "gw/(a)", "pg CPU/req"]
    header += ["pg/(a)", "commits/req", "verify", "books"]
    base = {s.backend: s for s in variants if s.key == "a"}
    rows = [header]
    for s in variants:
        a = base[s.backend]
        gw, pg = s.per_request("gateway_cpu"), s.per_request("postgres_cpu")
        books = all(ok for ok, _ in s.checks)
        rows.append(
            [
                s.label,
                f"{s.median('rps'):,.0f}",
                f"{s.median('rps') / a.median('rps'):.2f}",
                f"{s.median('p50') * 1000:.1f}",
                f"{s.median('p99') * 1000:.1f}",
                f"{gw * 1e6:,.0f} us",
                f"{gw / a.per_request('gateway_cpu'):.2f}",
                f"{pg * 1e6:,.0f} us" if s.pg else "-",
                f"{pg / a.per_request('postgres_cpu'):.2f}" if s.pg else "-",
                f"{s.commits_per_request():.3f}" if s.pg else "-",
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
    return "\n".join(lines)


def waits(variants: list[Variant]) -> str:
    """PostgreSQL's backends of each variant's database by state, on average per sample."""
    lines = ["PostgreSQL backends by state, on average per 50 ms sample during the measured runs:"]
    for s in variants:
        if s.pg:
            n = s.wait_samples or 1
            top = ", ".join(f"{k} {v / n:.2f}" for k, v in s.waits.most_common(6))
            lines.append(f"  ({s.key}) {s.wait_samples} samples: {top or 'no busy backend seen'}")
    return "\n".join(lines)


def legend(args: argparse.Namespace) -> str:
    return f"""\
req/s, p50, p99: wrk, {args.connections} connections over {team.WRK_THREADS} threads, keys rotated over
{args.users} users, end users over {args.end_users} in (b) and (c); medians over the rounds. rps/(a), gw/(a),
pg/(a): req/s, gateway and PostgreSQL CPU per request over (a)'s of the same backend (CPU: above 1
costs more). gw CPU/req: the gateway process's CPU per request; pg CPU/req: every postgres
process's; all rounds together. commits/req: growth of the database's xact_commit over its 2xx
answers. verify: `gateway ledger verify` after the drain; books: every check below. This
machine's {os.cpu_count()} cores are shared by wrk, the upstream, PostgreSQL and the gateway."""


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    proxy.add_load_arguments(parser, "variant", team.WRK_THREADS)
    parser.add_argument("--users", type=int, default=200, help="users in the team, each with a key (1-5000)")
    parser.add_argument(
        "--end-users", type=int, default=1000, help="end users of (b) and (c), a multiple of --users"
    )
    parser.add_argument(
        "--analyze", action="store_true", help="ANALYZE the PostgreSQL databases after the warm-up"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one round of 3 s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and the databases")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 3.0), 1
    proxy.check_load_arguments(parser, args, team.WRK_THREADS)
    if not 1 <= args.users <= 5000:
        parser.error("--users must be in 1..5000")
    if not 1 <= args.end_users < NEW_END_USERS or args.end_users % args.users:
        parser.error("--end-users must be a positive multiple of --users (each end user has one user)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: 0 every check PASS, 1 otherwise."""
    args = parse_args(argv)
    proxy.require_wrk()
    token = secrets.token_hex(4)
    names = [f"bench_eu_{token}_{key}" for key, _ in VARIANTS]
    with (
        proxy.fresh_databases(team.PG_SERVER, names, args.keep) as made,
        proxy.work_directory("gw-end-users-", args.keep) as servers,
    ):
        return run(args, servers, made)


def run(args: argparse.Namespace, servers: proxy.Servers, databases: list[str]) -> int:
    started = time.monotonic()
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPU cores (load average {load:.2f}); wrk, {args.connections} connections, "
        f"{args.rounds} round(s) of {args.duration:g} s per variant; {args.users} users, "
        f"{args.end_users} end users in (b) and (c)\nPostgreSQL: fresh databases {', '.join(databases)}",
        flush=True,
    )
    bench = Bench(args, servers, databases)
    bench.start()
    print(f"servers up in {time.monotonic() - started:.0f} s", flush=True)
    bench.measure()
    for setup in bench.live:  # the drain
        servers.stop(f"{setup.label} #1")
    for setup in bench.live:
        bench.check(setup)

    print()
    print(table(bench.variants))
    print(legend(args))
    print(waits(bench.variants))
    for setup in bench.live:
        print(f"\n{setup.label} ({'database ' + setup.database if setup.pg else 'SQLite file'}):")
        for ok, text in setup.checks:
            print(f"  {'PASS' if ok else 'FAIL'} {text}")
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; load average {load:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end"
    )
    return 0 if all(ok for s in bench.live for ok, _ in s.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
