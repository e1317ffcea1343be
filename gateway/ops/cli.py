"""The `gateway` command: serve, demo, fake-upstream, db, and administration on the database."""

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
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from gateway.core.metering import now_us
from gateway.errors import GatewayError, LedgerUnavailable
from gateway.jsonout import dumps
from gateway.ops import cli_alerts, ledger, reports, services, workers
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

    teams = sub.add_parser("teams", help="teams").add_subparsers(dest="action", required=True)
    p = teams.add_parser("create", parents=[common, as_json], help="create a team")
    p.add_argument("name")
    teams.add_parser("list", parents=[common, as_json], help="list teams")

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    p = users.add_parser("create", parents=[common, as_json], help="create a user")
    p.add_argument("name")
    p.add_argument("--team")
    users.add_parser("list", parents=[common, as_json], help="list users")

    keys = sub.add_parser("keys", help="gateway keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("create", parents=[common, as_json], help="create a key (its secret is shown once)")
    p.add_argument("user")
    p.add_argument("--name")
    p = keys.add_parser("list", parents=[common, as_json], help="list keys (no secrets)")
    p.add_argument("--user")
    p = keys.add_parser("revoke", parents=[common, as_json], help="revoke a key")
    p.add_argument("id")

    budgets = sub.add_parser("budgets", help="budgets").add_subparsers(dest="action", required=True)
    p = budgets.add_parser("set", parents=[common, as_json], help="create a budget or change its limit")
    p.add_argument("scope", choices=services.SCOPES)
    p.add_argument("subject", help="team name, user name or key id")
    p.add_argument("limit", help="credits, e.g. 25 or 0.5")
    p.add_argument("--period", required=True, choices=("daily", "weekly", "monthly", "total"))
    p.add_argument("--soft", action="store_true", help="counted and alerted on, never refusing")
    p.add_argument("--alert-at", help="alert thresholds, percent of the limit, e.g. 50,90,100")
    p = budgets.add_parser("delete", parents=[common, as_json], help="delete a budget")
    p.add_argument("scope", choices=services.SCOPES)
    p.add_argument("subject")
    p.add_argument("--period", required=True, choices=("daily", "weekly", "monthly", "total"))
    p = budgets.add_parser("list", parents=[common, as_json], help="budgets with spent, held, remaining")
    p.add_argument("--scope", choices=services.SCOPES)
    p.add_argument("--subject")

    p = sub.add_parser("report", parents=[common, as_json], help="billing report of charged requests")
    p.set_defaults(action=None)
    p.add_argument("--from", dest="start", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="end", help="ISO date or datetime (UTC), exclusive")
    p.add_argument("--group-by", default="", help=f"comma-separated: {','.join(reports.GROUPS)}")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    books = sub.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    p = books.add_parser("list", parents=[common, as_json], help="ledger rows, oldest first, one page")
    for name in ("user", "team", "key", "model", "outcome", "limit", "cursor"):
        p.add_argument(f"--{name}")
    p.add_argument("--from", dest="start", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="end", help="ISO date or datetime (UTC), exclusive")
    books.add_parser("verify", parents=[common, as_json], help="check budget counters against the ledger")
    cli_alerts.add_parsers(sub, common, as_json)
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
        return asyncio.run(_admin(settings, args))
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


async def _admin(settings: Settings, args: argparse.Namespace) -> int:
    # A database problem is told in one line by main(); the store's own warning would repeat it.
    logging.getLogger("gateway.store").setLevel(logging.ERROR)
    store = open_store(settings.database_url, pool_size=2)
    try:
        work, show = cli_alerts.action(args, settings) or _admin_action(args)
        # Reading commands take no write lock, so a long report never holds up a live gateway.
        reading = args.action in ("list", "verify") or args.command == "report"
        result = await (store.read(work) if reading else store.run(work))
    finally:
        await store.close()
    if args.json:
        if result is not None:
            print(dumps(result, indent=2))
    else:
        print(show(result))
    # `ledger verify` found a difference.
    return 1 if isinstance(result, dict) and result.get("ok") is False else 0


def _admin_action(args: argparse.Namespace) -> tuple[Callable[[Any], Any], Callable[[Any], str]]:
    """The unit of work for an admin command, and how to show its result to a person."""
    at = now_us()
    command = (args.command, args.action)
    if command == ("teams", "create"):
        return (lambda c: services.create_team(c, args.name, at)), lambda r: f"created team {r['name']}"
    if command == ("teams", "list"):
        return services.list_teams, lambda rows: _table(rows, ["name", "created_at"])
    if command == ("users", "create"):
        return (
            lambda c: services.create_user(c, args.name, args.team, at)
        ), lambda r: f"created user {r['name']}" + (f" in team {r['team']}" if r["team"] else "")
    if command == ("users", "list"):
        return services.list_users, lambda rows: _table(rows, ["name", "team", "created_at"])
    if command == ("keys", "create"):
        return (
            (lambda c: services.create_key(c, args.user, args.name, at)),
            lambda r: (
                f"created key {r['id']} for {r['user']}\n{r['key']}\n"
                "(this secret is shown only now: store it safely)"
            ),
        )
    if command == ("keys", "list"):
        return (lambda c: services.list_keys(c, args.user)), lambda rows: _table(
            rows, ["id", "user", "name", "prefix", "created_at", "revoked_at"]
        )
    if command == ("keys", "revoke"):
        return (lambda c: services.revoke_key(c, args.id, at)), lambda _: f"revoked key {args.id}"
    if command == ("budgets", "set"):
        return (
            (
                lambda c: services.set_budget(
                    c,
                    args.scope,
                    args.subject,
                    args.period,
                    args.limit,
                    at,
                    enforce=not args.soft,
                    alert_at=args.alert_at,
                )
            ),
            lambda r: (
                f"{r['period']} {r['scope']} budget of {r['subject']}: limit {r['limit']}, "
                f"spent {r['spent']}, remaining {r['remaining']}"
            ),
        )
    if command == ("budgets", "delete"):
        return (
            lambda c: services.delete_budget(c, args.scope, args.subject, args.period)
        ), lambda _: f"deleted the {args.period} {args.scope} budget of {args.subject}"
    if command == ("budgets", "list"):
        return (lambda c: services.list_budgets(c, args.scope, args.subject)), lambda rows: _table(
            [{**r, "alert_at": ",".join(map(str, r["alert_at"]))} for r in rows],
            [
                "scope",
                "subject",
                "period",
                "limit",
                "spent",
                "held",
                "remaining",
                "resets_at",
                "enforce",
                "alert_at",
            ],
        )
    if command == ("report", None):
        report = reports.parse_query(args.start, args.end, args.group_by)
        if args.format == "json":
            args.json = True
        if args.json:
            return (lambda c: reports.usage_report(c, report).json()), str
        if args.format == "csv":
            return (lambda c: reports.usage_report(c, report)), lambda r: r.csv("\n").rstrip("\n")
        return (lambda c: reports.usage_report(c, report)), lambda r: _table(r.table(), r.columns())
    if command == ("ledger", "list"):
        page = ledger.parse_query(
            **{k: getattr(args, k) for k in ("user", "team", "key", "model", "outcome", "limit", "cursor")},
            start=args.start,
            end=args.end,
        )
        return (lambda c: ledger.list_entries(c, page)), _ledger_page
    if command == ("ledger", "verify"):
        return ledger.verify, ledger.describe
    raise AssertionError(f"unhandled command {command}")


def _ledger_page(page: dict[str, Any]) -> str:
    columns = ["request_id", "admitted_at", "team", "user", "model", "credits", "outcome"]
    more = f"\nnext page: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
    return _table(page["entries"], columns) + more


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table for a terminal."""
    if not rows:
        return "(none)"
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


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
        runner = web.AppRunner(create_app(settings, worker=worker), access_log=None)
        await runner.setup()
        runners.append(runner)
        # Workers bind the port side by side; the kernel spreads connections across them.
        await web.TCPSite(runner, settings.host, settings.port, reuse_port=worker is not None).start()
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
        if not services.list_budgets(conn, "team", DEMO_TEAM, at):
            services.set_budget(conn, "team", DEMO_TEAM, "daily", DEMO_BUDGET, at)
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
