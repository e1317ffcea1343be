"""Load for the proxy benchmark: wrk driven by a Lua script, and bundled asyncio clients.

- `run_wrk`: wrk in a closed loop at N connections. Its Lua script stops sending at the deadline
  and lets wrk's own stop come a grace later, so no request is cut in flight and wrk's count of
  answers can be compared exactly with the gateway's ledger.
- `sequential`: one request at a time on one keep-alive connection, each timed to the end of its
  body and, for streams, to the first body chunk.
- `concurrent`: N keep-alive connections for a fixed time; it stands in for wrk when wrk is not
  installed (it is CPU-bound near a few thousand req/s on one core, so it under-reports fast
  targets). Requests in flight at its deadline complete and are counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# wrk runs at least this long after the load stops (its -d is whole seconds).
WRK_GRACE_SECONDS = 0.5

# Run by every wrk thread. `delay` is called before each request: past the deadline it parks the
# connection for an hour instead. `done` prints one JSON line for `run_wrk` to read.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args)
  started = now(); deadline = started + tonumber(args[1]); last = started; sent = 0
end
function delay()
  last = now()
  if last < deadline then sent = sent + 1; return 0 end
  return 3600000
end
function done(summary, latency, requests)
  local first, final, total = math.huge, 0, 0
  for _, t in ipairs(threads) do
    first = math.min(first, t:get("started")); final = math.max(final, t:get("last"))
    total = total + t:get("sent")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"sent":%d,"elapsed":%.6f,"non2xx":%d,"errors":%d,"p50":%d,"p99":%d}}\\n',
    summary.requests, total, final - first, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Throughput:
    """One run at the throughput concurrency."""

    requests: int  # answered, any status
    non2xx: int
    errors: int  # socket errors and timeouts
    cut: int  # sent but never answered (wrk stopped first)
    rps: float
    elapsed: float  # seconds under load
    p50: float  # seconds
    p99: float
    cpu_per_request: float = math.nan  # seconds of the serving process's CPU, filled in by the caller

    @property
    def ok(self) -> int:
        """Answered 2xx."""
        return self.requests - self.non2xx


@dataclass
class Run:
    """What a bundled client saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds
    first_bytes: list[float] = field(default_factory=list)  # seconds, streams only
    elapsed: float = 0.0

    @property
    def requests(self) -> int:
        """Answered requests, whatever their status."""
        return sum(self.statuses.values())

    @property
    def ok2xx(self) -> int:
        """Requests answered 2xx."""
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def throughput(self) -> Throughput:
        """The run as a throughput figure."""
        return Throughput(
            requests=self.requests,
            non2xx=self.requests - self.ok2xx,
            errors=self.errors,
            cut=0,
            rps=self.requests / self.elapsed if self.elapsed else 0.0,
            elapsed=self.elapsed,
            p50=percentile(self.latencies, 50),
            p99=percentile(self.latencies, 99),
        )


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered)))) - 1]


def write_wrk_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    """The wrk Lua script that posts `body` with `headers`."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    path.write_text(WRK_SCRIPT.format(body=body.decode(), headers=lines))
    return path


def run_wrk(script: Path, url: str, seconds: float, connections: int, threads: int) -> Throughput:
    """wrk for `seconds` of load, then the grace for the requests in flight."""
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}"]
    argv += [f"-d{math.ceil(seconds + WRK_GRACE_SECONDS)}s", "--timeout", "10s", "-s", str(script)]
    argv += [url, "--", f"{seconds:g}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    r = json.loads(line.removeprefix("BENCH "))
    return Throughput(
        requests=r["requests"],
        non2xx=r["non2xx"],
        errors=r["errors"],
        cut=max(r["sent"] - r["requests"] - r["errors"], 0),
        rps=r["requests"] / r["elapsed"] if r["elapsed"] > 0 else 0.0,
        elapsed=r["elapsed"],
        p50=r["p50"] / 1e6,
        p99=r["p99"] / 1e6,
    )


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def _one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool, run: Run
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if stream:
                await response.content.readany()
                run.first_bytes.append(time.perf_counter() - started)
                while await response.content.readany():
                    pass
            else:
                await response.read()
            run.latencies.append(time.perf_counter() - started)
            run.statuses[response.status] += 1
    except (aiohttp.ClientError, TimeoutError):
        run.errors += 1


async def sequential(
    url: str, body: bytes, headers: dict[str, str], *, stream: bool, count: int, max_seconds: float
) -> Run:
    """`count` requests one after another (fewer if `max_seconds` runs out), each timed."""
    run = Run()
    async with _session(1) as session:
        started = time.perf_counter()
        deadline = started + max_seconds
        for _ in range(count):
            await _one(session, url, body, headers, stream, run)
            if time.perf_counter() > deadline:
                break
        run.elapsed = time.perf_counter() - started
    return run


async def concurrent(
    url: str, body: bytes, headers: dict[str, str], *, stream: bool, connections: int, seconds: float
) -> Run:
    """`connections` clients in a closed loop for `seconds`; requests in flight at the end complete."""
    run = Run()
    async with _session(connections) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                await _one(session, url, body, headers, stream, run)

        await asyncio.gather(*(client() for _ in range(connections)))
        run.elapsed = time.perf_counter() - started
    return run
