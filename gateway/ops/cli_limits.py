"""The limit commands of `gateway`: `limits set`, `limits list`, `limits delete` (see gateway/ops/cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway.core.metering import now_us
from gateway.core.ratelimits import KINDS, PERIODS
from gateway.ops import audit, limiting


def add_parsers(sub: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """`gateway limits set|list|delete`."""
    both = [common, as_json]
    limits = sub.add_parser("limits", help="rate and concurrency limits").add_subparsers(
        dest="action", required=True
    )
    p = limits.add_parser("set", parents=both, help="create a limit or change its number")
    p.add_argument("scope", choices=limiting.SCOPES)
    p.add_argument("subject", help="team or user name, key id, USER/END_USER or USER/*")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("limit", help="requests, credits, or requests in flight (concurrent)")
    p.add_argument(
        "--per", choices=tuple(PERIODS), help="the rate's period (default minute; none for concurrent)"
    )
    p = limits.add_parser("list", parents=both, help="list limits")
    p.add_argument("--scope", choices=limiting.SCOPES)
    p.add_argument("--subject")
    limits.add_parser("delete", parents=both, help="delete a limit").add_argument("id")


def action(args: argparse.Namespace) -> tuple[Callable[[Any], Any], Callable[[Any], str]] | None:
    """The unit of work and its display for a `limits` command; None for other commands."""
    if args.command != "limits":
        return None
    at = now_us()
    who = audit.cli_actor()
    if args.action == "set":
        return (
            lambda c: limiting.set_limit(
                c, args.scope, args.subject, args.kind, args.limit, args.per, at, actor=who
            )
        ), lambda r: f"limit {r['id']}: {describe(r)}"
    if args.action == "delete":
        work = lambda c: limiting.delete_limit(c, args.id, at, actor=who)  # noqa: E731
        return work, lambda _: f"deleted limit {args.id}"
    return (lambda c: limiting.list_limits(c, args.scope, args.subject)), _list


def describe(limit: dict[str, Any]) -> str:
    """One limit in words: "key key_ab12: 10 requests per minute"."""
    whose = f"{limit['scope']} {limit['subject']}"
    if limit["kind"] == "concurrent":
        return f"{whose}: {limit['limit']} requests in flight"
    return f"{whose}: {limit['limit']} {limit['kind']} per {limit['per']}"


def _list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    return "\n".join(f"{r['id']:>6}  {describe(r)}" for r in rows)
