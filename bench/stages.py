"""Where a chat request's time goes, stage by stage: py-spy on the gateway under wrk (issue 24).

Starts the fake upstream (bench/upstream.py) and the gateway of this working tree (or of --rev, in a
temporary git worktree) on a fresh SQLite file with bench/proxy.py's account, warms it up, then
samples its event loop's thread with py-spy while wrk loads it at 32 connections. Each sample is put
in one stage by the functions on its stack (`STAGES`, first match wins), and the table gives each
stage's share of the loop's busy samples and, with --instructions N (what bench/instructions.py
counted a request), that share of N: the approximate instructions a request each stage costs.
docs/performance.md keeps the table. With --flamegraph PATH, py-spy also writes a flame graph (SVG)
of a second run of the same load.

    python bench/stages.py                          # this tree, 10 s
    python bench/stages.py --instructions 1222214 --flamegraph /tmp/gateway.svg
    python bench/stages.py --rev 6326214            # an earlier revision's stages

Needs py-spy (pip install py-spy; root, or ptrace allowed) and wrk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import loadgen
import profiling
import proxy

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONNECTIONS = 32
WARMUP_SECONDS = 3.0
RATE_HZ = 250

# (stage, pattern a stack's frames must match), checked in order: the first that matches names it.
STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("access log", re.compile(r"\(gateway/web/access_log\.py|^_log_chat ")),
    ("metrics", re.compile(r"\(gateway/ops/metrics\.py|\(prometheus_client/")),
    ("admission: decide and write", re.compile(r"^(admit_many|admit_once|admit) \(gateway/core/")),
    ("settlement: decide and write", re.compile(r"^(settle_many|settle_one|settle) \(gateway/core/")),
    ("SQLite batch: begin, savepoints, commit", re.compile(r"\(gateway/store/")),
    ("auth: key lookup and cache", re.compile(r"\(gateway/web/auth\.py")),
    ("parse: body, JSON, attribution", re.compile(r"\(gateway/web/(body|attribution)\.py")),
    ("forward: upstream request", re.compile(r"^open_upstream \(|^upstream_headers \(")),
    ("settle: hand-off, idempotency", re.compile(r"\(gateway/web/settle\.py")),
    ("relay: headers, body, answer", re.compile(r"\(gateway/web/(forward|upstream)\.py")),
    ("chat handler: pricing, charge, gate", re.compile(r"\(gateway/(web/chat|core)")),
    ("aiohttp client: upstream answer", re.compile(r"\(aiohttp/client")),
    ("aiohttp server: parse, dispatch, write", re.compile(r"\(aiohttp/")),
]
OTHER = "event loop, timers, other"
IDLE = re.compile(r"select \(selectors\.py|^run_forever \(uvloop|^Runner\.run \(asyncio/runners\.py")


def stage_of(frames: list[str]) -> str:
    """The stage a sample's stack (outermost frame first) belongs to."""
    for name, pattern in STAGES:
        if any(pattern.search(frame) for frame in frames):
            return name
    return OTHER


def read_stages(raw: Path) -> tuple[Counter[str], int]:
    """Busy samples of the main thread by stage, and their total."""
    stages: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        thread = profiling.THREAD.match(frames[0])
        if thread:
            if thread["name"] != "MainThread":
                continue
            frames.pop(0)
        if not frames or IDLE.search(frames[-1]):
            continue
        stages[stage_of(frames)] += int(count_text)
    return stages, sum(stages.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", help="profile the gateway of this git revision instead of this tree")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sampled load (<= 60)")
    parser.add_argument("--instructions", type=int, help="instructions a request, to split by stage")
    parser.add_argument("--flamegraph", type=Path, help="also write a flame graph SVG of a second run")
    parser.add_argument("--keep", type=Path, help="also keep py-spy's raw stacks in this file")
    parser.add_argument(
        "--connections", type=int, default=CONNECTIONS, help="wrk's connections (1: the latency path)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 256:
        parser.error("--connections must be between 1 and 256")
    if not 1 <= args.duration <= 60:
        parser.error("--duration must be between 1 and 60 seconds")
    for tool in ("py-spy", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (pip install py-spy; apt-get install -y wrk)")
    py = str(Path(sys.executable).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        workdir = Path(tmp)
        tree = ROOT
        servers = proxy.Servers(workdir)
        try:
            if args.rev:
                tree = workdir / "rev"
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev],
                    check=True,
                    capture_output=True,
                )
            port = proxy.free_port()
            upstream_url = f"http://127.0.0.1:{port}/api/v1/chat"
            servers.start(
                "upstream",
                [py, str(BENCH / "upstream.py"), "--port", str(port)],
                proxy.gateway_env(ROOT, "", ""),
            )
            servers.wait_ready("upstream", f"http://127.0.0.1:{port}/")
            gw_port = proxy.free_port()
            env = proxy.gateway_env(
                tree, f"sqlite+aiosqlite:///{workdir / 'gateway.db'}", upstream_url, gw_port
            )
            proxy.gateway_cli(env, "db", "upgrade")
            account = proxy.make_account(env)
            pid = servers.start("gateway", [py, "-m", "gateway", "serve", "--no-migrate"], env)
            url = f"http://127.0.0.1:{gw_port}"
            servers.wait_ready("gateway", f"{url}/readyz")
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {account.secret}"}
            script = loadgen.write_wrk_script(workdir / "chat.lua", proxy.chat_body(False), headers)
            chat_url = f"{url}/api/v1/chat"
            loadgen.run_wrk(script, chat_url, WARMUP_SECONDS, args.connections, 1)
            raw = workdir / "stacks.txt"
            with profiling.py_spy(pid, args.duration, raw, rate=RATE_HZ):
                run = loadgen.run_wrk(script, chat_url, args.duration, args.connections, 1)
            if args.flamegraph:
                argv_spy = ["py-spy", "record", "--pid", str(pid), "--duration", str(round(args.duration))]
                argv_spy += ["--rate", str(RATE_HZ), "--format", "flamegraph", "-o", str(args.flamegraph)]
                spy = subprocess.Popen(argv_spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.3)
                loadgen.run_wrk(script, chat_url, args.duration, args.connections, 1)
                spy.wait(timeout=args.duration + 30)
            stages, busy = read_stages(raw)
            if args.keep:
                shutil.copy(raw, args.keep)
        finally:
            servers.stop_all()
            if args.rev:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True
                )
    if not busy:
        raise SystemExit("py-spy recorded no busy samples (is it allowed to attach?)")
    print(
        f"py-spy at {RATE_HZ} Hz on the gateway's event loop, wrk at {args.connections} connections for "
        f"{args.duration:g} s: {run.rps:,.0f} req/s, {busy} busy samples, "
        f"{busy / RATE_HZ / max(run.rps * args.duration, 1) * 1e6:,.0f} µs of the loop's time a request"
    )
    head = f"{'stage':<42} {'share':>7}"
    print(head + (f" {'instructions a request':>24}" if args.instructions else ""))
    for name, count in stages.most_common():
        share = count / busy
        line = f"{name:<42} {100 * share:>6.1f}%"
        if args.instructions:
            line += f" {share * args.instructions:>24,.0f}"
        print(line)
    if args.flamegraph:
        print(f"flame graph: {args.flamegraph}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
