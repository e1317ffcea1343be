"""Alert events an administrative change causes: a budget set lower, or higher, or given new thresholds.

Settlements write the events of spending (gateway/core/settlement.py, and gateway_settle_batch on
PostgreSQL). A change of a budget moves the thresholds instead of the spending, in the transaction
of the change (`budgeting.set_budget`): a threshold the current window's spending has reached under
the new limit and had not under the old one is emitted now; a threshold the spending is now below
is re-armed (its event of this window, if any, gets `rearmed_at`, so the next crossing is a new
event). The window's counter is locked first on PostgreSQL, as settlements lock it, so a change and
a settlement of the same window are judged one after the other.

The default thresholds live in the database's `alert_defaults` row, written at start-up by each
gateway from GATEWAY_ALERT_THRESHOLDS (`store_defaults`), so the settlement (SQL on PostgreSQL)
and every command read the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, text

from gateway.core import alerts
from gateway.core.holding import rule_of
from gateway.core.settlement import emit_threshold
from gateway.core.windows import bounds
from gateway.store import sql_of

# (limit, thresholds) of a budget as it was; None when it did not exist or was deleted.
Before = tuple[int, tuple[int, ...]] | None

_DEFAULTS = text("SELECT thresholds FROM alert_defaults WHERE id = 1")
_BUDGET = (
    "SELECT id, limit_micros, alert_at, deleted_at, enforce, timezone, week_starts, month_starts_on "
    "FROM budgets "
    "WHERE scope = :scope AND subject = :subject AND period = :period"
)
_COUNTER = "SELECT spent_micros FROM budget_counters WHERE budget_id = :budget AND window_start = :window"
_REARM = (
    "UPDATE alert_events SET rearmed_at = :at WHERE budget_id = :budget AND window_start = :window "
    "AND threshold = :threshold AND rearmed_at IS NULL"
)


def default_thresholds(conn: Connection) -> tuple[int, ...]:
    """The thresholds of budgets without their own."""
    row = conn.execute(_DEFAULTS).first()
    return alerts.parse(None if row is None else row[0])


def store_defaults(conn: Connection, thresholds: Sequence[int], at: int) -> None:
    """Unit of work: make `thresholds` the defaults (GATEWAY_ALERT_THRESHOLDS, at start-up)."""
    conn.execute(
        text(
            "INSERT INTO alert_defaults (id, thresholds, updated_at) VALUES (1, :t, :at) "
            "ON CONFLICT (id) DO UPDATE SET thresholds = excluded.thresholds, "
            "updated_at = excluded.updated_at "
            "WHERE alert_defaults.thresholds <> excluded.thresholds"
        ),
        {"t": alerts.render(thresholds), "at": at},
    )


def _for_update(conn: Connection, lock: str = "UPDATE") -> str:
    return f" FOR {lock}" if conn.dialect.name == "postgresql" else ""


# A budget row is locked FOR NO KEY UPDATE, as its UPDATE would: that lets admissions and
# settlements, which hold counter locks, still take the KEY SHARE locks their foreign keys to it
# need (allocations, alert events). FOR UPDATE made them wait for a change that then waited for
# their counters: a deadlock (tests/test_end_user_budgets.py, a default changed while its end users
# arrive).
BUDGET_LOCK = "NO KEY UPDATE"


def budget_before(conn: Connection, scope: str, subject: str, period: str) -> Before:
    """The budget's limit and thresholds before a change (locked on PostgreSQL)."""
    row = conn.execute(
        text(_BUDGET + _for_update(conn, BUDGET_LOCK)), {"scope": scope, "subject": subject, "period": period}
    ).first()
    if row is None or row[3] is not None:
        return None
    return int(row[1]), alerts.parse(row[2], default_thresholds(conn))


def budget_changed(conn: Connection, scope: str, subject: str, period: str, before: Before, at: int) -> None:
    """After a budget's change: emit the thresholds it reached, re-arm those spending is below."""
    row = conn.execute(text(_BUDGET), {"scope": scope, "subject": subject, "period": period}).one()
    budget_id, limit, stored, _, enforce, *rule = row
    window = bounds(period, at, rule_of(*rule))[0]
    counter = conn.execute(
        text(_COUNTER + _for_update(conn)), {"budget": budget_id, "window": window}
    ).first()
    spent = 0 if counter is None else int(counter[0])
    thresholds = alerts.parse(stored, default_thresholds(conn))
    emit, rearm = alerts.newly_reached(spent, before, (int(limit), thresholds))
    db = sql_of(conn)
    for threshold in rearm:
        db.changed(_REARM, {"at": at, "budget": budget_id, "window": window, "threshold": threshold})
    for threshold in emit:
        emit_threshold(db, budget_id, window, threshold, int(limit), spent, bool(enforce), at)
