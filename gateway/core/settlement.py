"""Settlement: a hold becomes its ledger row, charged or released, and the counters move.

Each function is one unit of work for the store (`fn(conn, ...)`, one transaction). Alert
thresholds a charge reaches are written as events in the same transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, text

from gateway.core import alerts
from gateway.core.metering import Admission, Settlement, joined, now_us
from gateway.store import Sql, array_args, grouped, sql_of

DELETE_HOLD = "DELETE FROM holds WHERE request_id = :request_id"

_SETTLE_COUNTER = (
    "UPDATE budget_counters SET held_micros = held_micros - :credits, spent_micros = spent_micros + :spent "
    "WHERE budget_id = :budget AND window_start = :window"
)

_INSERT_LEDGER = (
    "INSERT INTO ledger (request_id, admitted_at, settled_at, team_id, user_id, key_id, model, "
    "message_count, unit_price_micros, credits_micros, outcome, upstream_status, prompt_tokens, "
    "completion_tokens, total_tokens, stream, duration_us, end_user, tags) "
    "VALUES (:request_id, :admitted_at, :settled_at, :team_id, :user_id, :key_id, :model, "
    ":message_count, :unit_price, :credits, :outcome, "
    ":upstream_status, :prompt_tokens, :completion_tokens, :total_tokens, :stream, :duration_us, :end_user, "
    ":tags)"
)
# A ledger row's tags, one row each, for reports by tag (written with the row, never changed).
_INSERT_LEDGER_TAG = "INSERT INTO ledger_tags (request_id, tag) VALUES (:request_id, :tag)"

# On PostgreSQL, the same work in one statement (`gateway_settle_batch`, an array per column).
_SETTLE_ARGS = (
    ("request_id", "varchar"),
    ("settled_at", "bigint"),
    ("outcome", "varchar"),
    ("upstream_status", "integer"),
    ("prompt_tokens", "integer"),
    ("completion_tokens", "integer"),
    ("total_tokens", "integer"),
)

_SETTLE_PG = f"SELECT * FROM gateway_settle_batch({array_args(_SETTLE_ARGS)})"


def ledger_row(
    request_id: str,
    admitted_at: int,
    caller: tuple[str, int, int | None],
    priced: tuple[str, int, int, bool],
    spent: int,
    settlement: Settlement,
    at: int,
    attributed: tuple[str | None, str | None],
) -> tuple[Any, ...]:
    """The ledger row, as `_INSERT_LEDGER` takes it, of a hold settled at `at` that charged `spent`:
    its `caller` is (key_id, user_id, team_id), `priced` (model, message_count, unit_price, stream),
    `attributed` (end user, tags as stored)."""
    key_id, user_id, team_id = caller
    model, message_count, unit_price, stream = priced
    return (
        request_id,
        admitted_at,
        at,
        team_id,
        user_id,
        key_id,
        model,
        message_count,
        unit_price,
        spent,
        settlement.outcome,
        settlement.upstream_status,
        settlement.prompt_tokens,
        settlement.completion_tokens,
        settlement.total_tokens,
        bool(stream),
        max(at - admitted_at, 0),
        *attributed,
    )


def release(
    counters: dict[tuple[int, int], tuple[int, int]],
    allocations: Iterable[tuple[int, int]],
    credits: int,
    spent: int,
) -> None:
    """Add a settled hold to `counters`, by (budget_id, window_start): (credits released, spent)."""
    for allocation in allocations:
        released, charged = counters.get(allocation, (0, 0))
        counters[allocation] = (released + credits, charged + spent)


def write_settlements(
    db: Sql, ledger_rows: Sequence[tuple[Any, ...]], counters: Mapping[tuple[int, int], tuple[int, int]]
) -> None:
    """Write settled holds' ledger rows, then release (credits held) and charge (credits spent)
    each counter by its `(budget_id, window_start): (released, spent)`, in lock order."""
    if ledger_rows:
        db.many(_INSERT_LEDGER, ledger_rows)
        tagged = [(row[0], tag) for row in ledger_rows if row[-1] for tag in row[-1].split(",")]
        if tagged:
            db.many(_INSERT_LEDGER_TAG, tagged)
    # Counters last: on PostgreSQL their row locks are then held only until the commit.
    if counters:
        db.many(
            _SETTLE_COUNTER,
            [(released, spent, b, w) for (b, w), (released, spent) in sorted(counters.items())],
        )
        record_crossings(db, [(b, w, spent) for (b, w), (_, spent) in sorted(counters.items()) if spent])


# Budgets' counters with what alerts need: the budget's limit, whether it refuses, and its
# thresholds (its own, else the defaults' row, else NULL: the built-in defaults). Those of some
# budgets and windows, each list bound as a JSON array (SQLite) or an array (PostgreSQL).
# budgets and windows: on SQLite the (budget, window) pairs as one JSON array, each pair a search of
# the counters' primary key (cheaper than two `IN (json_each)` lists); on PostgreSQL two arrays.
_COUNTER_COLUMNS = (
    "SELECT c.budget_id, c.window_start, c.spent_micros, b.limit_micros, b.enforce, "
    "COALESCE(b.alert_at, (SELECT ad.thresholds FROM alert_defaults ad WHERE ad.id = 1)) "
)
_COUNTERS_FOR_ALERTS = {
    "sqlite": _COUNTER_COLUMNS + "FROM json_each(:counters) m CROSS JOIN budget_counters c "
    "ON c.budget_id = m.value ->> 0 AND c.window_start = m.value ->> 1 "
    "JOIN budgets b ON b.id = c.budget_id WHERE b.deleted_at IS NULL",
    "postgresql": _COUNTER_COLUMNS + "FROM budget_counters c JOIN budgets b ON b.id = c.budget_id "
    "WHERE b.deleted_at IS NULL AND c.budget_id = ANY(CAST(:budgets AS bigint[])) "
    "AND c.window_start = ANY(CAST(:windows AS bigint[]))",
}
# One event per (budget, window, threshold) not re-armed: a second is refused by the unique index.
INSERT_THRESHOLD_EVENT = (
    "INSERT INTO alert_events (id, type, created_at, budget_id, window_start, threshold, limit_micros, "
    "spent_micros, enforce, dispatched) VALUES (:id, 'budget.threshold_crossed', :created_at, :budget, "
    ":window, :threshold, :limit, :spent, :enforce, false) ON CONFLICT DO NOTHING"
)


def new_event_id() -> str:
    """An event's id, as webhook receivers see it (`webhook-id`): `evt_` and 128 random bits."""
    return "evt_" + uuid.uuid4().hex


def record_crossings(db: Sql, moved: Sequence[tuple[int, int, int]]) -> None:
    """After counters moved (budget_id, window_start, credits spent by this move): write an event
    for each alert threshold the move reached for the first time (SQLite's settlements, and ledger
    adjustments; PostgreSQL's settlements do this in gateway_settle_batch). The caller holds the
    counters' write locks, so `spent - delta` is what it was. One query for every counter moved."""
    if not moved:
        return
    if db.dialect == "sqlite":
        params: dict[str, Any] = {"counters": json.dumps(sorted({(b, w) for b, w, _ in moved}))}
    else:
        params = {"budgets": sorted({b for b, _, _ in moved}), "windows": sorted({w for _, w, _ in moved})}
    read = {(row[0], row[1]): row[2:] for row in db.all(_COUNTERS_FOR_ALERTS[db.dialect], params)}
    at = now_us()
    for budget_id, window, delta in moved:
        row = read.get((budget_id, window))
        if row is None:
            continue
        spent, limit, enforce, stored = row
        for threshold in alerts.crossed(spent - delta, spent, limit, alerts.parse(stored)):
            emit_threshold(db, budget_id, window, threshold, limit, spent, bool(enforce), at)


def emit_threshold(
    db: Sql, budget_id: int, window: int, threshold: int, limit: int, spent: int, enforce: bool, at: int
) -> None:
    """Write the `budget.threshold_crossed` event of one threshold, unless that window has it already."""
    db.changed(
        INSERT_THRESHOLD_EVENT,
        {
            "id": new_event_id(),
            "created_at": at,
            "budget": budget_id,
            "window": window,
            "threshold": threshold,
            "limit": limit,
            "spent": spent,
            "enforce": enforce,
        },
    )


def settle_many(
    conn: Connection, calls: Sequence[tuple[Admission, Settlement, int]]
) -> list[tuple[bool, bool]]:
    """Settle `calls` (`settle`'s arguments each) together; (True, settled) for each.

    PostgreSQL: one statement. SQLite: each hold is deleted on its own (so one already gone changes
    nothing of it), then the ledger rows are written together and each counter is updated once.
    """
    if conn.dialect.name == "postgresql":
        settled = settle_pg(conn, [(a.charge.request_id, s, at) for a, s, at in calls])
        return [(True, done) for done in settled]
    db = sql_of(conn)
    results: list[tuple[bool, bool]] = []
    ledger_rows: list[tuple[Any, ...]] = []
    counters: dict[tuple[int, int], tuple[int, int]] = {}
    for admission, settlement, at in calls:
        charge = admission.charge
        if not db.changed(DELETE_HOLD, {"request_id": charge.request_id}):
            results.append((True, False))
            continue
        caller = charge.caller
        spent = charge.credits if settlement.outcome == "charged" else 0
        ledger_rows.append(
            ledger_row(
                charge.request_id,
                admission.admitted_at,
                (caller.key_id, caller.user_id, caller.team_id),
                (charge.model, charge.message_count, charge.unit_price, charge.stream),
                spent,
                settlement,
                at,
                (charge.end_user, joined(charge.tags)),
            )
        )
        release(counters, admission.allocations, charge.credits, spent)
        results.append((True, True))
    write_settlements(db, ledger_rows, counters)
    return results


def settle_pg(conn: Connection, calls: Sequence[tuple[str, Settlement, int]]) -> list[bool]:
    """PostgreSQL: settle held requests (request id, settlement, time) in one statement; whether
    each was still held.

    The statement deletes the holds in the order given, taking each one's row lock: given in
    request id order, two statements that settle some of the same holds (a sweep of another
    replica and the settlements it raced) take them in one order and cannot deadlock.
    """
    order = sorted(range(len(calls)), key=lambda i: calls[i][0])
    params: dict[str, list[Any]] = {name: [] for name, _ in _SETTLE_ARGS}
    for request_id, settlement, at in (calls[i] for i in order):
        values = (
            request_id,
            at,
            settlement.outcome,
            settlement.upstream_status,
            settlement.prompt_tokens,
            settlement.completion_tokens,
            settlement.total_tokens,
        )
        for (name, _), value in zip(_SETTLE_ARGS, values, strict=True):
            params[name].append(value)
    settled = [False] * len(calls)
    for row in sql_of(conn).all(_SETTLE_PG, params):
        settled[order[row[0] - 1]] = bool(row[1])
    return settled


def ledger_outcome(conn: Connection, request_id: str) -> str | None:
    """Unit of work: the outcome the ledger has for a request, if it has a row for it."""
    row = conn.execute(text("SELECT outcome FROM ledger WHERE request_id = :r"), {"r": request_id}).first()
    return None if row is None else str(row[0])


@grouped(settle_many)
def settle(conn: Connection, admission: Admission, settlement: Settlement, at: int) -> bool:
    """Turn the hold into a charge (outcome `charged`) or release it, and write the ledger row.

    Returns False, changing nothing, if the hold is already gone (expired by another process).
    """
    return settle_many(conn, [(admission, settlement, at)])[0][1]
