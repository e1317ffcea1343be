"""Admission: a hold of the request's credits placed on every budget that applies, or the refusal.

Each function is one unit of work for the store (`fn(conn, ...)`, one transaction). See `metering`
for the records and the invariants; `admission_sqlite` decides SQLite's batches, `holding` has what
both backends share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from gateway.core import ratelimits
from gateway.core.admission_sqlite import admit_sqlite
from gateway.core.holding import (
    KEY_REFUSALS,
    KNOWN_RULES,
    WINDOWS,
    end_user_subject,
    hold_row,
    key_refused,
    learn_rules,
    refusal,
    rule_of,
)
from gateway.core.metering import Admission, Charge, Refusal
from gateway.core.ratelimits import Limit, rate_headers, subject_name
from gateway.core.windows import PERIODS, UTC_RULE, Rule
from gateway.errors import BudgetExceeded, RateLimited, Unauthorized
from gateway.store import array_args, grouped, sql_of

# On PostgreSQL, the same work in one statement for the requests of any callers (the function
# `gateway_admit_batch`, which takes an array per column), run without BEGIN and COMMIT.
_ADMIT_ARGS = (
    ("request_id", "varchar"),
    ("instance_id", "varchar"),
    ("key_id", "varchar"),
    ("user_id", "integer"),
    ("team_id", "integer"),
    ("model", "varchar"),
    ("message_count", "integer"),
    ("unit_price", "bigint"),
    ("credits", "bigint"),
    ("stream", "boolean"),
    ("admitted_at", "bigint"),
    ("end_user", "varchar"),
    ("tags", "varchar"),
    *((period, "bigint") for period in PERIODS),
    ("limited", "boolean"),
    # The keys of every other rule known (`Windows.json`); see `_NO_WINDOW`.
    ("windows", "varchar"),
)

_ADMIT_PG = f"SELECT * FROM gateway_admit_batch({array_args(_ADMIT_ARGS)})"
# What gateway_window_of (migration 0013) raises for a budget whose rule the statement was not sent
# (one made by another process): the rules are then learned and the statement run again.
_NO_WINDOW = "GW001"
_RULE_OF_BUDGET = "SELECT timezone, week_starts, month_starts_on FROM budgets WHERE id = :id"


def admit_many(
    conn: Connection, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    """Admit `calls` (`admit`'s arguments each, from any callers) together, as if one after the other.

    A refusal takes nothing from the others: results are (True, Admission) or (False, a refusal:
    RateLimited, BudgetExceeded, or Unauthorized for a key revoked, blocked or expired by now), in
    the order of `calls`, exactly what admitting them one after the other would give. A request that
    costs 0 is always admitted by its budgets (a request rate still counts it). PostgreSQL: one
    statement. SQLite: see `_admit_sqlite`.
    """
    if conn.dialect.name == "postgresql":
        return _admit_pg(conn, calls)
    return admit_sqlite(sql_of(conn), calls)


def _admit_pg(
    conn: Connection, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    db = sql_of(conn)
    try:
        rows = db.all(_ADMIT_PG, _admit_params(calls))
    except DBAPIError as exc:
        cause = getattr(exc.orig, "__cause__", None)
        if _NO_WINDOW not in (getattr(exc.orig, "sqlstate", None), getattr(cause, "sqlstate", None)):
            raise
        # (Run without a transaction: the failed statement left nothing behind.)
        learn_rules(db.all(KNOWN_RULES, {}))
        rows = db.all(_ADMIT_PG, _admit_params(calls))
    rows_of: list[list[Any]] = [[] for _ in calls]
    for row in rows:
        rows_of[row[0] - 1].append(row)
    results: list[tuple[bool, Admission | Refusal]] = []
    for (charge, _, at), rows in zip(calls, rows_of, strict=True):
        # Each row: request, budget, scope, period, limit, window, spent, held, enforce, refusal; a
        # limit's (refusal 'rate' or 'limit'): request, limit, scope, kind, limit, per, tat, in flight.
        refused = rows[0][9]
        if refused in KEY_REFUSALS:
            results.append((False, key_refused(refused)))
        elif refused == "rate":
            results.append((False, _rate_refusal(charge, rows[0], at)))
        elif refused is not None and refused != "limit":
            _, budget_id, scope, period, limit, window, spent, held, _, _ = rows[0]
            rule = _rule_of_budget(db, budget_id)
            results.append((False, refusal(charge, scope, period, limit, window, spent, held, rule)))
        else:
            counted = [row for row in rows if row[1] is not None and row[9] is None]
            remaining = min((row[4] - row[6] - row[7] for row in counted if row[8]), default=None)
            allocations = tuple((row[1], row[5]) for row in counted)
            headers = None
            if refused == "limit":
                figures = [(_limit(charge, row), row[6]) for row in rows if row[9] == "limit"]
                headers = rate_headers(figures, at) or None
            results.append((True, Admission(charge, at, allocations, remaining, headers)))
    return results


def _admit_params(calls: Sequence[tuple[Charge, str, int]]) -> dict[str, list[Any]]:
    params: dict[str, list[Any]] = {name: [] for name, _ in _ADMIT_ARGS}
    for charge, instance_id, at in calls:
        # The hold's columns, the UTC window of each period, whether limited, the other rules' windows.
        windows = WINDOWS.at(at)
        limited = charge.caller.limited
        values = (*hold_row(charge, instance_id, at), *windows.utc.values(), limited, windows.json)
        for (name, _), value in zip(_ADMIT_ARGS, values, strict=True):
            params[name].append(value)
    return params


def _rule_of_budget(db: Any, budget_id: int) -> Rule:
    """The rule of a budget that refused (to show its reset in its zone): UTC_RULE when that is the
    only rule known, for the statement would have failed on any other (`_NO_WINDOW`)."""
    if len(WINDOWS.rules) == 1:
        return UTC_RULE
    row = db.first(_RULE_OF_BUDGET, {"id": budget_id})
    return UTC_RULE if row is None else rule_of(*row)


def _limit(charge: Charge, row: Any) -> Limit:
    """The limit of a row of gateway_admit_batch's (its state's subject as the function keys it)."""
    caller = charge.caller
    scope = row[2]
    state = {"key": caller.key_id, "user": str(caller.user_id), "team": str(caller.team_id)}.get(scope)
    if state is None:
        state = end_user_subject(caller.user_id, charge.end_user or "")
    return Limit(row[1], scope, row[3], row[4], row[5], state)


def _rate_refusal(charge: Charge, row: Any, at: int) -> RateLimited:
    limit = _limit(charge, row)
    caller = charge.caller
    subject = subject_name(limit.scope, limit.state, caller.key_id, caller.user_name, caller.team_name)
    return ratelimits.refused(limit, subject, row[6] or 0, row[7] or 0, at, charge.credits)


@grouped(admit_many)
def admit(conn: Connection, charge: Charge, instance_id: str, at: int) -> Admission:
    """Place a hold of the charge's credits on every budget that applies, or raise the refusal.

    The counters are updated last, so on PostgreSQL their row locks, which every request of a team
    waits for, are held for as short a time as the transaction allows.
    """
    ((_, result),) = admit_many(conn, [(charge, instance_id, at)])
    if isinstance(result, (BudgetExceeded, RateLimited, Unauthorized)):
        try:
            raise result
        finally:
            del result  # this frame is in the refusal's traceback: no reference cycle through it
    return result
