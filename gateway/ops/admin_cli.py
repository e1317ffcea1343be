"""The `gateway` command's administration: teams, users, keys, budgets, reports, ledger, audit.

Each command is one unit of work on the database the configuration names (no running gateway is
needed); `--json` prints exactly what the admin HTTP API answers. Changes are audited with the
actor `cli <OS user>`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from gateway.core.metering import now_us
from gateway.jsonout import dumps
from gateway.ops import (
    access,
    adjustments,
    audit,
    budgeting,
    cli_alerts,
    cli_limits,
    ledger,
    reports,
    services,
)
from gateway.ops.settings import Settings
from gateway.store import open_store

PERIODS = ("daily", "weekly", "monthly", "total")
KEY_COLUMNS = ["id", "user", "name", "prefix", "created_at", "expires_at", "blocked", "models", "revoked_at"]


def add_parsers(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
    as_json: argparse.ArgumentParser,
) -> None:
    """The administration subcommands."""
    both = [common, as_json]
    teams = sub.add_parser("teams", help="teams").add_subparsers(dest="action", required=True)
    p = teams.add_parser("create", parents=both, help="create a team")
    p.add_argument("name")
    teams.add_parser("list", parents=both, help="list teams")
    p = teams.add_parser("set", parents=both, help="set a team's model allow-list")
    p.add_argument("name")
    _models_options(p, required=True)

    users = sub.add_parser("users", help="users").add_subparsers(dest="action", required=True)
    p = users.add_parser("create", parents=both, help="create a user")
    p.add_argument("name")
    p.add_argument("--team")
    users.add_parser("list", parents=both, help="list users")
    p = users.add_parser("set", parents=both, help="set a user's model allow-list")
    p.add_argument("name")
    _models_options(p, required=True)

    keys = sub.add_parser("keys", help="gateway keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("create", parents=both, help="create a key (its secret is shown once)")
    p.add_argument("user")
    p.add_argument("--name")
    _expiry_options(p)
    p.add_argument("--models", help="comma-separated models the key may use (default: every model)")
    p = keys.add_parser("list", parents=both, help="list keys (no secrets)")
    p.add_argument("--user")
    p = keys.add_parser("set", parents=both, help="change a key's models, expiry or name")
    p.add_argument("id")
    p.add_argument("--name")
    _models_options(p, required=False)
    _expiry_options(p, clearable=True)
    for action, text in (("revoke", "revoke a key"), ("block", "block a key"), ("unblock", "unblock a key")):
        keys.add_parser(action, parents=both, help=text).add_argument("id")
    p = keys.add_parser("rotate", parents=both, help="a new key replacing this one after a grace period")
    p.add_argument("id")
    p.add_argument("--grace", default="0", help="how long the old key keeps working, e.g. 1h (default 0)")

    budgets = sub.add_parser("budgets", help="budgets").add_subparsers(dest="action", required=True)
    p = budgets.add_parser("set", parents=both, help="create a budget or change its limit")
    p.add_argument("scope", choices=budgeting.SCOPES)
    p.add_argument(
        "subject", help="team name, user name, key id, or USER/END_USER (USER/* for each end user of USER)"
    )
    p.add_argument("limit", help="credits, e.g. 25 or 0.5")
    p.add_argument("--period", required=True, choices=PERIODS)
    p.add_argument("--soft", action="store_true", help="counted and alerted on, never refusing")
    p.add_argument("--alert-at", help="alert thresholds, percent of the limit, e.g. 50,90,100")
    p.add_argument(
        "--timezone",
        help="IANA zone whose midnights begin its windows, e.g. America/Los_Angeles "
        "(default: as the budget has it, or GATEWAY_TIMEZONE for a new one)",
    )
    p.add_argument("--week-starts", help="weekly windows begin on this day (default: GATEWAY_WEEK_STARTS)")
    p.add_argument(
        "--month-starts-on", help="monthly windows begin on this day of the month, 1-28 (default 1)"
    )
    p = budgets.add_parser("delete", parents=both, help="delete a budget")
    p.add_argument("scope", choices=budgeting.SCOPES)
    p.add_argument("subject")
    p.add_argument("--period", required=True, choices=PERIODS)
    p = budgets.add_parser("list", parents=both, help="budgets with spent, held, remaining")
    p.add_argument("--scope", choices=budgeting.SCOPES)
    p.add_argument("--subject")
    p.add_argument("--expand", action="store_true", help="also the end users' budgets made from defaults")

    p = sub.add_parser("report", parents=both, help="billing report of charged requests")
    p.set_defaults(action=None)
    p.add_argument(
        "--from", dest="start", help="ISO date or datetime (in --timezone unless it says), inclusive"
    )
    p.add_argument("--to", dest="end", help="ISO date or datetime (in --timezone unless it says), exclusive")
    p.add_argument("--group-by", default="", help=f"comma-separated: {','.join(reports.GROUPS)}")
    p.add_argument("--timezone", help="the IANA zone of days and months (default: GATEWAY_TIMEZONE)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    books = sub.add_parser("ledger", help="the ledger").add_subparsers(dest="action", required=True)
    p = books.add_parser("list", parents=both, help="ledger rows, oldest first, one page")
    for name in ("user", "team", "key", "model", "outcome", "limit", "cursor"):
        p.add_argument(f"--{name}")
    p.add_argument("--end-user", help="only rows of this end user")
    p.add_argument("--tag", help="only rows with this tag")
    _range_options(p)
    books.add_parser("verify", parents=both, help="check budget counters against the ledger")
    p = books.add_parser("adjust", parents=both, help="correct a request's charge (negative refunds)")
    p.add_argument("request_id")
    p.add_argument("credits", help="signed credits, e.g. -0.05 to refund")
    p.add_argument("--reason", required=True, help="why (kept in the ledger and the audit log)")

    log = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    p = log.add_parser("list", parents=both, help="administrative changes, oldest first, one page")
    p.add_argument("--action", dest="action_filter", help="only this action, e.g. key.block")
    for name in ("limit", "cursor"):
        p.add_argument(f"--{name}")
    _range_options(p)


def _models_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--models", help="comma-separated models allowed (each must be priced)")
    group.add_argument("--all-models", action="store_true", help="clear the list: every priced model")


def _expiry_options(p: argparse.ArgumentParser, *, clearable: bool = False) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--expires", metavar="ISO", help="when the key stops working, e.g. 2027-01-31T18:00Z")
    group.add_argument("--ttl", help="how long the key works from now, e.g. 30d, 12h")
    if clearable:
        group.add_argument("--no-expiry", action="store_true", help="the key never expires")


def _range_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="start", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="end", help="ISO date or datetime (UTC), exclusive")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one administration command; its exit code."""
    # A database problem is told in one line by main(); the store's own warning would repeat it.
    logging.getLogger("gateway.store").setLevel(logging.ERROR)
    store = open_store(settings.database_url, pool_size=2)
    try:
        work, show = cli_alerts.action(args, settings) or cli_limits.action(args) or _action(settings, args)
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


def _models(args: argparse.Namespace, settings: Settings) -> Any:
    """The allow-list asked for: a list, None (--all-models), or ... when not asked."""
    if getattr(args, "all_models", False):
        return None
    if args.models is None:
        return ...
    names = [part.strip() for part in args.models.split(",") if part.strip()]
    return access.parse_models(names, settings.pricing.models(), "--models")


def _expiry(args: argparse.Namespace, at: int) -> Any:
    """The expiry asked for: microseconds, None (--no-expiry), or ... when not asked."""
    if getattr(args, "no_expiry", False):
        return None
    if args.expires is None and args.ttl is None:
        return ...
    return access.parse_expiry(args.expires, args.ttl, at, field="expires")


def _action(
    settings: Settings, args: argparse.Namespace
) -> tuple[Callable[[Any], Any], Callable[[Any], str]]:
    """The unit of work for an admin command, and how to show its result to a person."""
    at = now_us()
    who = audit.cli_actor()
    command = (args.command, args.action)
    if command == ("teams", "create"):
        return (
            lambda c: services.create_team(c, args.name, at, actor=who)
        ), lambda r: f"created team {r['name']}"
    if command == ("teams", "list"):
        return services.list_teams, lambda rows: _table(rows, ["name", "models", "created_at"])
    if command in (("teams", "set"), ("users", "set")):
        kind, models = args.command[:-1], _models(args, settings)
        return (
            (lambda c: access.set_models(c, kind, args.name, models, at, actor=who)),
            lambda r: (
                f"{kind} {r['name']} may use " + (", ".join(r["models"]) if r["models"] else "every model")
            ),
        )
    if command == ("users", "create"):
        return (
            lambda c: services.create_user(c, args.name, args.team, at, actor=who)
        ), lambda r: f"created user {r['name']}" + (f" in team {r['team']}" if r["team"] else "")
    if command == ("users", "list"):
        return services.list_users, lambda rows: _table(rows, ["name", "team", "models", "created_at"])
    if command[0] == "keys":
        return _key_action(settings, args, at, who)
    if command == ("budgets", "set"):
        return (
            (
                lambda c: budgeting.set_budget(
                    c,
                    args.scope,
                    args.subject,
                    args.period,
                    args.limit,
                    at,
                    actor=who,
                    enforce=not args.soft,
                    alert_at=args.alert_at,
                    timezone=args.timezone,
                    week_starts=args.week_starts,
                    month_starts_on=args.month_starts_on,
                    rule_defaults=settings.window_rule,
                )
            ),
            lambda r: (
                f"{r['period']} {r['scope']} budget of {r['subject']}: limit {r['limit']}, "
                f"spent {r['spent']}, remaining {r['remaining']}"
            ),
        )
    if command == ("budgets", "delete"):
        return (
            lambda c: budgeting.delete_budget(c, args.scope, args.subject, args.period, at, actor=who)
        ), lambda _: f"deleted the {args.period} {args.scope} budget of {args.subject}"
    if command == ("budgets", "list"):
        columns = [
            "scope",
            "subject",
            "period",
            "limit",
            "spent",
            "held",
            "remaining",
            "resets_at",
            "timezone",
        ]
        return (
            lambda c: budgeting.list_budgets(c, args.scope, args.subject, expand=args.expand)
        ), lambda rows: _table(
            [{**r, "alert_at": ",".join(map(str, r["alert_at"]))} for r in rows],
            [*columns, "enforce", "alert_at", *(["from_default"] if args.expand else [])],
        )
    if command == ("report", None):
        report = reports.parse_query(args.start, args.end, args.group_by, args.timezone or settings.timezone)
        if args.format == "json":
            args.json = True
        if args.json:
            return (lambda c: reports.usage_report(c, report).json()), str
        if args.format == "csv":
            return (lambda c: reports.usage_report(c, report)), lambda r: r.csv("\n").rstrip("\n")
        return (lambda c: reports.usage_report(c, report)), lambda r: _table(r.table(), r.columns())
    if command == ("ledger", "list"):
        page = ledger.parse_query(
            **{
                k: getattr(args, k)
                for k in ("user", "team", "key", "model", "outcome", "end_user", "tag", "limit", "cursor")
            },
            start=args.start,
            end=args.end,
        )
        return (lambda c: ledger.list_entries(c, page)), _ledger_page
    if command == ("ledger", "verify"):
        return ledger.verify, ledger.describe
    if command == ("ledger", "adjust"):
        return (
            (lambda c: adjustments.adjust(c, args.request_id, args.credits, args.reason, at, actor=who)),
            lambda r: (
                f"adjusted request {r['request_id']} by {r['credits']} credits (now {r['total']}) "
                f"in {r['windows']} budget window(s)"
            ),
        )
    if command == ("audit", "list"):
        query = audit.parse_query(
            action=args.action_filter, start=args.start, end=args.end, limit=args.limit, cursor=args.cursor
        )
        return (lambda c: audit.list_entries(c, query)), _audit_page
    raise AssertionError(f"unhandled command {command}")


def _key_action(
    settings: Settings, args: argparse.Namespace, at: int, who: str
) -> tuple[Callable[[Any], Any], Callable[[Any], str]]:
    action = args.action
    if action == "create":
        expires, models = _expiry(args, at), _models(args, settings)
        expires = None if expires is ... else expires
        models = None if models is ... else models
        return (
            (
                lambda c: services.create_key(
                    c, args.user, args.name, at, expires_at=expires, models=models, actor=who
                )
            ),
            lambda r: (
                f"created key {r['id']} for {r['user']}\n{r['key']}\n"
                "(this secret is shown only now: store it safely)"
            ),
        )
    if action == "list":
        return (lambda c: services.list_keys(c, args.user)), lambda rows: _table(rows, KEY_COLUMNS)
    if action == "revoke":
        return (lambda c: services.revoke_key(c, args.id, at, actor=who)), lambda _: f"revoked key {args.id}"
    if action == "set":
        changes = {"models": _models(args, settings), "expires_at": _expiry(args, at)}
        if args.name is not None:
            changes["name"] = args.name
        changes = {name: value for name, value in changes.items() if value is not ...}
        return (lambda c: access.set_key(c, args.id, at, actor=who, **changes)), lambda r: _table(
            [r], KEY_COLUMNS
        )
    if action in ("block", "unblock"):
        fn = access.block_key if action == "block" else access.unblock_key
        return (lambda c: fn(c, args.id, at, actor=who)), lambda _: f"{action}ed key {args.id}"
    if action == "rotate":
        grace = access.parse_duration("grace", args.grace, allow_zero=True)
        return (
            (lambda c: access.rotate_key(c, args.id, grace, at, actor=who)),
            lambda r: (
                f"rotated key {args.id} to {r['id']} (the old key works for {args.grace} more)\n{r['key']}\n"
                "(this secret is shown only now: store it safely)"
            ),
        )
    raise AssertionError(f"unhandled command keys {action}")


def _ledger_page(page: dict[str, Any]) -> str:
    columns = ["request_id", "admitted_at", "team", "user", "end_user", "tags", "model", "credits", "outcome"]
    more = f"\nnext page: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
    return _table(page["entries"], columns) + more


def _audit_page(page: dict[str, Any]) -> str:
    columns = ["at", "actor", "action", "target"]
    more = f"\nnext page: --cursor {page['next_cursor']}" if page["next_cursor"] else ""
    return _table(page["entries"], columns) + more


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table for a terminal."""
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
