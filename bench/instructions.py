"""Instructions a request: the gateway and the bare proxy counted by callgrind, under the same load.

How the speed changes of this project's later sessions were chosen. Time on this VM moves by 10 to
15 % from one run to the next, and more from day to day; the number of instructions a process runs
for a request does not (about 1 % between runs). Starts the fake upstream (bench/upstream.py), then,
one at a time, the bare proxy (bench/bare_proxy.py) and the gateway of this working tree (or of
--rev, checked out in a temporary worktree) under `valgrind --tool=callgrind`, with instrumentation
off while they start. Each gets a warm-up of wrk, then the counters are zeroed and wrk runs for
--duration seconds (bounded); instructions (callgrind's total) over the 2xx answers wrk counted.
The gateway is fully metered, on a fresh SQLite file with bench/proxy.py's account. Under callgrind
a process runs about 50 times slower, so at 32 connections the SQLite batches are full (64 units).

    python bench/instructions.py              # this tree's gateway and the bare proxy, ~2 minutes
    python bench/instructions.py --rev HEAD~3 # the gateway of an earlier revision beside them
    python bench/instructions.py --connections 1 --rev HEAD  # the latency path: one request at a time
    python bench/instructions.py --end-users 1000  # and this tree's gateway with end-user budgets

With --end-users N, this tree's gateway is also counted twice more, each on a fresh file of its
own, with each request naming one of N end users in `X-Gateway-End-User`, rotating (bench/team.py's
wrk script): once without end-user budgets, and once with a default end-user budget `USER/*` for the
account's user (daily, never reached), where the warm-up makes each end user's budget on their
first request (N below the warm-up's requests, about 200) and every measured request is held on a
third counter, its end user's. (The plain gateway's requests are all one caller's, which a batch
reads once; requests of different end users are different callers: the second row shows what
that costs, the third what the end-user budgets add.)

With --limits, this tree's gateway is also counted with rate limits on (issue 26): a per-key limit
of requests a minute and a per-team `concurrent` limit, both high enough never to refuse, so every
measured request is judged by both (GCRA state read and written, the team's open holds counted).

    python bench/instructions.py --rev main --limits   # main, this tree without and with limits

Needs valgrind (callgrind_control) and wrk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import loadgen
import proxy
import team

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONNECTIONS = 32
WARMUP_SECONDS = 5.0


def callgrind(pid: int, *args: str) -> None:
    """Send a callgrind_control command to the process."""
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, timeout=60, check=True)


def count(
    servers: proxy.Servers,
    name: str,
    argv: list[str],
    env: dict[str, str],
    url: str,
    ready: str,
    headers: dict[str, str],
    seconds: float,
    lua: str = "",
    connections: int = CONNECTIONS,
) -> tuple[int, int]:
    """Start `argv` under callgrind, load it, and return (2xx answers, instructions) of the measured run.

    `lua` is appended to the wrk script (a `request` function of its own, say)."""
    out = servers.workdir / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    pid = servers.start(name, [*valgrind, *argv], env)
    servers.wait_ready(name, ready)
    script = loadgen.write_wrk_script(servers.workdir / f"{name}.lua", proxy.chat_body(False), headers)
    with script.open("a") as extra:
        extra.write(lua)
    callgrind(pid, "-i", "on")
    loadgen.run_wrk(script, url, WARMUP_SECONDS, connections, 1)
    callgrind(pid, "-z")
    run = loadgen.run_wrk(script, url, seconds, connections, 1)
    callgrind(pid, "-i", "off")
    callgrind(pid, "-d")
    servers.stop(name)
    totals = [
        int(match.group(1))
        for path in servers.workdir.glob(f"{name}.callgrind*")
        for match in re.finditer(r"^totals: (\d+)", path.read_text(errors="replace"), re.MULTILINE)
    ]
    if run.requests == 0 or not totals:
        raise SystemExit(f"{name}: nothing measured (see {servers.workdir}/{name}.log)")
    return run.requests - run.non2xx, max(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rev", help="also count the gateway of this git revision")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of measured load (<= 60)")
    parser.add_argument("--keep", type=Path, help="copy the callgrind files here (for callgrind_annotate)")
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help="wrk's connections (1: the latency path, nothing batched; default 32)",
    )
    parser.add_argument(
        "--end-users", type=int, default=0, help="also the gateway with N end users and a default budget"
    )
    parser.add_argument(
        "--limits", action="store_true", help="also the gateway with a key rate and a team concurrent limit"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 60:
        parser.error("--duration must be between 1 and 60 seconds")
    if not 1 <= args.connections <= 256:
        parser.error("--connections must be between 1 and 256")
    if not 0 <= args.end_users <= 100_000:
        parser.error("--end-users must be between 0 and 100000")
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (apt-get install -y --no-install-recommends valgrind wrk)"
            )
    py = str(Path(sys.executable).resolve())  # the interpreter itself, not a shim valgrind would trace
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        servers = proxy.Servers(workdir)
        trees = {"gateway": ROOT}
        try:
            if args.rev:
                trees[f"gateway {args.rev}"] = workdir / "rev"
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(workdir / "rev"), args.rev],
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
            results: dict[str, tuple[int, int]] = {}
            bare_port = proxy.free_port()
            bare = [py, str(BENCH / "bare_proxy.py"), "--port", str(bare_port), "--upstream", upstream_url]
            bare_url = f"http://127.0.0.1:{bare_port}/api/v1/chat"
            results["bare proxy"] = count(
                servers,
                "bare",
                bare,
                proxy.gateway_env(ROOT, "", ""),
                bare_url,
                bare_url,
                headers={"Content-Type": "application/json"},
                seconds=args.duration,
                connections=args.connections,
            )
            # (name, tree, end users, with a default end-user budget, with limits)
            gateways = [(name, tree, 0, False, False) for name, tree in trees.items()]
            if args.end_users:
                named = f"gateway, {args.end_users} end users"
                n = args.end_users
                gateways += [(named, ROOT, n, False, False), (f"{named} + default", ROOT, n, True, False)]
            if args.limits:
                gateways.append(("gateway + limits", ROOT, 0, False, True))
            for name, tree, end_users, default, limited in gateways:
                gw_port = proxy.free_port()
                label = re.sub(r"\W+", "-", name)
                env = proxy.gateway_env(
                    tree, f"sqlite+aiosqlite:///{workdir / label}.db", upstream_url, gw_port
                )
                proxy.gateway_cli(env, "db", "upgrade")
                account = proxy.make_account(env)
                lua = ""
                if default:
                    budget = (f"{account.user}/*", proxy.BUDGET_CREDITS, "--period", "daily")
                    proxy.gateway_cli(env, "budgets", "set", "end_user", *budget, "--json")
                if limited:
                    never = ("--per", "minute", "--json")  # 60 million a minute: never reached
                    proxy.gateway_cli(
                        env, "limits", "set", "key", account.key_id, "requests", "60000000", *never
                    )
                    team_name = proxy.gateway_cli(env, "teams", "list", "--json")[0]["name"]
                    proxy.gateway_cli(
                        env, "limits", "set", "team", team_name, "concurrent", "100000", "--json"
                    )
                if end_users:
                    keys = f'"{account.secret}"'
                    lua = team.WRK_KEYS.format(
                        ports=gw_port, keys=keys, end_users=end_users, end_user_base=0, stride=0
                    )
                url = f"http://127.0.0.1:{gw_port}"
                results[name] = count(
                    servers,
                    label,
                    [py, "-m", "gateway", "serve", "--no-migrate"],
                    env,
                    f"{url}/api/v1/chat",
                    f"{url}/readyz",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {account.secret}"},
                    seconds=args.duration,
                    lua=lua,
                    connections=args.connections,
                )
        finally:
            servers.stop_all()
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for path in workdir.glob("*.callgrind*"):
                    shutil.copy(path, args.keep / path.name)
            if args.rev:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(workdir / "rev")],
                    capture_output=True,
                )
    bare_per = results["bare proxy"][1] / results["bare proxy"][0]
    print(
        f"callgrind, wrk at {args.connections} connections, {args.duration:g} s measured "
        f"after {WARMUP_SECONDS:g} s of warm-up"
    )
    width = max(24, *map(len, results))
    print(f"{'target':<{width}} {'2xx':>7} {'instructions a request':>24} {'bare / target':>14}")
    for name, (answers, instructions) in results.items():
        per = instructions / answers
        print(f"{name:<{width}} {answers:>7,} {per:>24,.0f} {bare_per / per:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
