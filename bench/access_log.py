"""What the access log costs (issue 16, goal: throughput with it >= 0.95x without).

Starts the benchmark's fake upstream and two gateway processes on one fresh SQLite file, one with
`GATEWAY_ACCESS_LOG=json` (its stdout a file, as under a process manager) and one with `off`, then
loads them in turn, interleaved for --rounds rounds, with the bundled asyncio client
(bench/loadgen.py) at --connections for --seconds each, plain and streamed. Shown per target: the
median throughput and the gateway's CPU per request (from /proc; the steadier figure when the
client, on the same cores, is what limits throughput), and the ratios json / off.

    python bench/access_log.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import proxy  # noqa: E402

FORMATS = ("off", "json")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gw-access-log-"))
    servers = proxy.Servers(workdir)
    try:
        return run(args, servers, workdir)
    finally:
        servers.stop_all()
        print(f"logs: {workdir}")


def run(args: argparse.Namespace, servers: proxy.Servers, workdir: Path) -> int:
    py = sys.executable
    ports = {name: proxy.free_port() for name in ("upstream", *FORMATS)}
    upstream_url = f"http://127.0.0.1:{ports['upstream']}/api/v1/chat"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(proxy.ROOT), env.get("PYTHONPATH")]))
    servers.start("upstream", [py, str(proxy.BENCH / "upstream.py"), "--port", str(ports["upstream"])], env)
    database_url = f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
    base_env = proxy.gateway_env(proxy.ROOT, database_url, upstream_url)
    proxy.gateway_cli(base_env, "db", "upgrade")
    account = proxy.make_account(base_env)
    pids = {}
    for fmt in FORMATS:
        env_of = {**base_env, "GATEWAY_PORT": str(ports[fmt]), "GATEWAY_ACCESS_LOG": fmt}
        pids[fmt] = servers.start(f"gateway-{fmt}", [py, "-m", "gateway", "serve", "--no-migrate"], env_of)
    servers.wait_ready("upstream", f"http://127.0.0.1:{ports['upstream']}/")
    for fmt in FORMATS:
        servers.wait_ready(f"gateway-{fmt}", f"http://127.0.0.1:{ports[fmt]}/readyz")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {account.secret}"}

    rps: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    for mode in proxy.MODES:
        stream = mode == "stream"
        body = proxy.chat_body(stream)
        for fmt in FORMATS:  # warm-up
            url = f"http://127.0.0.1:{ports[fmt]}/api/v1/chat"
            asyncio.run(loadgen.concurrent(url, body, headers, stream=stream, connections=8, seconds=1))
        for _ in range(args.rounds):
            for fmt in FORMATS:
                url = f"http://127.0.0.1:{ports[fmt]}/api/v1/chat"
                before = cpu_seconds(pids[fmt])
                result = asyncio.run(
                    loadgen.concurrent(
                        url, body, headers, stream=stream, connections=args.connections, seconds=args.seconds
                    )
                )
                used = cpu_seconds(pids[fmt]) - before
                if result.ok2xx != result.requests or result.errors:
                    raise SystemExit(f"{fmt} {mode}: {result.statuses} {result.errors} errors")
                rps.setdefault((mode, fmt), []).append(result.requests / result.elapsed)
                cpu.setdefault((mode, fmt), []).append(used / result.requests * 1e6)

    lines = (workdir / "gateway-json.log").read_text().count('"request_id"')
    print(f"\n{args.connections} connections, {args.seconds:g} s runs, median of {args.rounds}\n")
    print(f"{'mode':7} {'log':5} {'req/s':>8} {'gw CPU us/req':>14}")
    for mode in proxy.MODES:
        for fmt in FORMATS:
            print(
                f"{mode:7} {fmt:5} {statistics.median(rps[mode, fmt]):>8.0f} "
                f"{statistics.median(cpu[mode, fmt]):>14.1f}"
            )
        throughput = statistics.median(rps[mode, "json"]) / statistics.median(rps[mode, "off"])
        per_request = statistics.median(cpu[mode, "off"]) / statistics.median(cpu[mode, "json"])
        print(f"{mode:7} json/off: throughput {throughput:.3f}x, by gateway CPU a request {per_request:.3f}x")
    print(f"\naccess log lines written by the json gateway: {lines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
