"""Metering: holds placed at admission, settled into charges or releases, expired after a crash.

Each function here is one unit of work for the store (`fn(conn, ...)`, one transaction). Counters
change only through conditional updates, so admission is exact under any concurrency and across
processes sharing one database: a counter row is updated only if `spent + held + cost <= limit`
still holds when the database applies it. Budgets are always touched in id order, so concurrent
transactions on PostgreSQL lock rows in the same order and cannot deadlock.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from gateway.core import alerts
from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import DAY_US, PERIODS, from_key, isoformat, window_end, window_keys
from gateway.errors import BudgetExceeded, Unauthorized
from gateway.store import Sql, grouped, sql_of


def joined(tags: tuple[str, ...]) -> str | None:
    """Tags as holds and ledger rows store them: comma-separated (a tag has no comma), NULL for none."""
    return ",".join(tags) if tags else None


Refusal = BudgetExceeded | Unauthorized


# The records of a request's way through metering: made several times a request, so plain slotted
# dataclasses, never changed once made. (frozen=True would say so, but its __init__ sets each field
# through object.__setattr__: measured with callgrind, 4% of the gateway's instructions a request.)
@dataclass(slots=True)
class Caller:
    """Who a gateway key belongs to."""

    key_id: str
    user_id: int
    user_name: str
    team_id: int | None
    team_name: str | None
    # The models the key may use (its, its user's and its team's allow-lists met); None: every one.
    models: frozenset[str] | None = None
    # When the key stops working (expiry, or the end of a rotation's grace), and the reason then.
    ends_at: int | None = None
    ends_why: str = ""


@dataclass(slots=True)
class Charge:
    """A priced request about to be admitted."""

    request_id: str
    caller: Caller
    model: str
    message_count: int
    unit_price: int
    credits: int
    stream: bool
    end_user: str | None = None  # whom the caller serves (contract §11), None when not said
    tags: tuple[str, ...] = ()


@dataclass(slots=True)
class Admission:
    """An admitted request: the budget windows it holds on and what they have left after it."""

    charge: Charge
    admitted_at: int  # microseconds since the epoch
    allocations: tuple[tuple[int, int], ...]  # (budget_id, window_start), in lock order
    remaining: int | None  # smallest remaining micro-credits across the budgets; None when none applies


@dataclass(slots=True)
class Settlement:
    """How an admitted request ended, as the ledger records it."""

    outcome: str  # charged, upstream_error, upstream_unavailable, upstream_timeout, expired
    upstream_status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


def now_us() -> int:
    """Now, in integer microseconds since the epoch."""
    return time.time_ns() // 1_000


def new_request_id() -> str:
    """32 hex digits: the time in microseconds, then 72 random bits (an id, not a secret).

    Ids that grow with time are appended at the right edge of the holds, allocations and ledger
    indexes, where random ones would dirty a different page of each for every request.
    """
    return f"{now_us():014x}{random.getrandbits(72):018x}"


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
_BUDGETS_AND_COUNTERS = (
    "SELECT b.id, b.scope, b.period, b.limit_micros, c.spent_micros, c.held_micros, "
    "b.enforce AND b.deleted_at IS NULL FROM budgets b "
    f"{CURRENT_COUNTER} WHERE (b.scope = 'key' AND b.subject = :key) "
    "OR (b.scope = 'user' AND b.subject = :user) OR (b.scope = 'team' AND b.subject = :team)"
)

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
_KEY_STATE = "SELECT revoked_at, blocked_at, expires_at FROM api_keys WHERE id = :key"

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

_DELETE_HOLD = "DELETE FROM holds WHERE request_id = :request_id"

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


# On PostgreSQL, the same work in one statement for the requests of any callers (the functions of
# migration 0006, which take an array per column), run without BEGIN and COMMIT.
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
_SETTLE_ARGS = (
    ("request_id", "varchar"),
    ("settled_at", "bigint"),
    ("outcome", "varchar"),
    ("upstream_status", "integer"),
    ("prompt_tokens", "integer"),
    ("completion_tokens", "integer"),
    ("total_tokens", "integer"),
)


def _arrays(args: tuple[tuple[str, str], ...]) -> str:
    """The function's arguments: one array parameter per column."""
    return ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in args)


_ADMIT_PG = f"SELECT * FROM gateway_admit_batch({_arrays(_ADMIT_ARGS)})"
_SETTLE_PG = f"SELECT * FROM gateway_settle_batch({_arrays(_SETTLE_ARGS)})"


def admit_many(
    conn: Connection, calls: Sequence[tuple[Charge, str, int]]
) -> list[tuple[bool, Admission | Refusal]]:
    """Admit `calls` (`admit`'s arguments each, from any callers) together, as if one after the other.

    A refusal takes nothing from the others: results are (True, Admission) or (False, a refusal:
    BudgetExceeded, or Unauthorized for a key revoked by now; on SQLite also one blocked or expired
    by now, which on PostgreSQL the key caches refuse), in the order of `calls`, exactly
    what admitting them one after the other would give. A request that costs 0 is always admitted.
    PostgreSQL: one statement. SQLite: see `_admit_sqlite`.
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
        if refused == "revoked":
            results.append((False, revoked()))
        elif refused is not None:
            _, _, scope, period, limit, window, spent, held, _, _ = rows[0]
            results.append((False, _refusal(charge, scope, period, limit, window, spent, held)))
        else:
            counted = [row for row in rows if row[1] is not None]
            remaining = min((row[4] - row[6] - row[7] for row in counted if row[8]), default=None)
            allocations = tuple((row[1], row[5]) for row in counted)
            results.append((True, Admission(charge, at, allocations, remaining)))
    return results


def revoked() -> Unauthorized:
    """The refusal of a key revoked by the time its request is admitted."""
    return Unauthorized(
        "This gateway key has been revoked. Ask an administrator for a new key.", reason="revoked"
    )


KEY_REFUSALS = {
    "blocked": "This gateway key is blocked. Ask an administrator to unblock it ('gateway keys unblock ID').",
    "expired": "This gateway key has expired. Ask an administrator for a new key, or to extend it "
    "('gateway keys set ID --expires ...').",
}


def key_refused(reason: str) -> Unauthorized:
    """The refusal of a key that is `revoked`, `blocked` or `expired`."""
    if reason == "revoked":
        return revoked()
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
    # Per caller and day: why the key is refused (None: live), and its budgets (id, scope, period,
    # window, enforce).
    budgets_of: dict[Hashable, tuple[str | None, list[tuple[int, str, str, int, bool]]]] = {}
    results: list[tuple[bool, Admission | Refusal]] = []
    holds: list[tuple[Any, ...]] = []
    allocation_rows: list[tuple[Any, ...]] = []
    for charge, instance_id, at in calls:
        windows = window_keys(at)
        who = _caller_and_day(charge, at)
        known = budgets_of.get(who)
        if known is None:
            caller = charge.caller
            key = db.first(_KEY_STATE, {"key": caller.key_id})
            state = "revoked" if key is None else key_state(key[0], key[1], key[2], at)
            budgets: list[tuple[int, str, str, int, bool]] = []
            known = budgets_of[who] = (state, budgets)
            read = db.all(
                _BUDGETS_AND_COUNTERS,
                {**windows, "key": caller.key_id, "user": str(caller.user_id), "team": str(caller.team_id)},
            )
            for budget_id, scope, period, limit, spent, held, enforce in sorted(read):
                window = windows[period]
                # A counter another caller of this group shares (their team's) is as that left it.
                counters.setdefault((budget_id, window), [limit, spent or 0, held or 0, 0])
                budgets.append((budget_id, scope, period, window, bool(enforce)))
        state, budgets = known
        if state is not None:
            results.append((False, key_refused(state)))
            continue
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
    subject = {"team": caller.team_name, "user": caller.user_name, "key": caller.key_id}[scope]
    remaining = max(limit - spent - held, 0)
    start = from_key(window)
    return BudgetExceeded(
        f"This request costs {format_credits(charge.credits)} credits but the {period} {scope} budget of "
        f"{subject!r} has {format_credits(remaining)} of {format_credits(limit)} left. "
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
    )


def _ledger_row(
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


def _release(
    counters: dict[tuple[int, int], tuple[int, int]],
    allocations: Iterable[tuple[int, int]],
    credits: int,
    spent: int,
) -> None:
    """Add a settled hold to `counters`, by (budget_id, window_start): (credits released, spent)."""
    for allocation in allocations:
        released, charged = counters.get(allocation, (0, 0))
        counters[allocation] = (released + credits, charged + spent)


def _write_settlements(
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


# A budget's counter in a window with what alerts need: the budget's limit, whether it refuses,
# and its thresholds (its own, else the defaults' row, else NULL: the built-in defaults).
_COUNTER_FOR_ALERTS = (
    "SELECT c.spent_micros, b.limit_micros, b.enforce, "
    "COALESCE(b.alert_at, (SELECT ad.thresholds FROM alert_defaults ad WHERE ad.id = 1)) "
    "FROM budget_counters c JOIN budgets b ON b.id = c.budget_id "
    "WHERE c.budget_id = :budget AND c.window_start = :window AND b.deleted_at IS NULL"
)
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
    for each alert threshold the move reached for the first time (SQLite; PostgreSQL does this in
    gateway_settle_batch). The caller holds the write lock, so `spent - delta` is what it was."""
    at = now_us()
    for budget_id, window, delta in moved:
        row = db.first(_COUNTER_FOR_ALERTS, {"budget": budget_id, "window": window})
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
        settled = _settle_pg(conn, [(a.charge.request_id, s, at) for a, s, at in calls])
        return [(True, done) for done in settled]
    db = sql_of(conn)
    results: list[tuple[bool, bool]] = []
    ledger_rows: list[tuple[Any, ...]] = []
    counters: dict[tuple[int, int], tuple[int, int]] = {}
    for admission, settlement, at in calls:
        charge = admission.charge
        if not db.changed(_DELETE_HOLD, {"request_id": charge.request_id}):
            results.append((True, False))
            continue
        caller = charge.caller
        spent = charge.credits if settlement.outcome == "charged" else 0
        ledger_rows.append(
            _ledger_row(
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
        _release(counters, admission.allocations, charge.credits, spent)
        results.append((True, True))
    _write_settlements(db, ledger_rows, counters)
    return results


def _settle_pg(conn: Connection, calls: Sequence[tuple[str, Settlement, int]]) -> list[bool]:
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


# A hold's columns, as `expire_holds` reads them.
_HOLD_COLUMNS = (
    "request_id, key_id, user_id, team_id, model, message_count, unit_price_micros AS unit_price, "
    "credits_micros AS credits, stream, admitted_at, end_user, tags"
)
# PostgreSQL's own clock in microseconds since the epoch. Replicas' clocks may disagree; on
# PostgreSQL heartbeats are written and judged by this one clock, so a replica whose clock runs
# ahead cannot take a live process for a dead one (SQLite: one machine, one clock).
DB_NOW_US = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
_STALE_HOLDS = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.admitted_at < :cutoff AND NOT EXISTS "
    "(SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.heartbeat_at >= :cutoff) "
    "ORDER BY admitted_at LIMIT :limit"
)
# The same on PostgreSQL: a process is alive if it beat within the TTL (`:at - :cutoff`) by the
# database's clock, whatever the sweeping replica's clock says.
_STALE_HOLDS_PG = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.admitted_at < :cutoff AND NOT EXISTS "
    "(SELECT 1 FROM instances i WHERE i.id = h.instance_id "
    f"AND i.heartbeat_at >= {DB_NOW_US} - (:at - :cutoff)) "
    "ORDER BY admitted_at LIMIT :limit"
)
# An Idempotency-Key reserved by a request that never settled is freed with its hold.
_FREE_IDEMPOTENCY_KEY = "DELETE FROM idempotency_keys WHERE request_id = :request_id AND state = 'in_flight'"
# This process's own old holds: those it is not settling were lost (see `expire_holds`).
_OWN_STALE_HOLDS = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE instance_id = :instance_id AND admitted_at < :cutoff"
)
_ALLOCATIONS_OF = text(
    "SELECT budget_id, window_start FROM allocations WHERE request_id = :request_id ORDER BY budget_id"
)


def expire_holds(
    conn: Connection,
    cutoff: int,
    at: int,
    limit: int = 500,
    instance_id: str | None = None,
    settling: frozenset[str] = frozenset(),
) -> int:
    """Release holds admitted before `cutoff` whose process stopped beating; returns how many.

    With `instance_id`, also this process's own holds admitted before `cutoff` that it is not
    `settling`: holds it lost track of, as when the connection broke while an admission committed
    (the caller was answered 503, yet the hold was written).

    Safe to run in many processes at once: a hold is released only by whoever deletes its row.
    """
    db = sql_of(conn)
    if conn.dialect.name == "postgresql":
        stale = conn.execute(_STALE_HOLDS_PG, {"cutoff": cutoff, "at": at, "limit": limit})
    else:
        stale = conn.execute(_STALE_HOLDS, {"cutoff": cutoff, "limit": limit})
    rows = list(stale.mappings().all())
    if instance_id is not None:
        own = conn.execute(_OWN_STALE_HOLDS, {"instance_id": instance_id, "cutoff": cutoff}).mappings()
        rows += [row for row in own if row["request_id"] not in settling]
    if conn.dialect.name == "postgresql":
        # The settlement statement, which locks counters in the order admissions do: a sweep of
        # many holds cannot deadlock with them.
        ids = sorted({row["request_id"] for row in rows})
        if not ids:
            return 0
        expired = [
            rid
            for rid, done in zip(
                ids, _settle_pg(conn, [(rid, Settlement("expired"), at) for rid in ids]), strict=True
            )
            if done
        ]
        if expired:
            db.many(_FREE_IDEMPOTENCY_KEY, [(rid,) for rid in expired])
        return len(expired)
    ledger_rows: list[tuple[Any, ...]] = []
    # Released credits per counter, applied last (SQLite: the batch holds the only write lock).
    released: dict[tuple[int, int], tuple[int, int]] = {}
    for row in rows:
        if not db.changed(_DELETE_HOLD, {"request_id": row["request_id"]}):
            continue
        db.many(_FREE_IDEMPOTENCY_KEY, [(row["request_id"],)])
        allocations = conn.execute(_ALLOCATIONS_OF, {"request_id": row["request_id"]}).all()
        # An expired hold charges nothing.
        _release(released, [(b, w) for b, w in allocations], row["credits"], 0)
        ledger_rows.append(
            _ledger_row(
                row["request_id"],
                row["admitted_at"],
                (row["key_id"], row["user_id"], row["team_id"]),
                (row["model"], row["message_count"], row["unit_price"], row["stream"]),
                0,
                Settlement("expired"),
                at,
                (row["end_user"], row["tags"]),
            )
        )
    _write_settlements(db, ledger_rows, released)
    return len(ledger_rows)


_UPSERT_INSTANCE = text(
    "INSERT INTO instances (id, started_at, heartbeat_at) VALUES (:id, :at, :at) "
    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
_FORGET_INSTANCES = text("DELETE FROM instances WHERE heartbeat_at < :cutoff")
_UPSERT_INSTANCE_PG = text(
    f"INSERT INTO instances (id, started_at, heartbeat_at) VALUES (:id, {DB_NOW_US}, {DB_NOW_US}) "
    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
_FORGET_INSTANCES_PG = text(f"DELETE FROM instances WHERE heartbeat_at < {DB_NOW_US} - :age")


def heartbeat(conn: Connection, instance_id: str, at: int, forget_before: int) -> None:
    """Mark this process alive (its holds are not expired) and forget long-dead processes.

    On PostgreSQL the beat is the database's time, not `at` (see DB_NOW_US).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_UPSERT_INSTANCE_PG, {"id": instance_id})
        conn.execute(_FORGET_INSTANCES_PG, {"age": at - forget_before})
        return
    conn.execute(_UPSERT_INSTANCE, {"id": instance_id, "at": at})
    conn.execute(_FORGET_INSTANCES, {"cutoff": forget_before})


def retire(conn: Connection, instance_id: str) -> None:
    """Forget this process on a clean shutdown."""
    conn.execute(text("DELETE FROM instances WHERE id = :id"), {"id": instance_id})
