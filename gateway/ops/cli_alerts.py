"""The alert commands of `gateway`: `events list` and `webhooks test` (see gateway/ops/cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway.jsonout import dumps
from gateway.ops import events, webhooks
from gateway.ops.settings import Settings


def add_parsers(sub: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    """`gateway events list` and `gateway webhooks test`."""
    found = sub.add_parser("events", help="alert events").add_subparsers(dest="action", required=True)
    p = found.add_parser(
        "list", parents=[common, as_json], help="alert events with their delivery state, oldest first"
    )
    p.add_argument("--type", choices=events.TYPES)
    p.add_argument("--from", dest="start", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="end", help="ISO date or datetime (UTC), exclusive")
    p.add_argument("--limit")
    p.add_argument("--cursor")
    hooks = sub.add_parser("webhooks", help="webhooks").add_subparsers(dest="action", required=True)
    hooks.add_parser(
        "test", parents=[common, as_json], help="send a webhook.test event to every configured webhook"
    )


def action(
    args: argparse.Namespace, settings: Settings
) -> tuple[Callable[[Any], Any], Callable[[Any], str]] | None:
    """The unit of work and its display for `events list`; None for other commands."""
    if (args.command, args.action) != ("events", "list"):
        return None
    query = events.parse_query(
        type=args.type, start=args.start, end=args.end, limit=args.limit, cursor=args.cursor
    )
    names = webhooks.endpoint_names(settings.webhooks)
    return (lambda c: events.list_events(c, query, names)), _page


def _page(page: dict[str, Any]) -> str:
    if not page["events"]:
        return "(none)"
    lines = []
    for e in page["events"]:
        error = f"; last error: {e['last_error']}" if e["last_error"] else ""
        lines.append(
            f"{e['created_at']}  {e['id']}  {e['state']} after {e['attempts']} attempt(s){error}\n"
            f"    {events.sentence(e)}"
        )
    if page["next_cursor"]:
        lines.append(f"next page: --cursor {page['next_cursor']}")
    return "\n".join(lines)


async def test_webhooks(settings: Settings, args: argparse.Namespace) -> int:
    """`gateway webhooks test`: 0 if every webhook answered 2xx, 1 otherwise (or none is configured)."""
    if not settings.webhooks:
        print("gateway: no webhook is configured (GATEWAY_WEBHOOK_URL or [[webhooks]] in the config file)")
        return 1
    async with webhooks.new_session() as session:
        results = await webhooks.send_test(session, settings.webhooks, settings.webhook_timeout_seconds)
    if args.json:
        print(dumps(results, indent=2))
    else:
        for r in results:
            answer = f"answered {r['status']}" if r["status"] is not None else "did not answer"
            verdict = "ok" if r["ok"] else f"FAILED ({r['error']})"
            print(f"{r['endpoint']} ({r['format']}): {answer} in {r['duration_ms']} ms: {verdict}")
    return 0 if all(r["ok"] for r in results) else 1
