"""A/B: this working tree's gateway beside an earlier revision's, on one upstream, in one run.

How each speed change of issue 7 was measured. Checks out REV (default HEAD) in a temporary git
worktree, then starts the fake upstream (bench/upstream.py) and two gateways, `python -m gateway
serve` from each tree, each on its own fresh SQLite file with the same account as bench/proxy.py
makes (so every request is fully metered). Both are loaded with wrk (or the bundled asyncio client)
in interleaved rounds, the order alternating from round to round, so that other work on the
machine touches both alike. Prints each gateway's median req/s and CPU time per request (of its
process, all threads), every round, and the ratio of CPU per request: the figure that moves least
with the machine's speed. Exit 1 if any answer was not 2xx.

    python bench/compare.py d145a8f                 # plain requests, 5 rounds of 3 s
    python bench/compare.py HEAD --mode stream      # uncommitted changes against the last commit
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
import profiling
import proxy

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


@dataclass
class Gateway:
    """One side of the comparison: its source tree, URL, process and runs."""

    label: str
    tree: Path
    url: str = ""
    auth: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    runs: list[tuple[float, float]] = field(default_factory=list)  # (req/s, CPU seconds a request)
    non2xx: int = 0


def start(gateway: Gateway, servers: proxy.Servers, upstream_url: str) -> None:
    """Migrate a fresh database, make the account, start `gateway serve` from the gateway's tree."""
    port = proxy.free_port()
    database_url = f"sqlite+aiosqlite:///{servers.workdir / gateway.label}.db"
    env = proxy.gateway_env(gateway.tree, database_url, upstream_url, port)
    proxy.gateway_cli(env, "db", "upgrade")
    account = proxy.make_account(env)
    argv = [sys.executable, "-m", "gateway", "serve", "--no-migrate"]
    gateway.pid = servers.start(gateway.label, argv, env)
    servers.wait_ready(gateway.label, f"http://127.0.0.1:{port}/readyz")
    gateway.url = f"http://127.0.0.1:{port}/api/v1/chat"
    gateway.auth = {"Authorization": f"Bearer {account.secret}"}


def load(gateway: Gateway, args: argparse.Namespace, script: Path | None, seconds: float) -> None:
    """One run at --connections; its req/s and CPU per request are kept."""
    cpu = profiling.process_cpu(gateway.pid)
    stream = args.mode == "stream"
    if script is not None:
        result = loadgen.run_wrk(script, gateway.url, seconds, args.connections, args.threads)
    else:
        body, headers = proxy.chat_body(stream), {"Content-Type": "application/json", **gateway.auth}
        run = loadgen.concurrent(
            gateway.url, body, headers, stream=stream, connections=args.connections, seconds=seconds
        )
        result = asyncio.run(run).throughput()
    gateway.non2xx += result.non2xx + result.errors
    if result.requests:
        gateway.runs.append((result.rps, (profiling.process_cpu(gateway.pid) - cpu) / result.requests))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", nargs="?", default="HEAD", help="the git revision to compare against")
    parser.add_argument("--mode", choices=proxy.MODES, default="plain")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per run (<= 10)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args()
    if not 0 < args.duration <= 10 or not 1 <= args.rounds <= 20:
        parser.error("--duration must be in (0, 10] and --rounds in [1, 20]")
    workdir = Path(tempfile.mkdtemp(prefix="gw-compare-"))
    old_tree = workdir / "tree"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(old_tree), args.rev], check=True)
    servers = proxy.Servers(workdir)
    gateways = [Gateway(args.rev, old_tree), Gateway("working tree", ROOT)]
    try:
        upstream_port = proxy.free_port()
        upstream = [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)]
        servers.start("upstream", upstream, {**os.environ, "PYTHONPATH": str(ROOT)})
        servers.wait_ready("upstream", f"http://127.0.0.1:{upstream_port}")
        for gateway in gateways:
            start(gateway, servers, f"http://127.0.0.1:{upstream_port}/api/v1/chat")
        wrk = shutil.which("wrk")
        scripts = {
            g.label: loadgen.write_wrk_script(
                workdir / f"wrk-{i}.lua",
                proxy.chat_body(args.mode == "stream"),
                {"Content-Type": "application/json", **g.auth},
            )
            if wrk
            else None
            for i, g in enumerate(gateways)
        }
        for gateway in gateways:  # warm-up: the connection pools fill
            load(gateway, args, scripts[gateway.label], 1.0)
            gateway.runs.clear()
        for round_no in range(args.rounds):
            for gateway in gateways if round_no % 2 == 0 else gateways[::-1]:
                load(gateway, args, scripts[gateway.label], args.duration)
        generator = "wrk" if wrk else "the bundled asyncio client (wrk is not installed)"
        print(
            f"{args.mode}, {args.connections} connections, {args.rounds} rounds of {args.duration:g} s, "
            f"{generator}"
        )
        for gateway in gateways:
            rps = statistics.median(r for r, _ in gateway.runs)
            cpu = statistics.median(c for _, c in gateway.runs)
            runs = " ".join(f"{r:,.0f}/{c * 1e6:.0f}" for r, c in gateway.runs)
            print(f"{gateway.label:>14}: {rps:7,.0f} req/s, {cpu * 1e6:4.0f} us CPU a request (runs: {runs})")
        old, new = (statistics.median(c for _, c in g.runs) for g in gateways)
        print(f"working tree / {args.rev}: {new / old:.3f} of the CPU a request")
        failed = [g.label for g in gateways if g.non2xx]
        if failed:
            print(f"FAIL: answers other than 2xx, or socket errors, from {', '.join(failed)}")
        return 1 if failed else 0
    finally:
        servers.stop_all()
        subprocess.run([*git, "remove", "--force", str(old_tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
