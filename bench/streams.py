"""Issue 16's benchmark: many concurrent slow SSE streams through one gateway process and a bare proxy.

Starts, on free loopback ports, a slow streaming upstream (this script with --serve-upstream: each
answer is CHUNKS small SSE events, one every --interval seconds, then a usage event and
`[DONE]`), the bare aiohttp proxy (bench/bare_proxy.py, its pool as large as the streams) and
one gateway process (`python -m gateway serve`, default settings, on a fresh SQLite file).

Then, one target after the other, --streams clients (default 9,000) open their streams over
--ramp seconds, so that all are open at once for most of a stream's life, and read them to the
end. Each answer is checked byte for byte against what the upstream sent for that stream. Shown
per target: streams completed, peak streams open at once, bytes, time to first byte (p50, p99),
peak RSS (VmHWM) and its growth over the idle process per stream. For the gateway, the books:
one charged ledger row per completed stream, no hold left, `gateway ledger verify` clean.
Exit 1 on any FAIL.

    python bench/streams.py                  # 9,000 streams, about 2 minutes
    python bench/streams.py --streams 1000   # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy  # noqa: E402  (bench/proxy.py: servers, the account, RSS)

MODEL = proxy.MODEL
CHUNKS = 6
RSS_GOAL_MIB = 400.0
# The gateway's RSS may be at most this many times the bare proxy's.
RSS_GOAL_RATIO = 2.0


# ---------------------------------------------------------------------------------------------
# The slow upstream


def event(stream: str, index: int) -> bytes:
    """The `index`th content event of a stream: small, and different for every stream."""
    document = {
        "id": stream,
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": f"w{index}"}}],
    }
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def tail(stream: str) -> bytes:
    """The end of a stream: its usage event and `[DONE]`."""
    usage = {
        "id": stream,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": CHUNKS, "total_tokens": 9},
    }
    return b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"


def expected(stream: str) -> bytes:
    """Everything a client of `stream` must receive."""
    return b"".join(event(stream, i) for i in range(CHUNKS)) + tail(stream)


def serve_upstream(port: int, interval: float) -> None:
    """An upstream whose answers trickle: one event every `interval` seconds."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream = str(body["messages"][-1]["content"])
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for index in range(CHUNKS):
            if index:
                await asyncio.sleep(interval)
            await response.write(event(stream, index))
        await response.write(tail(stream))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/api/v1/chat", chat)
    web.run_app(app, host="127.0.0.1", port=port, backlog=4096, print=None, access_log=None)


# ---------------------------------------------------------------------------------------------
# The load


@dataclass
class Result:
    """What the clients of one target saw."""

    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    ttfb: list[float] = field(default_factory=list)
    open_now: int = 0
    open_peak: int = 0

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1


async def one_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], name: str, result: Result
) -> None:
    """Open one stream, read it to its end, and check it byte for byte."""
    payload = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": name}]}
    started = time.perf_counter()
    received = bytearray()
    result.open_now += 1
    result.open_peak = max(result.open_peak, result.open_now)
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                result.fail(f"status {response.status}: {(await response.read())[:200]!r}")
                return
            async for chunk in response.content.iter_any():
                if not received:
                    result.ttfb.append(time.perf_counter() - started)
                received += chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.fail(type(exc).__name__)
        return
    finally:
        result.open_now -= 1
    result.bytes += len(received)
    if bytes(received) == expected(name):
        result.completed += 1
    else:
        result.fail("bytes differ from upstream's")


async def load(url: str, headers: dict[str, str], streams: int, ramp: float, label: str) -> Result:
    """`streams` concurrent streams, started evenly over `ramp` seconds."""
    result = Result()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for index in range(streams):
            delay = start + ramp * index / streams - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_stream(session, url, headers, f"{label}-{index}", result)))
        await asyncio.gather(*tasks)
    return result


# ---------------------------------------------------------------------------------------------
# The run


def rss_kib(pid: int, field_name: str) -> int:
    """A VmRSS / VmHWM figure of a live process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field_name} for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def raise_open_files() -> int:
    """This client holds a socket a stream: its soft open-files limit raised to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=9000, help="concurrent streams a target (9000)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between upstream events (2)")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which streams are opened (5)")
    parser.add_argument("--targets", default="gateway,bare", help="which, in order (gateway,bare)")
    parser.add_argument("--access-log", default="json", help="the gateway's GATEWAY_ACCESS_LOG (json)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    """Run the benchmark; 0 when every check passed."""
    args = parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.interval)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    limit = raise_open_files()
    if limit < args.streams + 100:
        raise SystemExit(f"this client may open {limit} files; {args.streams} streams need more")
    workdir = Path(tempfile.mkdtemp(prefix="gw-streams-"))
    servers = proxy.Servers(workdir)
    try:
        return run(args, servers, workdir)
    finally:
        servers.stop_all()
        print(f"logs: {workdir}")


def run(args: argparse.Namespace, servers: proxy.Servers, workdir: Path) -> int:
    py = sys.executable
    ports = {name: proxy.free_port() for name in ("upstream", "bare_upstream", "bare", "gateway")}
    upstream_url = f"http://127.0.0.1:{ports['upstream']}/api/v1/chat"
    bare_upstream_url = f"http://127.0.0.1:{ports['bare_upstream']}/api/v1/chat"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(proxy.ROOT), env.get("PYTHONPATH")]))
    # One upstream each: the gateway's pooled connections to its own stay open for a while after.
    for name in ("upstream", "bare_upstream"):
        servers.start(
            name, [py, __file__, "--serve-upstream", str(ports[name]), "--interval", str(args.interval)], env
        )
    bare = [py, str(proxy.BENCH / "bare_proxy.py"), "--uvloop", "--port", str(ports["bare"])]
    pids = {
        "bare": servers.start("bare", [*bare, "--upstream", bare_upstream_url, "--max-connections", "0"], env)
    }

    database_url = f"sqlite+aiosqlite:///{workdir / 'gateway.db'}"
    gateway_env = proxy.gateway_env(proxy.ROOT, database_url, upstream_url, ports["gateway"])
    gateway_env["GATEWAY_ACCESS_LOG"] = args.access_log
    proxy.gateway_cli(gateway_env, "db", "upgrade")
    account = proxy.make_account(gateway_env)
    pids["gateway"] = servers.start("gateway", [py, "-m", "gateway", "serve", "--no-migrate"], gateway_env)
    servers.wait_ready("upstream", f"http://127.0.0.1:{ports['upstream']}/")
    servers.wait_ready("bare_upstream", f"http://127.0.0.1:{ports['bare_upstream']}/")
    servers.wait_ready("bare", f"http://127.0.0.1:{ports['bare']}/")
    servers.wait_ready("gateway", f"http://127.0.0.1:{ports['gateway']}/readyz")
    auth = {"Authorization": f"Bearer {account.secret}"}
    targets = {
        "gateway": (f"http://127.0.0.1:{ports['gateway']}/api/v1/chat", auth),
        "bare": (f"http://127.0.0.1:{ports['bare']}/api/v1/chat", {}),
    }

    checks: list[tuple[bool, str]] = []
    rows = []
    rss: dict[str, float] = {}
    for name in args.targets.split(","):
        url, headers = targets[name]
        idle = rss_kib(pids[name], "VmRSS")
        started = time.perf_counter()
        result = asyncio.run(load(url, headers, args.streams, args.ramp, name))
        elapsed = time.perf_counter() - started
        peak = rss_kib(pids[name], "VmHWM")
        rss[name] = peak / 1024
        per_stream = (peak - idle) / max(result.open_peak, 1)
        rows.append(
            f"{name:8} {result.completed:>6}/{args.streams:<6} {result.open_peak:>6} "
            f"{result.bytes / 1e6:>8.2f} "
            f"{percentile(result.ttfb, 0.5) * 1000:>8.1f} {percentile(result.ttfb, 0.99) * 1000:>8.1f} "
            f"{idle / 1024:>8.1f} {peak / 1024:>8.1f} {per_stream:>8.1f} {elapsed:>6.1f}"
        )
        checks.append(
            (
                result.completed == args.streams,
                f"{name}: {result.completed} of {args.streams} streams complete and byte for byte"
                + (f"; failures: {result.failed}" if result.failed else ""),
            )
        )
        if name == "gateway":
            checks.extend(books(gateway_env, account, result.completed))
    print(
        f"\n{args.streams} streams a target, {CHUNKS} events {args.interval:g} s apart, opened over "
        f"{args.ramp:g} s\n"
    )
    print(
        f"{'target':8} {'complete':>13} {'open':>6} {'MB':>8} {'ttfb p50':>8} {'ttfb p99':>8} "
        f"{'idle MiB':>8} {'peak MiB':>8} {'KiB/strm':>8} {'secs':>6}"
    )
    print("\n".join(rows))
    if "gateway" in rss:
        checks.append(
            (rss["gateway"] <= RSS_GOAL_MIB, f"gateway peak RSS {rss['gateway']:.1f} MiB <= {RSS_GOAL_MIB:g}")
        )
        if "bare" in rss:
            ratio = rss["gateway"] / rss["bare"]
            checks.append(
                (
                    ratio <= RSS_GOAL_RATIO,
                    f"gateway peak RSS {ratio:.2f}x the bare proxy's <= {RSS_GOAL_RATIO:g}x",
                )
            )
    print()
    for ok, text in checks:
        print(("PASS " if ok else "FAIL ") + text)
    return 0 if all(ok for ok, _ in checks) else 1


def books(env: dict[str, str], account: proxy.Account, completed: int) -> list[tuple[bool, str]]:
    """One charged ledger row a completed stream, no hold left, and `gateway ledger verify` clean."""
    book = proxy.Books(env["GATEWAY_DATABASE_URL"], account)
    deadline = time.monotonic() + 10
    while book.holds_left() and time.monotonic() < deadline:
        time.sleep(0.2)
    outcomes = dict(book.query("SELECT outcome, COUNT(*) FROM ledger WHERE key_id = :key GROUP BY outcome"))
    charged = outcomes.pop("charged", 0)
    holds = book.holds_left()
    verify = proxy.gateway_cli(env, "ledger", "verify", "--json")
    return [
        (
            charged == completed and not outcomes,
            f"ledger: {charged} charged rows == {completed} streams"
            + (f"; other outcomes: {outcomes}" if outcomes else ""),
        ),
        (holds == 0, f"holds: {holds} left"),
        (verify.get("ok") is True, f"gateway ledger verify: {json.dumps(verify)[:300]}"),
    ]


if __name__ == "__main__":
    sys.exit(main())
