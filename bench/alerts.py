"""Issue 17's benchmark: chat throughput with budget alerts crossing and a webhook, against without.

Two gateways side by side, each on its own fresh SQLite file (or on --database-url, each with
its own account), in front of one fake upstream, both with one key and twelve soft budgets (key,
user and team; daily, weekly, monthly, total) with 20 thresholds each (50 % to 1000 %):

- `without`: no webhook, limits too large for any threshold to be reached;
- `alerts`: a webhook (a receiver of this script, answering 200), and limits sized from the
  first `without` round so that the thresholds are crossed all through the run: up to 240 events
  written by the settlements, dispatched, signed and posted while the load runs.

wrk drives each in interleaved rounds (without, alerts, without, alerts, ...); the medians and
their ratio are printed (goal: alerts >= 0.95x without), and the gateway's CPU time a request,
which a machine shared with other work disturbs less than throughput. Then the books: every event of the
`alerts` gateway delivered once (the receiver's distinct ids equal the events table), none pending.

    python bench/alerts.py --quick      # 2 rounds of 3 s, about half a minute
    python bench/alerts.py              # 3 rounds of 8 s
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import loadgen
from proxy import BENCH, ROOT, Servers, chat_body, free_port, gateway_cli, gateway_env

SECRET = "whsec_YmVuY2ggc2VjcmV0IG9mIGFsZXJ0cywgMzIgYnl0ZXM="
THRESHOLDS = ",".join(str(p) for p in range(50, 1001, 50))  # 20 thresholds
PERIODS = ("daily", "weekly", "monthly", "total")
HUGE = "1000000000"
CREDITS_PER_REQUEST = 0.3  # chat_body: three messages at 0.1


def serve_receiver(port: int) -> None:
    """The webhook receiver: answers 200, remembers the ids it got (GET /ids)."""
    from aiohttp import web

    ids: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        ids.append(request.headers["webhook-id"])
        return web.Response(text="ok")

    async def seen(request: web.Request) -> web.Response:
        return web.json_response(ids)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/ids", seen)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def account(env: dict[str, str], suffix: str, limit: str) -> str:
    """A team, a user, a key and twelve soft budgets of `limit` with the 20 thresholds; the key."""
    team, user = f"alerts-team-{suffix}", f"alerts-user-{suffix}"
    gateway_cli(env, "teams", "create", team, "--json")
    gateway_cli(env, "users", "create", user, "--team", team, "--json")
    key = gateway_cli(env, "keys", "create", user, "--json")
    set_limits(env, key["id"], user, team, limit)
    return f"{key['id']}:{user}:{team}:{key['key']}"


def set_limits(env: dict[str, str], key_id: str, user: str, team: str, limit: str) -> None:
    for scope, subject in (("key", key_id), ("user", user), ("team", team)):
        for period in PERIODS:
            gateway_cli(
                env, "budgets", "set", scope, subject, limit, "--period", period, "--soft",
                "--alert-at", THRESHOLDS, "--json",
            )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--database-url", help="postgresql+asyncpg://... instead of fresh SQLite files")
    parser.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return 0
    if args.quick:
        args.rounds, args.seconds = 2, 3.0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-alerts-"))
    servers = Servers(workdir)
    try:
        return run(args, servers, workdir)
    finally:
        servers.stop_all()


def run(args: argparse.Namespace, servers: Servers, workdir: Path) -> int:
    py = sys.executable
    ports = {name: free_port() for name in ("upstream", "receiver", "without", "alerts")}
    upstream_url = f"http://127.0.0.1:{ports['upstream']}/api/v1/chat"
    receiver = f"http://127.0.0.1:{ports['receiver']}"
    base_env = gateway_env(ROOT, "", upstream_url)
    servers.start("upstream", [py, str(BENCH / "upstream.py"), "--port", str(ports["upstream"])], base_env)
    servers.start("receiver", [py, str(Path(__file__)), "--serve-receiver", str(ports["receiver"])], base_env)
    keys: dict[str, str] = {}
    envs: dict[str, dict[str, str]] = {}
    for name in ("without", "alerts"):
        url = args.database_url or f"sqlite+aiosqlite:///{workdir / (name + '.db')}"
        env = gateway_env(ROOT, url, upstream_url, ports[name])
        if name == "alerts":
            env |= {"GATEWAY_WEBHOOK_URL": f"{receiver}/hook", "GATEWAY_WEBHOOK_SECRET": SECRET}
        gateway_cli(env, "db", "upgrade")
        keys[name] = account(env, f"{name}-{int(time.time())}", HUGE)
        envs[name] = env
        servers.start(name, [py, "-m", "gateway", "serve", "--no-migrate"], env)
    servers.wait_ready("upstream", f"http://127.0.0.1:{ports['upstream']}/")
    servers.wait_ready("receiver", f"{receiver}/ids")
    for name in ("without", "alerts"):
        servers.wait_ready(name, f"http://127.0.0.1:{ports[name]}/readyz")
    scripts = {
        name: loadgen.write_wrk_script(
            workdir / f"{name}.lua",
            chat_body(False),
            {"Content-Type": "application/json", "Authorization": f"Bearer {keys[name].rsplit(':', 1)[1]}"},
        )
        for name in keys
    }
    urls = {name: f"http://127.0.0.1:{ports[name]}/api/v1/chat" for name in keys}
    # A warm-up of each (not counted); the first sizes the alerting budgets: 1000 % is about what
    # the whole measured run will spend, so thresholds are crossed all through it.
    warm = loadgen.run_wrk(scripts["without"], urls["without"], 2, args.connections, args.threads)
    loadgen.run_wrk(scripts["alerts"], urls["alerts"], 2, args.connections, args.threads)
    spend = warm.rps * args.seconds * args.rounds * CREDITS_PER_REQUEST
    key_id, user, team, _ = keys["alerts"].split(":", 3)
    set_limits(envs["alerts"], key_id, user, team, f"{max(spend / 10, 1):.2f}")
    time.sleep(2.5)  # the gateway's budget cache
    runs: dict[str, list[loadgen.Throughput]] = {"without": [], "alerts": []}
    for round_ in range(args.rounds):
        for name in ("without", "alerts"):
            url = urls[name]
            pid = servers.procs[name].pid
            cpu = cpu_seconds(pid)
            result = loadgen.run_wrk(scripts[name], url, args.seconds, args.connections, args.threads)
            result.cpu_per_request = (cpu_seconds(pid) - cpu) / max(result.requests, 1)
            runs[name].append(result)
            print(f"round {round_ + 1} {name:8} {result.rps:8.0f} req/s  p99 {result.p99 * 1000:6.1f} ms  "
                  f"CPU {result.cpu_per_request * 1e6:5.0f} us/request  non-2xx {result.non2xx}",
                  flush=True)  # fmt: skip
    time.sleep(5)  # the last events delivered
    without = statistics.median(r.rps for r in runs["without"])
    alerts = statistics.median(r.rps for r in runs["alerts"])
    events = gateway_cli(envs["alerts"], "events", "list", "--limit", "1000", "--json")["events"]
    with urllib.request.urlopen(f"{receiver}/ids", timeout=5) as resp:
        received = json.loads(resp.read())
    delivered = [e for e in events if e["state"] == "delivered"]
    cpu = {name: statistics.median(r.cpu_per_request for r in rs) * 1e6 for name, rs in runs.items()}
    print(f"\nwithout webhooks: {without:.0f} req/s; with webhooks and alerts: {alerts:.0f} req/s "
          f"({alerts / without:.3f}x; goal >= 0.95x)")  # fmt: skip
    print(f"gateway CPU a request: without {cpu['without']:.0f} us, with {cpu['alerts']:.0f} us "
          f"({cpu['without'] / cpu['alerts']:.3f}x the requests per CPU-second)")  # fmt: skip
    print(f"events: {len(events)} emitted, {len(delivered)} delivered; receiver: {len(received)} posts, "
          f"{len(set(received))} distinct ids")  # fmt: skip
    checks = [
        (len(events) > 0, "thresholds were crossed during the run"),
        (len(delivered) == len(events), "every event delivered"),
        (sorted(received) == sorted(e["id"] for e in events), "each event posted exactly once"),
        (all(r.non2xx == 0 and r.errors == 0 for rs in runs.values() for r in rs), "every request 2xx"),
    ]
    for ok, what in checks:
        print(("ok   " if ok else "FAIL ") + what)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
