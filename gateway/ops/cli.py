"""The `gateway` command: serve, demo, fake-upstream, db, and administration (`admin_cli`) on the database."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.core.metering import now_us
from gateway.errors import GatewayError, LedgerUnavailable
from gateway.ops import admin_cli, budgeting, cli_alerts, cli_apply, cli_limits, services, workers
from gateway.ops.fake_upstream import FakeUpstream
from gateway.ops.settings import ConfigError, Settings
from gateway.store import migrate, open_store

log = logging.getLogger("gateway")

T = TypeVar("T")

# Allocations between two collections of the young generation while serving (see `tune_collector`).
GC_YOUNG_THRESHOLD = 20_000

DEMO_TEAM, DEMO_USER, DEMO_BUDGET = "demo-team", "demo-user", "100"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file (default: $GATEWAY_CONFIG)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the admin HTTP API's JSON")

    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--no-migrate", action="store_true", help="do not upgrade the database first")
    serve.add_argument(
        "--workers", metavar="N", help="processes serving the port (default: $GATEWAY_WORKERS or 1)"
    )
    # Given by `serve --workers N` to the worker processes it starts (gateway/ops/workers.py).
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-dir", help=argparse.SUPPRESS)
    serve.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    demo = sub.add_parser(
        "demo", parents=[common], help="run the gateway with a fake upstream and a demo key"
    )
    demo.add_argument("--no-migrate", action="store_true", help=argparse.SUPPRESS)
    fake = sub.add_parser("fake-upstream", help="run an Axerity-compatible fake upstream")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=9090)
    fake.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between SSE chunks")

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", parents=[common], help="migrate the database to the latest schema")

    admin_cli.add_parsers(sub, common, as_json)
    cli_alerts.add_parsers(sub, common, as_json)
    cli_limits.add_parsers(sub, common, as_json)
    cli_apply.add_parsers(sub, common, as_json)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "fake-upstream":
            return _fake_upstream(args)
        settings = Settings.load(args.config, flags={"workers": getattr(args, "workers", None)})
        if args.command == "serve":
            return _serve(settings, args)
        if args.command == "demo":
            return _demo(settings)
        if args.command == "db":
            migrate.upgrade(settings.database_url)
            print("database is at the latest schema")
            return 0
        if args.command == "webhooks":
            return asyncio.run(cli_alerts.test_webhooks(settings, args))
        if args.command in ("apply", "export"):
            return asyncio.run(cli_apply.run(settings, args))
        return asyncio.run(admin_cli.run(settings, args))
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except migrate.SchemaBehind as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except LedgerUnavailable as exc:
        print(
            f"gateway: cannot use the database ({exc.reason or 'unreachable'}); check GATEWAY_DATABASE_URL, "
            "and run 'gateway db upgrade' first on a new database",
            file=sys.stderr,
        )
        return 1
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a server's main coroutine on uvloop (libuv's event loop) where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if args.worker_index is not None:
        # One of a `serve --workers` server's processes: its parent has migrated.
        worker = workers.Worker(args.worker_index, settings.workers, Path(args.worker_dir), args.parent_fd)
        run_loop(_run_servers(settings, worker=worker))
        return 0
    if not args.no_migrate:
        migrate.upgrade(settings.database_url)
    elif not asyncio.run(migrate.check_current(settings.database_url)):
        log.warning(
            "database unreachable at start-up: its schema is not checked; serving 503 until it is back"
        )
    if settings.workers > 1:
        try:
            return workers.serve(settings, args.config)
        except OSError as exc:
            print(f"gateway: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
    run_loop(_run_servers(settings))
    return 0


async def _run_servers(
    settings: Settings,
    fake: FakeUpstream | None = None,
    fake_port: int = 0,
    *,
    worker: workers.Worker | None = None,
) -> None:
    """Serve the gateway (and a fake upstream) until SIGINT or SIGTERM, or as one `worker` of several."""
    from gateway.web import limits
    from gateway.web.app import create_app

    # Before serving: a signal that comes early stops the server once it has started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        if fake is not None:
            runner = web.AppRunner(fake.app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", fake_port).start()
            runners.append(runner)
        # The app's own drain (gateway/web/shutdown.py) gives chat requests the grace and settles
        # them; aiohttp gives any other request the same before it cancels it.
        runner = web.AppRunner(
            create_app(settings, worker=worker),
            access_log=None,
            shutdown_timeout=settings.shutdown_grace_seconds,
        )
        await runner.setup()
        runners.append(runner)
        # Workers bind the port side by side; the kernel spreads connections across them.
        await web.TCPSite(
            runner, settings.host, settings.port, reuse_port=worker is not None, backlog=limits.LISTEN_BACKLOG
        ).start()
        if worker is None:
            log.info(
                "gateway serving on http://%s:%d, forwarding to %s",
                settings.host,
                settings.port,
                settings.upstream_url,
            )
        else:
            log.info("worker %d serving (pid %d)", worker.index, os.getpid())
            workers.watch_parent(worker, stop.set)
        tune_collector()
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def tune_collector() -> None:
    """Set the garbage collector up for serving, once everything made at start-up exists.

    That (modules, the app, the pools) lives as long as the process: frozen, out of the
    collector's sight, full collections under load take milliseconds, not tens. And the young
    generation is collected every GC_YOUNG_THRESHOLD allocations not yet freed, not every 700: the
    objects of the requests in flight come and go by the hundreds, so at 700 it was collected every
    18 requests, each time going through all of theirs (5% of the CPU at 5,100 req/s); at 20,000,
    hardly ever while nothing but requests is made, and a collection finds most of them gone.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _demo(settings: Settings) -> int:
    fake_port = _free_port()
    settings = Settings(
        **{
            **settings.__dict__,
            "upstream_url": f"http://127.0.0.1:{fake_port}/api/v1/chat",
        }
    )
    migrate.upgrade(settings.database_url)
    key = asyncio.run(_demo_data(settings))
    url = f"http://{settings.host}:{settings.port}/api/v1/chat"
    body = json.dumps({"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "Hello!"}]})
    print(
        f"Demo: team {DEMO_TEAM!r}, user {DEMO_USER!r}, a daily team budget of {DEMO_BUDGET} credits, "
        f"and a fake upstream on port {fake_port}.\nTry it (each message costs 0.1 credits):\n\n"
        f"curl -i {url} \\\n  -H {shlex.quote('Authorization: Bearer ' + key)} \\\n"
        f"  -H 'Content-Type: application/json' \\\n  -d {shlex.quote(body)}\n",
        flush=True,
    )
    run_loop(_run_servers(settings, FakeUpstream(keep=1000), fake_port))
    return 0


async def _demo_data(settings: Settings) -> str:
    """The demo team, user and budget (kept across runs) and a fresh key; returns the key's secret."""
    store = open_store(settings.database_url)
    at = now_us()

    def setup(conn: Any) -> str:
        if not any(t["name"] == DEMO_TEAM for t in services.list_teams(conn)):
            services.create_team(conn, DEMO_TEAM, at)
        if not any(u["name"] == DEMO_USER for u in services.list_users(conn)):
            services.create_user(conn, DEMO_USER, DEMO_TEAM, at)
        if not budgeting.list_budgets(conn, "team", DEMO_TEAM, at):
            budgeting.set_budget(conn, "team", DEMO_TEAM, "daily", DEMO_BUDGET, at)
        return str(services.create_key(conn, DEMO_USER, "demo", at)["key"])

    try:
        return await store.run(setup)
    finally:
        await store.close()


def _fake_upstream(args: argparse.Namespace) -> int:
    fake = FakeUpstream(chunk_delay=args.chunk_delay, keep=1000)
    print(f"fake upstream on http://{args.host}:{args.port}/api/v1/chat", flush=True)
    web.run_app(fake.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
