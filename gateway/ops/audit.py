"""The audit log: every administrative change, by the HTTP API or the CLI, and who made it.

`record` appends one row in the transaction of the change it describes, so a change and its row are
committed together or not at all. Rows are never edited or deleted (no function here or elsewhere
does). `before` and `after` are the changed object as the admin API shows it, never with a secret.
Listing is ordered by (at, id) and paginated with the ledger's opaque keyset cursor.
"""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.windows import iso_us
from gateway.errors import InvalidRequest
from gateway.ops import ledger
from gateway.ops.reports import parse_range, range_clause

# Fields that must never reach the log, whatever a caller passes.
SECRET_FIELDS = frozenset({"key", "key_hash", "secret"})
MAX_ACTION = 64

_INSERT = text(
    "INSERT INTO audit_log (at, actor, action, target, before, after) "
    "VALUES (:at, :actor, :action, :target, :before, :after)"
)


def cli_actor() -> str:
    """`cli` and the OS user running the command."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"cli {user}"


def api_actor(address: str | None) -> str:
    """`admin-api` and the client's address."""
    return f"admin-api {address or 'unknown'}"


def apply_actor(sha256: str, via: str) -> str:
    """`apply`, the applied file's sha256, and who applied it (`cli ...` or `admin-api ...`)."""
    return f"apply sha256:{sha256} ({via})"


def console_actor(address: str | None) -> str:
    """`console` (the web console at /ui/) and the client's address."""
    return f"console {address or 'unknown'}"


def _dump(state: dict[str, Any] | None) -> str | None:
    if state is None:
        return None
    clean = {name: value for name, value in state.items() if name not in SECRET_FIELDS}
    return json.dumps(clean, sort_keys=True, default=str)


def record(
    conn: Connection,
    at: int,
    actor: str,
    action: str,
    target: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """Append one row, in the caller's transaction."""
    conn.execute(
        _INSERT,
        {
            "at": at,
            "actor": actor[:300],
            "action": action,
            "target": target[:300],
            "before": _dump(before),
            "after": _dump(after),
        },
    )


@dataclass(frozen=True)
class AuditQuery:
    """Validated filters of an audit listing; `after` is the decoded cursor (at, id)."""

    action: str | None = None
    start: int | None = None
    end: int | None = None
    limit: int = 100
    after: tuple[int, int] | None = None


def parse_query(
    *,
    action: str | None = None,
    start: str | None = None,
    end: str | None = None,
    limit: str | int | None = None,
    cursor: str | None = None,
) -> AuditQuery:
    """Validate a listing's filters (strings from a query string or the command line)."""
    if action is not None and (not action or len(action) > MAX_ACTION or not action.isprintable()):
        raise InvalidRequest(
            f"`action` must be 1-{MAX_ACTION} printable characters, e.g. key.create.", field="action"
        )
    lo, hi = parse_range(start, end)
    after = None
    if cursor is not None:
        at, row_id = ledger.decode_cursor(cursor)
        if not row_id.isdigit():
            raise InvalidRequest("`cursor` is not a cursor this gateway gave out.", field="cursor")
        after = (at, int(row_id))
    return AuditQuery(action, lo, hi, ledger.parse_limit(limit), after)


def list_entries(conn: Connection, query: AuditQuery) -> dict[str, Any]:
    """One page of audit rows, oldest first: {"entries": [...], "next_cursor": "..." | null}."""
    where, params = range_clause(query.start, query.end, "at")
    clauses: list[str] = [where] if where else []
    values: dict[str, Any] = dict(params)
    if query.action is not None:
        clauses.append("action = :action")
        values["action"] = query.action
    if query.after is not None:
        clauses.append("(at > :after_at OR (at = :after_at AND id > :after_id))")
        values["after_at"], values["after_id"] = query.after
    sql = "SELECT id, at, actor, action, target, before, after FROM audit_log"
    sql += (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY at, id LIMIT :limit"
    values["limit"] = query.limit + 1
    rows = conn.execute(text(sql), values).all()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    entries = [
        {
            "id": r[0],
            "at": iso_us(r[1]),
            "actor": r[2],
            "action": r[3],
            "target": r[4],
            "before": None if r[5] is None else json.loads(r[5]),
            "after": None if r[6] is None else json.loads(r[6]),
        }
        for r in rows
    ]
    last = rows[-1] if more and rows else None
    return {"entries": entries, "next_cursor": ledger.encode_cursor(last[1], str(last[0])) if last else None}
