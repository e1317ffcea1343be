"""Admission: a hold of the request's credits placed on every budget that applies, or the refusal.

Each function is one unit of work for the store (`fn(conn, ...)`, one transaction). See `metering`
for the records and the invariants.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from sqlalchemy import Connection

from gateway.core.metering import Admission, Charge, Refusal, joined
from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import DAY_US, PERIODS, from_key, isoformat, window_end, window_keys
from gateway.errors import BudgetExceeded, Unauthorized
from gateway.store import Sql, array_args, grouped, sql_of

# SQLite: the budgets that apply to a caller, each with its counter of the window the request falls
# in (NULLs where that window has none yet). The batch holds the write lock, so nothing read here
# can change before the admission's own updates.
# Joins each budget `b` to its counter `c` of the window bound as :daily, :weekly, :monthly and
# :total (the keys of `window_keys`); NULLs where that window has no counter yet.
CURRENT_COUNTER = (
    "LEFT JOIN budget_counters c ON c.budget_id = b.id AND c.window_start = CASE b.period "
    + " ".join(f"WHEN '{period}' THEN :{period}" for period in PERIODS)
    + " END"
)
# `enforce`: whether the budget refuses (not a soft budget, nor one deleted, which still counts).
_BUDGET_COLUMNS = (
    "SELECT b.id, b.scope, b.period, b.limit_micros, c.spent_micros, c.held_micros, "
    "b.enforce AND b.deleted_at IS NULL, b.deleted_at IS NULL, b.subject "
    f"FROM budgets b {CURRENT_COUNTER} "
)
# A caller's key, user and team budgets, their user's end-user defaults (`USER_ID/*`: no counter
# of their own; read to know whether end users need `ADOPT_DEFAULTS`), and the budgets of the end
# user the request names (NULL: none).
_BUDGETS_AND_COUNTERS = (
    _BUDGET_COLUMNS + "WHERE (b.scope = 'key' AND b.subject IN (:key, :successor)) "
    "OR (b.scope = 'user' AND b.subject = :user) OR (b.scope = 'team' AND b.subject = :team) "
    "OR (b.scope = 'end_user' AND b.subject IN (:defaults, :end_user))"
)
_END_USER_BUDGETS = _BUDGET_COLUMNS + "WHERE b.scope = 'end_user' AND b.subject = :end_user"
# An end user's budgets from their user's defaults (`USER_ID/*`), for each period they have none of
# their own in: created at the default's limit on first use, or one deleted becomes the default's
# again (gateway_admit_batch does the same on PostgreSQL).
ADOPT_DEFAULTS = (
    "INSERT INTO budgets AS b (scope, subject, period, limit_micros, enforce, alert_at, created_at, "
    "updated_at, user_id, default_id) "
    "SELECT 'end_user', :end_user, d.period, d.limit_micros, d.enforce, d.alert_at, :at, :at, "
    "d.user_id, d.id "
    "FROM budgets d WHERE d.scope = 'end_user' AND d.subject = :defaults AND d.deleted_at IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM budgets o WHERE o.scope = 'end_user' AND o.subject = :end_user "
    "AND o.period = d.period AND o.deleted_at IS NULL) "
    "ON CONFLICT (scope, subject, period) DO UPDATE SET limit_micros = excluded.limit_micros, "
    "enforce = excluded.enforce, alert_at = excluded.alert_at, default_id = excluded.default_id, "
    "deleted_at = NULL, updated_at = excluded.updated_at WHERE b.deleted_at IS NOT NULL"
)


# The end user of a user's default end-user budgets (stored subject "USER_ID/*"): every end user
# of theirs without a budget of their own. No request may name an end user so (web/attribution.py).
ANY_END_USER = "*"


def end_user_subject(user_id: int, end_user: str) -> str:
    """How an end-user budget stores its subject: "USER_ID/END_USER" (`ANY_END_USER`: the defaults).

    The same text as gateway_admit_batch builds on PostgreSQL (migration 0010)."""
    return f"{user_id}/{end_user}"


# Creates the window's counter with these holds (one request's, or a group's sum), or adds them to
# it, only if they still fit (or add nothing, or the budget does not refuse): one row changed, or
# none. The limit is read inside the statement so a budget change is never missed.
# (No RETURNING: SQLite buffers a RETURNING statement's rows in a temporary B-tree of its own.)
_PLACE_HOLD = (
    "INSERT INTO budget_counters (budget_id, window_start, spent_micros, held_micros) "
    "SELECT b.id, :window, 0, :credits FROM budgets b WHERE b.id = :budget AND (:credits <= b.limit_micros "
    "OR :credits = 0 OR NOT b.enforce OR b.deleted_at IS NOT NULL) "
    "ON CONFLICT (budget_id, window_start) DO UPDATE "
    "SET held_micros = budget_counters.held_micros + excluded.held_micros "
    "WHERE excluded.held_micros = 0 OR (SELECT budget_counters.spent_micros + budget_counters.held_micros "
    "+ excluded.held_micros <= b.limit_micros OR NOT b.enforce OR b.deleted_at IS NOT NULL "
    "FROM budgets b WHERE b.id = excluded.budget_id)"
)
# A key's state, and the key that replaced it (`keys rotate`): during the grace, its key budgets,
# which moved to that key, still hold requests through this one.
_KEY_STATE = "SELECT revoked_at, blocked_at, expires_at, rotated_to FROM api_keys WHERE id = :key"

_INSERT_HOLD = (
    "INSERT INTO holds (request_id, instance_id, key_id, user_id, team_id, model, message_count, "
    "unit_price_micros, credits_micros, stream, admitted_at, end_user, tags) "
    "VALUES (:request_id, :instance_id, :key_id, :user_id, :team_id, :model, :message_count, "
    ":unit_price, :credits, :stream, :admitted_at, "
    ":end_user, :tags)"
)

_INSERT_ALLOCATION = (
    "INSERT INTO allocations (request_id, budget_id, window_start, credits_micros) "
    "VALUES (:request_id, :budget, :window, :credits)"
)

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
)

_ADMIT_PG = f"SELECT * FROM gateway_admit_batch({array_args(_ADMIT_ARGS)})"


def admit_many(
    conn: Connection, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    """Admit `calls` (`admit`'s arguments each, from any callers) together, as if one after the other.

    A refusal takes nothing from the others: results are (True, Admission) or (False, a refusal:
    BudgetExceeded, or Unauthorized for a key revoked, blocked or expired by now), in the order of
    `calls`, exactly what admitting them one after the other would give. A request that costs 0 is
    always admitted. PostgreSQL: one statement. SQLite: see `_admit_sqlite`.
    """
    if conn.dialect.name == "postgresql":
        return _admit_pg(conn, calls)
    return _admit_sqlite(sql_of(conn), calls)


def _admit_pg(
    conn: Connection, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    params: dict[str, list[Any]] = {name: [] for name, _ in _ADMIT_ARGS}
    for charge, instance_id, at in calls:
        # The hold's columns, then the window of each period.
        values = (*_hold(charge, instance_id, at), *window_keys(at).values())
        for (name, _), value in zip(_ADMIT_ARGS, values, strict=True):
            params[name].append(value)
    rows_of: list[list[Any]] = [[] for _ in calls]
    for row in sql_of(conn).all(_ADMIT_PG, params):
        rows_of[row[0] - 1].append(row)
    results: list[tuple[bool, Admission | Refusal]] = []
    for (charge, _, at), rows in zip(calls, rows_of, strict=True):
        # Each row: request, budget, scope, period, limit, window, spent, held, enforce, refusal.
        refused = rows[0][9]
        if refused in KEY_REFUSALS:
            results.append((False, key_refused(refused)))
        elif refused is not None:
            _, _, scope, period, limit, window, spent, held, _, _ = rows[0]
            results.append((False, _refusal(charge, scope, period, limit, window, spent, held)))
        else:
            counted = [row for row in rows if row[1] is not None]
            remaining = min((row[4] - row[6] - row[7] for row in counted if row[8]), default=None)
            allocations = tuple((row[1], row[5]) for row in counted)
            results.append((True, Admission(charge, at, allocations, remaining)))
    return results


# Why a key is refused, as admission says it on either backend (`key_state`), and in what words.
KEY_REFUSALS = {
    "revoked": "This gateway key has been revoked. Ask an administrator for a new key.",
    "blocked": "This gateway key is blocked. Ask an administrator to unblock it ('gateway keys unblock ID').",
    "expired": "This gateway key has expired. Ask an administrator for a new key, or to extend it "
    "('gateway keys set ID --expires ...').",
}


def key_refused(reason: str) -> Unauthorized:
    """The refusal of a key that is `revoked`, `blocked` or `expired`."""
    return Unauthorized(KEY_REFUSALS[reason], reason=reason)


def key_state(revoked_at: int | None, blocked_at: int | None, expires_at: int | None, at: int) -> str | None:
    """Why a key does not work at `at` (`revoked`, `blocked`, `expired`), or None when it does."""
    if revoked_at is not None and revoked_at <= at:
        return "revoked"
    if blocked_at is not None:
        return "blocked"
    if expires_at is not None and expires_at <= at:
        return "expired"
    return None


def _admit_sqlite(
    db: Sql, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    """SQLite: decided here, in order, then written with one statement per table and counter.

    The store's batch holds the write lock, so the counters read here cannot change before this
    group's own updates: each call is decided against them plus the holds placed by the calls
    before it, and a refusal writes nothing. Each caller's key and budgets are read once; each
    counter is then updated once, by the sum of the holds placed on it.
    """
    # (budget_id, window_start) -> [limit, spent, held, added by this group]
    counters: dict[tuple[int, int], list[int]] = {}
    # The counters this group's admissions hold on: each gets its update, even adding 0 credits (a
    # free model's), so that every window with allocations has its counter, as one by one it would.
    placed: set[tuple[int, int]] = set()
    # Per caller and day: why the key is refused (None: live), its budgets (id, scope, period,
    # window, enforce), and the periods of its user's end-user defaults; per user, end user and day,
    # the end user's budgets. (One key serving many end users reads its own budgets once.)
    budgets_of: dict[Hashable, tuple[str | None, list[Budget], frozenset[str]]] = {}
    end_user_budgets_of: dict[Hashable, list[Budget]] = {}
    results: list[tuple[bool, Admission | Refusal]] = []
    holds: list[tuple[Any, ...]] = []
    allocation_rows: list[tuple[Any, ...]] = []
    for charge, instance_id, at in calls:
        windows = window_keys(at)
        who = _caller_and_day(charge, at)
        whom = (charge.caller.user_id, charge.end_user, at // DAY_US)
        known = budgets_of.get(who)
        if known is None:
            known, theirs = _read_caller(db, charge, windows, at, counters)
            budgets_of[who] = known
            if theirs is not None:
                end_user_budgets_of[whom] = theirs
        state, budgets, defaults = known
        if state is not None:
            results.append((False, key_refused(state)))
            continue
        if charge.end_user is not None:
            theirs = end_user_budgets_of.get(whom)
            if theirs is None:
                theirs = end_user_budgets_of[whom] = _read_end_user(
                    db, charge, defaults, windows, at, counters
                )
            if theirs:
                budgets = sorted(budgets + theirs)
        credits = charge.credits
        # Refused at the first budget (in id order) it does not fit; a free request always fits.
        refusal: BudgetExceeded | None = None
        remaining: int | None = None
        for budget_id, scope, period, window, enforce in budgets:
            if not enforce:
                continue
            limit, spent, held, _ = counters[(budget_id, window)]
            left = limit - spent - held - credits
            if left < 0 and credits > 0:
                refusal = _refusal(charge, scope, period, limit, window, spent, held)
                break
            remaining = left if remaining is None else min(remaining, left)
        if refusal is not None:
            results.append((False, refusal))
            continue
        allocations = tuple((budget_id, window) for budget_id, _, _, window, _ in budgets)
        for allocation in allocations:
            counter = counters[allocation]
            counter[2] += credits
            counter[3] += credits
            placed.add(allocation)
            allocation_rows.append((charge.request_id, allocation[0], allocation[1], credits))
        holds.append(_hold(charge, instance_id, at))
        results.append((True, Admission(charge, at, allocations, remaining)))
    if holds:
        db.many(_INSERT_HOLD, holds)
    if allocation_rows:
        db.many(_INSERT_ALLOCATION, allocation_rows)
    # The counters still change only through the conditional update, which cannot fail here: the
    # write lock has been held since the reads above. If it ever did, the admissions are a bug, not
    # refusals: the group rolls back (nothing of it stays), and its calls are run one by one, where
    # those it fails again are answered 500.
    for budget_id, window in sorted(placed):
        added = counters[(budget_id, window)][3]
        if db.changed(_PLACE_HOLD, {"window": window, "credits": added, "budget": budget_id}) != 1:
            raise CounterMismatch(
                f"budget {budget_id}, window {window}: the counter refused holds its read said fit"
            )
    return results


# A budget as admission holds on it: (id, scope, period, window, enforce).
Budget = tuple[int, str, str, int, bool]


def _read_caller(
    db: Sql, charge: Charge, windows: dict[str, int], at: int, counters: dict[tuple[int, int], list[int]]
) -> tuple[tuple[str | None, list[Budget], frozenset[str]], list[Budget] | None]:
    """The charge's caller: its key state, its key, user and team budgets, the periods of its
    user's end-user defaults; and the budgets of the end user the charge names (None when it names
    none, or the key is refused). Their counters go into `counters`. One query, so a request of a
    new caller naming an end user costs no more reads than one naming none."""
    caller = charge.caller
    key = db.first(_KEY_STATE, {"key": caller.key_id})
    state = "revoked" if key is None else key_state(key[0], key[1], key[2], at)
    defaults_subject = end_user_subject(caller.user_id, ANY_END_USER)
    subject = None if charge.end_user is None else end_user_subject(caller.user_id, charge.end_user)
    read = db.all(
        _BUDGETS_AND_COUNTERS,
        {
            **windows,
            "key": caller.key_id,
            "successor": None if key is None else key[3],
            "user": str(caller.user_id),
            "team": str(caller.team_id),
            "defaults": defaults_subject,
            "end_user": subject,
        },
    )
    defaults = frozenset(
        row[2] for row in read if row[1] == "end_user" and row[8] == defaults_subject and row[7]
    )
    budgets = _counted([row for row in read if row[1] != "end_user"], windows, counters)
    theirs = None
    if subject is not None and state is None:
        mine = [row for row in read if row[1] == "end_user" and row[8] == subject]
        theirs = _read_end_user(db, charge, defaults, windows, at, counters, mine)
    return (state, budgets, defaults), theirs


def _read_end_user(
    db: Sql,
    charge: Charge,
    defaults: frozenset[str],
    windows: dict[str, int],
    at: int,
    counters: dict[tuple[int, int], list[int]],
    read: list[Any] | None = None,
) -> list[Budget]:
    """The budgets of the charge's end user (`read` already, or read here), their counters added
    to `counters`; first those their user's `defaults` (periods) give them, where they have no live
    one of their own yet."""
    assert charge.end_user is not None
    subject = end_user_subject(charge.caller.user_id, charge.end_user)
    params = {**windows, "end_user": subject}
    if read is None:
        read = db.all(_END_USER_BUDGETS, params)
    if defaults - {row[2] for row in read if row[7]}:
        defaults_subject = end_user_subject(charge.caller.user_id, ANY_END_USER)
        db.changed(ADOPT_DEFAULTS, {"end_user": subject, "defaults": defaults_subject, "at": at})
        read = db.all(_END_USER_BUDGETS, params)
    return _counted(read, windows, counters)


def _counted(
    read: Sequence[Any], windows: dict[str, int], counters: dict[tuple[int, int], list[int]]
) -> list[Budget]:
    """Budgets as read (with their counter in the current window), in id order; each counter goes
    into `counters` unless this group has it already: then it is as the group's holds left it."""
    budgets = []
    for budget_id, scope, period, limit, spent, held, enforce, *_ in sorted(read):
        window = windows[period]
        counters.setdefault((budget_id, window), [limit, spent or 0, held or 0, 0])
        budgets.append((budget_id, scope, period, window, bool(enforce)))
    return budgets


def _hold(charge: Charge, instance_id: str, at: int) -> tuple[Any, ...]:
    """The holds row of an admitted charge, as `_INSERT_HOLD` takes it."""
    caller = charge.caller
    return (
        charge.request_id,
        instance_id,
        caller.key_id,
        caller.user_id,
        caller.team_id,
        charge.model,
        charge.message_count,
        charge.unit_price,
        charge.credits,
        charge.stream,
        at,
        charge.end_user,
        joined(charge.tags),
    )


def _caller_and_day(charge: Charge, at: int) -> Hashable:
    """Requests with the same key and budgets: one caller's, the same UTC day."""
    caller = charge.caller
    return (caller.key_id, caller.user_id, caller.team_id, at // DAY_US)


@grouped(admit_many)
def admit(conn: Connection, charge: Charge, instance_id: str, at: int) -> Admission:
    """Place a hold of the charge's credits on every budget that applies, or raise the refusal.

    The counters are updated last, so on PostgreSQL their row locks, which every request of a team
    waits for, are held for as short a time as the transaction allows.
    """
    ((_, result),) = admit_many(conn, [(charge, instance_id, at)])
    if isinstance(result, (BudgetExceeded, Unauthorized)):
        try:
            raise result
        finally:
            del result  # this frame is in the refusal's traceback: no reference cycle through it
    return result


class CounterMismatch(RuntimeError):
    """A counter disagreed with what the same transaction read of it a moment before (a bug)."""


def _refusal(
    charge: Charge, scope: str, period: str, limit: int, window: int, spent: int, held: int
) -> BudgetExceeded:
    caller = charge.caller
    subject: str | None
    if scope == "end_user":
        subject = f"{caller.user_name}/{charge.end_user}"
        whose = f"end-user budget of {charge.end_user!r} (an end user of {caller.user_name!r})"
    else:
        subject = {"team": caller.team_name, "user": caller.user_name, "key": caller.key_id}[scope]
        whose = f"{scope} budget of {subject!r}"
    remaining = max(limit - spent - held, 0)
    start = from_key(window)
    return BudgetExceeded(
        f"This request costs {format_credits(charge.credits)} credits but the {period} {whose} has "
        f"{format_credits(remaining)} of {format_credits(limit)} left. "
        + (
            "It does not reset; ask an administrator to raise it."
            if period == "total"
            else f"Wait until it resets at {isoformat(window_end(period, start))} or ask an administrator "
            "to raise it."
        ),
        scope=scope,
        subject=subject,
        period=period,
        limit=credits_json(limit),
        spent=credits_json(spent),
        held=credits_json(held),
        remaining=credits_json(remaining),
        cost=credits_json(charge.credits),
        resets_at=isoformat(window_end(period, start)),
        **({"end_user": charge.end_user} if scope == "end_user" else {}),
    )
