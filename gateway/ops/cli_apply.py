"""`gateway apply FILE [--plan] [--prune]` and `gateway export`: the organisation as code (see `apply`)."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any

from gateway.core.metering import now_us
from gateway.jsonout import dumps
from gateway.ops import apply, audit, orgfile
from gateway.ops.settings import Settings
from gateway.store import open_store

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
    """The file's name (for messages) and text."""
    if path == "-":
        return "<stdin>", sys.stdin.read()
    with open(path, encoding="utf-8") as handle:
        return path, handle.read()


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
            exported = await store.read(apply.export, at)
        elif args.plan:
            changes = await store.read(apply.plan, org, settings.pricing.models(), at, args.prune)
            outcome = apply.result(org, changes, applied=False, prune=args.prune)
        else:
            work = functools.partial(apply.apply, prune=args.prune, actor=audit.cli_actor())
            outcome = await store.run(work, org, settings.pricing.models(), at)
    finally:
        await store.close()
    if args.command == "export":
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(exported)
        else:
            sys.stdout.write(exported)
        return 0
    print(dumps(outcome, indent=2) if args.json else apply.describe(outcome))
    return CHANGES if args.plan and outcome["changes"] else 0
