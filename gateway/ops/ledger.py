"""The ledger read back: paginated listing, and verification of every budget counter against it.

Listing is ordered by (admitted_at, request_id) and paginated with an opaque keyset cursor, so a
page never repeats or skips a row that was there when the first page was read. A row is written
when its request settles, up to the hold TTL after it was admitted, so a walk of the most recent
minutes may miss rows that settle behind the cursor: for a complete export, end `to` at least the
hold TTL before now.

Verification recomputes each budget window from what the ledger and the open holds say: `spent` is
what the ledger rows of the requests counted in the window were charged (outcome `charged`) plus
their adjustments (gateway/ops/adjustments.py), `held` the allocations of requests still held.
It reads everything in one statement, so on PostgreSQL it sees one snapshot even under traffic.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import from_key, iso_us, isoformat
from gateway.errors import InvalidRequest, NotFound
from gateway.ops import (  # services: the module: services -> audit -> ledger -> services is a cycle
    services,
    subjects,
)
from gateway.ops.reports import parse_range, range_clause
from gateway.web.attribution import MAX_END_USER

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
OUTCOMES = ("charged", "upstream_error", "upstream_unavailable", "upstream_timeout", "expired")


@dataclass(frozen=True)
class LedgerQuery:
    """Validated filters of a ledger listing; `after` is the decoded cursor."""

    user: str | None = None
    team: str | None = None
    key: str | None = None
    model: str | None = None
    outcome: str | None = None
    end_user: str | None = None
    tag: str | None = None
    start: int | None = None
    end: int | None = None
    limit: int = DEFAULT_LIMIT
    after: tuple[int, str] | None = None


def parse_query(
    *,
    user: str | None = None,
    team: str | None = None,
    key: str | None = None,
    model: str | None = None,
    outcome: str | None = None,
    end_user: str | None = None,
    tag: str | None = None,
    start: str | None = None,
    end: str | None = None,
    limit: str | int | None = None,
    cursor: str | None = None,
) -> LedgerQuery:
    """Validate a listing's filters (as strings from a query string or the command line)."""
    lo, hi = parse_range(start, end)
    return LedgerQuery(
        user=None if user is None else services.check_name("user", user),
        team=None if team is None else services.check_name("team", team),
        key=None if key is None else services.check_name("key", key),
        model=None if model is None else services.check_name("model", model),
        outcome=None if outcome is None else services.check_choice("outcome", outcome, OUTCOMES),
        end_user=None if end_user is None else _checked("end_user", end_user, MAX_END_USER),
        tag=None if tag is None else _checked("tag", tag, 64),
        start=lo,
        end=hi,
        limit=parse_limit(limit),
        after=None if cursor is None else decode_cursor(cursor),
    )


def _checked(field: str, value: str, longest: int) -> str:
    if not 1 <= len(value) <= longest:
        raise InvalidRequest(f"`{field}` must be 1 to {longest} characters long.", field=field)
    return value


def parse_limit(value: str | int | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"`limit` must be a whole number from 1 to {MAX_LIMIT}.", field="limit")
    return limit


def encode_cursor(admitted_at: int, request_id: str) -> str:
    """The opaque cursor after a row."""
    raw = json.dumps([admitted_at, request_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The (admitted_at, request_id) a cursor points after; InvalidRequest if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        admitted_at, request_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        admitted_at = request_id = None
    if (
        type(admitted_at) is not int
        or not -(2**63) < admitted_at < 2**63
        or not isinstance(request_id, str)
        or not (len(request_id) <= 32 and request_id.isascii() and request_id.isprintable())
    ):
        raise InvalidRequest("`cursor` is not a cursor this gateway gave out.", field="cursor")
    return admitted_at, request_id


_ENTRIES = (
    "SELECT l.request_id, l.admitted_at, l.settled_at, t.name, u.name, l.key_id, l.model, "
    "l.message_count, l.unit_price_micros, l.credits_micros, l.outcome, l.upstream_status, "
    "l.prompt_tokens, l.completion_tokens, l.total_tokens, l.stream, l.duration_us, l.end_user, l.tags, "
    "(SELECT SUM(x.credits_micros) FROM ledger_adjustments x WHERE x.request_id = l.request_id) "
    "FROM ledger l JOIN users u ON u.id = l.user_id LEFT JOIN teams t ON t.id = l.team_id"
)


def list_entries(conn: Connection, query: LedgerQuery) -> dict[str, Any]:
    """One page of ledger rows: {"entries": [...], "next_cursor": "..." | null}."""
    where, params = range_clause(query.start, query.end, "l.admitted_at")
    clauses: list[str] = [where] if where else []
    values: dict[str, Any] = dict(params)
    if query.user is not None:
        clauses.append("l.user_id = :user")
        values["user"] = _id_of(conn, "users", "user", query.user)
    if query.team is not None:
        clauses.append("l.team_id = :team")
        values["team"] = _id_of(conn, "teams", "team", query.team)
    for column, name, value in (
        ("key_id", "key", query.key),
        ("model", "model", query.model),
        ("outcome", "outcome", query.outcome),
        ("end_user", "end_user", query.end_user),
    ):
        if value is not None:
            clauses.append(f"l.{column} = :{name}")
            values[name] = value
    if query.tag is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM ledger_tags lt WHERE lt.request_id = l.request_id AND lt.tag = :tag)"
        )
        values["tag"] = query.tag
    if query.after is not None:
        clauses.append("(l.admitted_at, l.request_id) > (:after_at, :after_id)")
        values["after_at"], values["after_id"] = query.after
    sql = _ENTRIES + (" WHERE " + " AND ".join(clauses) if clauses else "")
    sql += " ORDER BY l.admitted_at, l.request_id LIMIT :limit"
    values["limit"] = query.limit + 1
    rows = conn.execute(text(sql), values).all()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    entries = [_entry_json(r) for r in rows]
    last = rows[-1] if rows else None
    return {"entries": entries, "next_cursor": encode_cursor(last[1], last[0]) if more and last else None}


def _entry_json(r: Any) -> dict[str, Any]:
    """A ledger row as the admin API shows it."""
    return {
        "request_id": r[0],
        "admitted_at": iso_us(r[1]),
        "settled_at": iso_us(r[2]),
        "team": r[3],
        "user": r[4],
        "key_id": r[5],
        "model": r[6],
        "message_count": r[7],
        "unit_price": credits_json(r[8]),
        "credits": credits_json(r[9]),
        "outcome": r[10],
        "upstream_status": r[11],
        "prompt_tokens": r[12],
        "completion_tokens": r[13],
        "total_tokens": r[14],
        "stream": bool(r[15]),
        "duration_ms": r[16] / 1000,
        "end_user": r[17],
        "tags": r[18].split(",") if r[18] else [],
        # Corrections of `credits` (signed; see `gateway ledger adjust`), 0 for none.
        "adjustments": credits_json(int(r[19] or 0)),
    }


def entry(conn: Connection, request_id: str) -> dict[str, Any]:
    """One ledger row by its request id; NotFound if there is none."""
    row = conn.execute(text(_ENTRIES + " WHERE l.request_id = :r"), {"r": request_id}).first()
    if row is None:
        raise NotFound(f"No ledger row has request id {request_id[:40]!r}.", field="request_id")
    return _entry_json(row)


def _id_of(conn: Connection, table: str, field: str, name: str) -> int:
    row = conn.execute(text(f"SELECT id FROM {table} WHERE name = :name"), {"name": name}).first()
    if row is None:
        raise NotFound(f"No {field} named {name!r}.", field=field)
    return int(row[0])


# Expected spent and held of every budget window that has allocations, beside its counter (if any),
# and every counter without allocations: one statement, one snapshot. Allocations of deleted budgets
# are left out (budget ids are never reused: AUTOINCREMENT on SQLite, a sequence on PostgreSQL).
_VERIFY = """
WITH expected AS (
    SELECT a.budget_id, a.window_start,
           COALESCE(SUM(CASE WHEN l.outcome = 'charged' THEN l.credits_micros END), 0)
               + COALESCE(SUM(adj.credits), 0) AS spent,
           COALESCE(SUM(CASE WHEN h.request_id IS NOT NULL THEN a.credits_micros END), 0) AS held,
           COUNT(*) AS requests
    FROM allocations a
    JOIN budgets b ON b.id = a.budget_id
    LEFT JOIN ledger l ON l.request_id = a.request_id
    LEFT JOIN holds h ON h.request_id = a.request_id
    LEFT JOIN (SELECT request_id, SUM(credits_micros) AS credits FROM ledger_adjustments
               GROUP BY request_id) adj ON adj.request_id = a.request_id
    GROUP BY a.budget_id, a.window_start
)
SELECT c.budget_id, c.window_start, c.spent_micros, c.held_micros,
       COALESCE(e.spent, 0), COALESCE(e.held, 0), COALESCE(e.requests, 0)
FROM budget_counters c
LEFT JOIN expected e ON e.budget_id = c.budget_id AND e.window_start = c.window_start
UNION ALL
SELECT e.budget_id, e.window_start, NULL, NULL, e.spent, e.held, e.requests
FROM expected e
WHERE NOT EXISTS (
    SELECT 1 FROM budget_counters c WHERE c.budget_id = e.budget_id AND c.window_start = e.window_start
)
ORDER BY 1, 2
"""

_BUDGET_NAMES = (
    f"SELECT b.id, b.scope, b.period, {subjects.SUBJECT_NAME} FROM budgets b {subjects.SUBJECT_JOINS}"
)


def verify(conn: Connection) -> dict[str, Any]:
    """Compare every budget window's counter with the ledger and open holds.

    Returns {"ok", "windows", "allocations", "differences": [...]}; each difference names the budget
    and window and gives the counter's (null when the row is missing) and the recomputed spent and held.
    """
    names = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(text(_BUDGET_NAMES)).all()}
    differences = []
    windows = allocations = 0
    for budget_id, window, spent, held, want_spent, want_held, count in conn.execute(text(_VERIFY)).all():
        windows += 1
        allocations += int(count)
        counter = None if spent is None else (int(spent), int(held))
        if counter == (int(want_spent), int(want_held)):
            continue
        scope, period, subject = names.get(budget_id, ("?", "?", "?"))
        differences.append(
            {
                "budget_id": budget_id,
                "scope": scope,
                "subject": subject,
                "period": period,
                "window_start": isoformat(from_key(int(window))),
                "counter": None
                if counter is None
                else {"spent": credits_json(counter[0]), "held": credits_json(counter[1])},
                "ledger": {"spent": credits_json(int(want_spent)), "held": credits_json(int(want_held))},
            }
        )
    return {"ok": not differences, "windows": windows, "allocations": allocations, "differences": differences}


def describe(result: dict[str, Any]) -> str:
    """Verification's result for a person: one line per difference, then a summary."""
    lines = []
    for d in result["differences"]:
        counter = d["counter"]
        shown = (
            "no counter row"
            if counter is None
            else f"spent {_c(counter['spent'])}, held {_c(counter['held'])}"
        )
        lines.append(
            f"DIFFERENCE {d['period']} {d['scope']} budget of {d['subject']} (id {d['budget_id']}), window "
            f"{d['window_start']}: counter {shown}; ledger says spent {_c(d['ledger']['spent'])}, "
            f"held {_c(d['ledger']['held'])}"
        )
    verdict = (
        "every counter matches the ledger"
        if result["ok"]
        else f"{len(result['differences'])} window(s) differ from the ledger"
    )
    lines.append(
        f"checked {result['windows']} budget window(s), {result['allocations']} allocation(s): {verdict}"
    )
    return "\n".join(lines)


def _c(value: int | float) -> str:
    return format_credits(round(value * 1_000_000))
