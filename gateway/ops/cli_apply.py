"""`gateway apply FILE [--plan] [--prune]` and `gateway export`: the organisation as code (see `apply`)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any

from gateway.core.metering import now_us
from gateway.jsonout import dumps
from gateway.ops import apply, audit, orgfile, orgstate
from gateway.ops.settings import Settings
from gateway.store import open_store

SIGN = {"create": "+", "change": "~", "delete": "-", "revoke": "-"}
# `apply --plan`'s exit code when the file would change something (for CI).
CHANGES = 2


def add_parsers(sub: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """`gateway apply` and `gateway export`."""
    p = sub.add_parser(
        "apply", parents=[common, as_json], help="make the organisation match a file (teams, users, ...)"
    )
    p.add_argument("file", help="the organisation file (TOML); - reads standard input")
    p.add_argument("--plan", action="store_true", help="show the changes, make none (exit 2 if any)")
    p.add_argument("--prune", action="store_true", help="also delete budgets and revoke keys not in the file")
    p = sub.add_parser("export", parents=[common], help="write the organisation as an apply file")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")


def _read(path: str) -> tuple[str, str]:
    """The file's name (for messages) and text, read as bytes: its sha256 is `sha256sum`'s."""
    if path == "-":
        return "<stdin>", sys.stdin.buffer.read().decode("utf-8")
    with open(path, "rb") as handle:
        return path, handle.read().decode("utf-8")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run `apply` or `export`; the exit code."""
    logging.getLogger("gateway.store").setLevel(logging.ERROR)
    at = now_us()
    if args.command == "apply":
        try:
            name, source = _read(args.file)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"gateway: cannot read {args.file}: {exc}", file=sys.stderr)
            return 1
        org = orgfile.parse(source, settings.pricing.models(), name)
    store = open_store(settings.database_url, pool_size=2)
    try:
        if args.command == "export":
            exported = await store.read(orgstate.export, at)
        elif args.plan:
            outcome = await store.read(apply.planned, org, at, args.prune)
        else:
            work = functools.partial(
                apply.apply, prune=args.prune, actor=audit.cli_actor(), rule_defaults=settings.window_rule
            )
            outcome = await store.run(work, org, at)
    finally:
        await store.close()
    if args.command == "export":
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(exported)
        else:
            sys.stdout.write(exported)
        return 0
    print(dumps(outcome, indent=2) if args.json else describe(outcome))
    return CHANGES if args.plan and outcome["changes"] else 0


def describe(outcome: dict[str, Any]) -> str:
    """A plan or an apply as a person reads it: one line a change (+ create, ~ change, - delete)."""
    lines = []
    for change in outcome["changes"]:
        before, after = change["before"] or {}, change["after"] or {}
        if change["action"] == "create":
            detail = ", ".join(f"{k}={_shown(k, v)}" for k, v in after.items() if v not in (None, False))
        elif change["action"] == "change":
            detail = ", ".join(f"{k}: {_shown(k, before.get(k))} -> {_shown(k, v)}" for k, v in after.items())
        else:
            detail = ", ".join(f"{k}={_shown(k, v)}" for k, v in before.items())
            detail += " (revoked, not deleted)" if change["action"] == "revoke" else ""
        at = f"  [line {change['line']}]" if change["line"] else ""
        lines.append(
            f"{SIGN[change['action']]} {change['action']} {change['target']}  {detail}".rstrip() + at
        )
    counts = outcome["summary"]
    if not lines:
        return f"No changes: the organisation matches {outcome['file']}."
    if outcome["applied"]:
        lines.append(
            f"Applied: {counts['create']} created, {counts['change']} changed, {counts['delete']} deleted."
        )
    else:
        lines.append(
            f"Plan: {counts['create']} to create, {counts['change']} to change, {counts['delete']} to delete."
        )
    for key in outcome["created_keys"]:
        lines.append(f"created key {key['user']}/{key['name']} {key['id']}: {key['key']}")
    if outcome["created_keys"]:
        lines.append("(these secrets are shown only now: store them safely)")
    return "\n".join(lines)


def _shown(name: str, value: Any) -> str:
    if name == "models":
        return "every model" if value is None else ",".join(value)
    if name == "expires_at":
        return "never" if value is None else str(value)
    if name == "alert_at":
        return "default" if value is None else ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
