"""A/B: this working tree's gateway beside an earlier revision's and the bare proxy, in one run.

How each speed change of issue 7 was measured. Checks out REV (default HEAD) in a temporary git
worktree, then starts the fake upstream (bench/upstream.py) and two gateways, `python -m gateway
serve` from each tree, each on its own fresh SQLite file with the same account as bench/proxy.py
makes (so every request is fully metered). Both are loaded with wrk (or the bundled asyncio client)
in interleaved rounds, the order alternating from round to round, so that other work on the
machine touches both alike. The bare aiohttp proxy (bench/bare_proxy.py) runs in the same rounds,
so each gateway's req/s is also given as a ratio to it. Prints each one's median req/s and CPU
time per request (of its process, all threads), every round, and the ratio of CPU per request: the
figure that moves least with the machine's speed. Then, at concurrency 1, --sequential requests to
each in interleaved rounds, and to the upstream directly: the p50 and p99 each adds to the direct
call. Exit 1 if any answer was not 2xx.

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


def start_bare(bare: Gateway, servers: proxy.Servers, upstream_url: str) -> None:
    """The bare pass-through proxy, the baseline."""
    port = proxy.free_port()
    argv = [sys.executable, str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream", upstream_url]
    bare.pid = servers.start(bare.label, argv, {**os.environ, "PYTHONPATH": str(ROOT)})
    bare.url = f"http://127.0.0.1:{port}/api/v1/chat"
    servers.wait_ready(bare.label, bare.url)


def latencies(target: Gateway, args: argparse.Namespace, count: int) -> list[float]:
    """`count` sequential requests: their latencies in seconds."""
    stream = args.mode == "stream"
    body, headers = proxy.chat_body(stream), {"Content-Type": "application/json", **target.auth}
    run = asyncio.run(
        loadgen.sequential(target.url, body, headers, stream=stream, count=count, max_seconds=30)
    )
    target.non2xx += run.requests - run.ok2xx + run.errors
    return run.latencies


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
    parser.add_argument(
        "--sequential", type=int, default=2000, help="requests at concurrency 1 to each (0: none)"
    )
    args = parser.parse_args()
    if not 0 < args.duration <= 10 or not 1 <= args.rounds <= 20 or not 0 <= args.sequential <= 20_000:
        parser.error("--duration must be in (0, 10], --rounds in [1, 20] and --sequential in [0, 20000]")
    workdir = Path(tempfile.mkdtemp(prefix="gw-compare-"))
    old_tree = workdir / "tree"
    git = ["git", "-C", str(ROOT), "worktree"]
    subprocess.run([*git, "add", "--detach", "--quiet", str(old_tree), args.rev], check=True)
    servers = proxy.Servers(workdir)
    gateways = [Gateway(args.rev, old_tree), Gateway("working tree", ROOT)]
    bare = Gateway("bare proxy", ROOT)
    targets = [bare, *gateways]
    try:
        upstream_port = proxy.free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}/api/v1/chat"
        upstream = [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstream_port)]
        servers.start("upstream", upstream, {**os.environ, "PYTHONPATH": str(ROOT)})
        servers.wait_ready("upstream", f"http://127.0.0.1:{upstream_port}")
        start_bare(bare, servers, upstream_url)
        for gateway in gateways:
            start(gateway, servers, upstream_url)
        wrk = shutil.which("wrk")
        scripts = {
            g.label: loadgen.write_wrk_script(
                workdir / f"wrk-{i}.lua",
                proxy.chat_body(args.mode == "stream"),
                {"Content-Type": "application/json", **g.auth},
            )
            if wrk
            else None
            for i, g in enumerate(targets)
        }
        for target in targets:  # warm-up: the connection pools fill
            load(target, args, scripts[target.label], 1.0)
            target.runs.clear()
        for round_no in range(args.rounds):
            for target in targets if round_no % 2 == 0 else targets[::-1]:
                load(target, args, scripts[target.label], args.duration)
        generator = "wrk" if wrk else "the bundled asyncio client (wrk is not installed)"
        print(
            f"{args.mode}, {args.connections} connections, {args.rounds} rounds of {args.duration:g} s, "
            f"{generator}"
        )
        bare_rps = statistics.median(r for r, _ in bare.runs)
        for target in targets:
            rps = statistics.median(r for r, _ in target.runs)
            cpu = statistics.median(c for _, c in target.runs)
            runs = " ".join(f"{r:,.0f}/{c * 1e6:.0f}" for r, c in target.runs)
            print(
                f"{target.label:>14}: {rps:7,.0f} req/s ({rps / bare_rps:.2f} x bare), "
                f"{cpu * 1e6:4.0f} us CPU a request (runs: {runs})"
            )
        old, new = (statistics.median(c for _, c in g.runs) for g in gateways)
        print(f"working tree / {args.rev}: {new / old:.3f} of the CPU a request")
        if args.sequential:
            direct = Gateway("upstream", ROOT, url=upstream_url)
            timed: dict[str, list[float]] = {t.label: [] for t in [direct, *targets]}
            share = max(1, args.sequential // args.rounds)
            for target in [direct, *targets]:  # warm-up
                latencies(target, args, 50)
            for round_no in range(args.rounds):
                order = [direct, *targets]
                for target in order if round_no % 2 == 0 else order[::-1]:
                    timed[target.label] += latencies(target, args, share)
            base50, base99 = (loadgen.percentile(timed["upstream"], q) for q in (50, 99))
            print(f"concurrency 1, {share * args.rounds} requests each; upstream directly:")
            print(f"{'upstream':>14}: p50 {base50 * 1e3:.3f} ms, p99 {base99 * 1e3:.3f} ms")
            for target in targets:
                p50, p99 = (loadgen.percentile(timed[target.label], q) for q in (50, 99))
                added = f"p50 +{(p50 - base50) * 1e3:.3f} ms, p99 +{(p99 - base99) * 1e3:.3f} ms"
                print(f"{target.label:>14}: {added}")
            targets.append(direct)
        failed = [t.label for t in targets if t.non2xx]
        if failed:
            print(f"FAIL: answers other than 2xx, or socket errors, from {', '.join(failed)}")
        return 1 if failed else 0
    finally:
        servers.stop_all()
        subprocess.run([*git, "remove", "--force", str(old_tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
