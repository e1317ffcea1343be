"""Alert events read back: their webhook bodies, and the listing with their delivery state.

An event's body is rendered from its row (written by a settlement or a budget change, see
gateway/core/alerts.py) and its budget's names, the same text every time it is sent: a receiver
gets the same `id`, `created_at` and `data` on every retry. The listing is paginated as the
ledger's is, by (created_at, id) with the same opaque cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, text

from gateway.core.holding import rule_of
from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import iso_us, shown
from gateway.ops import ledger, subjects
from gateway.ops.reports import parse_range, range_clause
from gateway.ops.services import check_choice

THRESHOLD_CROSSED = "budget.threshold_crossed"
TEST = "webhook.test"
TYPES = (THRESHOLD_CROSSED,)

# An event with its budget's scope, subject (team or user name, key id, USER/END_USER) and period.
EVENT_COLUMNS = (
    "SELECT e.id, e.type, e.created_at, e.window_start, e.threshold, e.limit_micros, e.spent_micros, "
    f"e.enforce, b.scope, {subjects.SUBJECT_NAME}, b.period, e.rearmed_at, e.dispatched, "
    "b.timezone, b.week_starts, b.month_starts_on "
    f"FROM alert_events e JOIN budgets b ON b.id = e.budget_id {subjects.SUBJECT_JOINS}"
)
_DELIVERIES = text(
    "SELECT event_id, endpoint, state, attempts, last_error, last_status, next_attempt_at, delivered_at "
    "FROM webhook_deliveries WHERE event_id IN :ids ORDER BY event_id, endpoint"
).bindparams(bindparam("ids", expanding=True))


def body(row: Any) -> dict[str, Any]:
    """The event as webhooks receive it (section 9): {"id", "type", "created_at", "data"}."""
    window_start, resets_at = shown(row[10], int(row[3]), rule_of(*row[13:16]))
    limit, spent = int(row[5]), int(row[6])
    return {
        "id": row[0],
        "type": row[1],
        "created_at": iso_us(int(row[2])),
        "data": {
            "scope": row[8],
            "subject": str(row[9]),
            "period": row[10],
            "window_start": window_start,
            "resets_at": resets_at,
            "threshold": int(row[4]),
            "limit": credits_json(limit),
            "spent": credits_json(spent),
            "remaining": credits_json(max(limit - spent, 0)),
            "enforce": bool(row[7]),
        },
    }


def sentence(event: dict[str, Any]) -> str:
    """The event in one sentence, for people (the `slack` format)."""
    if event["type"] == TEST:
        return f"Test event {event['id']} from the credit gateway: this webhook works."
    d = event["data"]
    resets = f"it resets at {d['resets_at']}" if d["resets_at"] else "it never resets"
    soft = "; it is a soft budget and refuses nothing" if not d["enforce"] else ""
    return (
        f"Budget alert: the {d['period']} {d['scope']} budget of {d['subject']} has reached "
        f"{d['threshold']}% of its limit, {_c(d['spent'])} of {_c(d['limit'])} credits spent "
        f"in the window from {d['window_start']} ({resets}{soft})."
    )


def _c(value: Any) -> str:
    return format_credits(round(value * 1_000_000))


@dataclass(frozen=True)
class EventQuery:
    """Validated filters of an events listing; `after` is the decoded cursor."""

    type: str | None = None
    start: int | None = None
    end: int | None = None
    limit: int = ledger.DEFAULT_LIMIT
    after: tuple[int, str] | None = None


def parse_query(
    *,
    type: str | None = None,
    start: str | None = None,
    end: str | None = None,
    limit: str | int | None = None,
    cursor: str | None = None,
) -> EventQuery:
    """Validate a listing's filters (as strings from a query string or the command line)."""
    lo, hi = parse_range(start, end)
    return EventQuery(
        type=None if type is None else check_choice("type", type, TYPES),
        start=lo,
        end=hi,
        limit=ledger.parse_limit(limit),
        after=None if cursor is None else _after(cursor),
    )


# The ledger's cursor, (time, id), with an event id's `evt_` left out: the ledger's ids are 32 long.
def _cursor(created_at: int, event_id: str) -> str:
    return ledger.encode_cursor(created_at, event_id.removeprefix("evt_"))


def _after(cursor: str) -> tuple[int, str]:
    created_at, rest = ledger.decode_cursor(cursor)
    return created_at, "evt_" + rest


def _state(deliveries: list[dict[str, Any]], dispatched: bool) -> str:
    """An event's state over its endpoints: pending while any delivery is, then gave_up if any did."""
    states = {d["state"] for d in deliveries}
    if "pending" in states or not dispatched:
        return "pending"
    if "gave_up" in states or not deliveries:
        return "gave_up"  # (no delivery at all: no webhook was configured when it was dispatched)
    return "delivered"


def list_events(conn: Connection, query: EventQuery, names: dict[str, str] | None = None) -> dict[str, Any]:
    """One page of events, oldest first: {"events": [...], "next_cursor": "..." | null}.

    Each event is its webhook body plus `state`, `attempts` (over all endpoints), `last_error`
    and `deliveries` (one per endpoint, named by `names` where the caller knows its URL).
    """
    where, params = range_clause(query.start, query.end, "e.created_at")
    clauses: list[str] = [where] if where else []
    values: dict[str, Any] = dict(params)
    if query.type is not None:
        clauses.append("e.type = :type")
        values["type"] = query.type
    if query.after is not None:
        clauses.append("(e.created_at, e.id) > (:after_at, :after_id)")
        values["after_at"], values["after_id"] = query.after
    sql = EVENT_COLUMNS + (" WHERE " + " AND ".join(clauses) if clauses else "")
    sql += " ORDER BY e.created_at, e.id LIMIT :limit"
    values["limit"] = query.limit + 1
    rows = conn.execute(text(sql), values).all()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    deliveries: dict[str, list[dict[str, Any]]] = {}
    if rows:
        for d in conn.execute(_DELIVERIES, {"ids": [r[0] for r in rows]}).all():
            deliveries.setdefault(d[0], []).append(
                {
                    "endpoint": (names or {}).get(d[1], d[1]),
                    "state": d[2],
                    "attempts": d[3],
                    "last_error": d[4],
                    "last_status": d[5],
                    "next_attempt_at": iso_us(d[6]) if d[2] == "pending" else None,
                    "delivered_at": iso_us(d[7]),
                }
            )
    out = []
    for r in rows:
        mine = deliveries.get(r[0], [])
        errors = [d["last_error"] for d in mine if d["last_error"]]
        out.append(
            {
                **body(r),
                "state": _state(mine, bool(r[12])),
                "attempts": sum(d["attempts"] for d in mine),
                "last_error": errors[-1] if errors else None,
                "rearmed_at": iso_us(r[11]),
                "deliveries": mine,
            }
        )
    last = rows[-1] if rows else None
    return {"events": out, "next_cursor": _cursor(last[2], last[0]) if more and last else None}
