"""Ledger adjustments: corrections of a request's charge, appended, never edited (contract §11).

An adjustment is a signed amount of micro-credits (negative refunds) linked to a ledger row. In the
one transaction that appends it, it moves `spent` of every budget window the request was counted
in (its allocations, whatever its outcome) by the same amount, in the lock order admissions use, and
is audited as `ledger.adjust`. A request's total (its charge plus its adjustments) never goes below
zero: the ledger row is locked first (PostgreSQL: `FOR UPDATE`; SQLite: the write lock), so two
refunds of the same request cannot both pass the check. Reports count adjustments in the groups of
the adjusted row (gateway/ops/reports.py) and `ledger verify` adds them to the spending it expects.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.pricing import credits_json, format_credits, parse_credits
from gateway.core.settlement import record_crossings
from gateway.core.windows import iso_us
from gateway.errors import InvalidRequest, NotFound
from gateway.ops import audit
from gateway.store import sql_of

MAX_REASON = 500

_ROW = "SELECT credits_micros, outcome FROM ledger WHERE request_id = :r"
_ADJUSTED = "SELECT COALESCE(SUM(credits_micros), 0) FROM ledger_adjustments WHERE request_id = :r"
# The request's budget windows, in the order counters are locked everywhere (key, user, team).
_WINDOWS = (
    "SELECT a.budget_id, a.window_start FROM allocations a JOIN budgets b ON b.id = a.budget_id "
    "WHERE a.request_id = :r ORDER BY CASE b.scope WHEN 'key' THEN 0 WHEN 'user' THEN 1 ELSE 2 END, "
    "a.budget_id, a.window_start"
)
_MOVE = (
    "UPDATE budget_counters SET spent_micros = spent_micros + :delta "
    "WHERE budget_id = :budget AND window_start = :window"
)
_INSERT = (
    "INSERT INTO ledger_adjustments (request_id, credits_micros, reason, created_at, actor) "
    "VALUES (:r, :delta, :reason, :at, :actor)"
)


def parse_amount(value: object) -> int:
    """A signed amount of credits (number or decimal string, not zero) as micro-credits."""
    shown = str(value).strip() if isinstance(value, int | float | str | Decimal) else None
    if isinstance(value, bool) or shown is None:
        raise InvalidRequest(
            "`credits` must be a number of credits, e.g. -0.05 to refund or 0.05 to charge more.",
            field="credits",
        )
    negative = shown.startswith("-")
    try:
        micros = parse_credits(shown[1:] if negative else shown, allow_zero=False)
    except ValueError as exc:
        raise InvalidRequest(
            f"`credits` must be a signed number of credits, not zero, e.g. -0.05 to refund: {exc}.",
            field="credits",
        ) from None
    return -micros if negative else micros


def check_reason(value: object) -> str:
    """Why: 1-500 printable characters, required (an adjustment without a reason cannot be audited)."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_REASON or not value.isprintable():
        raise InvalidRequest(
            f"`reason` must say why, in 1 to {MAX_REASON} printable characters.", field="reason"
        )
    return value


def adjust(
    conn: Connection, request_id: object, credits: object, reason: object, at: int, *, actor: str
) -> dict[str, Any]:
    """Unit of work: append an adjustment to a ledger row and move its budget windows' counters."""
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 32:
        raise NotFound("No ledger row has that request id.", field="request_id")
    delta = parse_amount(credits)
    why = check_reason(reason)
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    row = conn.execute(text(_ROW + lock), {"r": request_id}).first()
    if row is None:
        raise NotFound(
            f"No ledger row has request id {request_id!r}; a request is in the ledger once it has "
            "settled (`gateway ledger list`).",
            field="request_id",
        )
    charged = int(row[0])
    adjusted = int(conn.execute(text(_ADJUSTED), {"r": request_id}).scalar_one())
    total = charged + adjusted + delta
    if total < 0:
        raise InvalidRequest(
            f"This adjustment would take request {request_id}'s total below zero: it was charged "
            f"{format_credits(charged)} and adjusted by {format_credits(adjusted)}, so at most "
            f"{format_credits(charged + adjusted)} can be refunded.",
            field="credits",
        )
    windows = conn.execute(text(_WINDOWS), {"r": request_id}).all()
    db = sql_of(conn)
    for budget_id, window in windows:
        db.changed(_MOVE, {"delta": delta, "budget": budget_id, "window": window})
    if delta > 0:
        record_crossings(db, [(int(b), int(w), delta) for b, w in windows])
    conn.execute(
        text(_INSERT), {"r": request_id, "delta": delta, "reason": why, "at": at, "actor": actor[:300]}
    )
    result = {
        "request_id": request_id,
        "credits": credits_json(delta),
        "reason": why,
        "total": credits_json(total),
        "windows": len(windows),
    }
    audit.record(conn, at, actor, "ledger.adjust", request_id, None, result)
    return result


def list_for(conn: Connection, request_id: str) -> list[dict[str, Any]]:
    """A ledger row's adjustments, oldest first: credits, reason, when and by whom."""
    rows = conn.execute(
        text(
            "SELECT credits_micros, reason, created_at, actor FROM ledger_adjustments "
            "WHERE request_id = :r ORDER BY created_at, id"
        ),
        {"r": request_id},
    ).all()
    return [
        {"credits": credits_json(int(r[0])), "reason": r[1], "at": iso_us(int(r[2])), "actor": r[3]}
        for r in rows
    ]
