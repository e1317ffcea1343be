"""Admission on SQLite: a batch's calls decided in Python, in order, under the batch's write lock,
then written with one statement per table and one conditional update per counter."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from typing import Any

from gateway.core.holding import (
    ANY_END_USER,
    CURRENT_COUNTER,
    KNOWN_RULES,
    RULE_COLUMNS,
    WINDOW_OF_BUDGET,
    WINDOWS,
    caller_and_span,
    end_user_subject,
    hold_row,
    key_refused,
    key_state,
    learn_rules,
    refusal,
    rule_of,
    window_params,
)
from gateway.core.limits_sqlite import LimitBatch
from gateway.core.metering import Admission, Charge, Refusal
from gateway.core.windows import Rule, Windows
from gateway.errors import BudgetExceeded
from gateway.store import Sql

# `enforce`: whether the budget refuses (not a soft budget, nor one deleted, which still counts);
# then the window it holds on now (NULL: a rule `WINDOWS` does not know yet) and its rule.
_SELECT_BUDGETS = (
    "SELECT b.id, b.scope, b.period, b.limit_micros, c.spent_micros, c.held_micros, "
    "b.enforce AND b.deleted_at IS NULL, b.deleted_at IS NULL, b.subject, "
    f"{WINDOW_OF_BUDGET}, {RULE_COLUMNS} "
)
# The key, user and team budgets of a batch's callers, their users' end-user defaults (`USER_ID/*`:
# no counter of their own; read to know whether end users need `ADOPT_DEFAULTS`), and the budgets of
# the end users their requests name: one query for the whole batch, its (scope, subject) pairs one
# JSON array, each pair one search of the budgets' unique index. (Four `subject IN (json_each)`
# lists joined by OR cost twice as much: SQLite evaluates each list twice.)
_BUDGETS_AND_COUNTERS = (
    _SELECT_BUDGETS + "FROM json_each(:subjects) s CROSS JOIN budgets b "
    f"ON b.scope = s.value ->> 0 AND b.subject = s.value ->> 1 {CURRENT_COUNTER}"
)
_END_USER_BUDGETS = (
    _SELECT_BUDGETS + f"FROM budgets b {CURRENT_COUNTER} WHERE b.scope = 'end_user' AND b.subject = :end_user"
)
# An end user's budgets from their user's defaults (`USER_ID/*`), for each period they have none of
# their own in: created at the default's limit on first use, or one deleted becomes the default's
# again (gateway_admit_batch does the same on PostgreSQL).
ADOPT_DEFAULTS = (
    "INSERT INTO budgets AS b (scope, subject, period, limit_micros, enforce, alert_at, created_at, "
    "updated_at, user_id, default_id, timezone, week_starts, month_starts_on) "
    "SELECT 'end_user', :end_user, d.period, d.limit_micros, d.enforce, d.alert_at, :at, :at, "
    "d.user_id, d.id, d.timezone, d.week_starts, d.month_starts_on "
    "FROM budgets d WHERE d.scope = 'end_user' AND d.subject = :defaults AND d.deleted_at IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM budgets o WHERE o.scope = 'end_user' AND o.subject = :end_user "
    "AND o.period = d.period AND o.deleted_at IS NULL) "
    "ON CONFLICT (scope, subject, period) DO UPDATE SET limit_micros = excluded.limit_micros, "
    "enforce = excluded.enforce, alert_at = excluded.alert_at, default_id = excluded.default_id, "
    "deleted_at = NULL, updated_at = excluded.updated_at, timezone = excluded.timezone, "
    "week_starts = excluded.week_starts, month_starts_on = excluded.month_starts_on "
    "WHERE b.deleted_at IS NOT NULL"
)


# Creates the window's counter with these holds (one request's, or a group's sum), or adds them to
# it, only if they still fit (or add nothing, or the budget does not refuse): one row changed, or
# none. The limit is read inside the statement so a budget change is never missed.
# (No RETURNING: SQLite buffers a RETURNING statement's rows in a temporary B-tree of its own.)
PLACE_HOLD = (
    "INSERT INTO budget_counters (budget_id, window_start, spent_micros, held_micros) "
    "SELECT b.id, :window, 0, :credits FROM budgets b WHERE b.id = :budget AND (:credits <= b.limit_micros "
    "OR :credits = 0 OR NOT b.enforce OR b.deleted_at IS NOT NULL) "
    "ON CONFLICT (budget_id, window_start) DO UPDATE "
    "SET held_micros = budget_counters.held_micros + excluded.held_micros "
    "WHERE excluded.held_micros = 0 OR (SELECT budget_counters.spent_micros + budget_counters.held_micros "
    "+ excluded.held_micros <= b.limit_micros OR NOT b.enforce OR b.deleted_at IS NOT NULL "
    "FROM budgets b WHERE b.id = excluded.budget_id)"
)
# The batch's keys' states, and the keys that replaced them (`keys rotate`): during the grace, a
# key's budgets, which moved to that key, still hold requests through this one. (A join on the
# JSON array of distinct ids: an `IN (json_each)` list is first made into a temporary index.)
_KEY_STATES = (
    "SELECT k.id, k.revoked_at, k.blocked_at, k.expires_at, k.rotated_to "
    "FROM json_each(:keys) j CROSS JOIN api_keys k ON k.id = j.value"
)

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


def admit_sqlite(db: Sql, calls: Sequence[tuple[Charge, str, int]]) -> list[tuple[bool, Admission | Refusal]]:
    """SQLite: decided here, in order, then written with one statement per table and counter.

    A budget whose rule `WINDOWS` does not know yet (made by another process) is met in a read:
    the rules are then learned and the batch decided again from the start (only its end users'
    budgets made from defaults were written by then, which the second run finds made).
    """
    try:
        return _admit(db, calls)
    except _NewRule:
        learn_rules(db.all(KNOWN_RULES, {}))
        return _admit(db, calls)


def _admit(db: Sql, calls: Sequence[tuple[Charge, str, int]]) -> list[tuple[bool, Admission | Refusal]]:
    """`admit_sqlite`, with every rule the budgets read have known.

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
    # Per caller and span of windows: why the key is refused (None: live), its budgets (`Budget`),
    # and the periods of its user's end-user defaults; per user, end user and span, the end user's
    # budgets. (One key serving many end users reads its own budgets once.)
    budgets_of: dict[Hashable, tuple[str | None, list[Budget], frozenset[str]]] = {}
    end_user_budgets_of: dict[Hashable, list[Budget]] = {}
    results: list[tuple[bool, Admission | Refusal]] = []
    holds: list[tuple[Any, ...]] = []
    allocation_rows: list[tuple[Any, ...]] = []
    # Per span of windows (a UTC day, unless a known rule's window begins in it): every caller's key
    # state and budget rows of that span's calls, read at once.
    read_of_span: dict[int, BatchRead] = {}
    # Limits, only for callers the key cache found may have one: nothing read otherwise.
    limited = [c for c, _, _ in calls if c.caller.limited]
    limits = LimitBatch(db, limited) if limited else None
    for charge, instance_id, at in calls:
        windows = WINDOWS.at(at)
        who = caller_and_span(charge, windows)
        whom = (charge.caller.user_id, charge.end_user, windows.lo)
        known = budgets_of.get(who)
        if known is None:
            span = windows.lo
            read = read_of_span.get(span)
            if read is None:
                read = read_of_span[span] = _read_batch(
                    db, [c for c, _, t in calls if span <= t < windows.hi], windows
                )
            known, theirs = _read_caller(db, charge, read, windows, at, counters)
            budgets_of[who] = known
            if theirs is not None:
                end_user_budgets_of[whom] = theirs
        state, budgets, defaults = known
        if state is not None:
            results.append((False, key_refused(state)))
            continue
        # Limits before budgets: a request too early is told to wait, not that it is broke.
        if limits is not None and charge.caller.limited:
            too_early = limits.judge(charge, at)
            if too_early is not None:
                results.append((False, too_early))
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
        refused: BudgetExceeded | None = None
        remaining: int | None = None
        for budget_id, scope, period, window, enforce, rule in budgets:
            if not enforce:
                continue
            limit, spent, held, _ = counters[(budget_id, window)]
            left = limit - spent - held - credits
            if left < 0 and credits > 0:
                refused = refusal(charge, scope, period, limit, window, spent, held, rule)
                break
            remaining = left if remaining is None else min(remaining, left)
        if refused is not None:
            results.append((False, refused))
            continue
        allocations = tuple((budget_id, window) for budget_id, _, _, window, _, _ in budgets)
        for allocation in allocations:
            counter = counters[allocation]
            counter[2] += credits
            counter[3] += credits
            placed.add(allocation)
            allocation_rows.append((charge.request_id, allocation[0], allocation[1], credits))
        holds.append(hold_row(charge, instance_id, at))
        headers = limits.take(charge, at) if limits is not None and charge.caller.limited else None
        results.append((True, Admission(charge, at, allocations, remaining, headers or None)))
    if holds:
        db.many(_INSERT_HOLD, holds)
    if limits is not None:
        limits.write(db)
    if allocation_rows:
        db.many(_INSERT_ALLOCATION, allocation_rows)
    # The counters still change only through the conditional update, which cannot fail here: the
    # write lock has been held since the reads above. If it ever did, the admissions are a bug, not
    # refusals: the group rolls back (nothing of it stays), and its calls are run one by one, where
    # those it fails again are answered 500.
    # Each row changes one counter or none, so all of them took their holds when as many changed.
    rows = [(window, counters[(budget_id, window)][3], budget_id) for budget_id, window in sorted(placed)]
    if rows and (changed := db.many(PLACE_HOLD, rows)) != len(rows):
        raise CounterMismatch(
            f"{len(rows) - changed} of {len(rows)} counters refused holds their read said fit"
        )
    return results


# A budget as admission holds on it: (id, scope, period, window, enforce, rule).
Budget = tuple[int, str, str, int, bool, Rule]


class _NewRule(Exception):
    """A budget read has a rule `WINDOWS` does not know (so its window and counter were not read)."""


class BatchRead:
    """What a batch's calls of one span of windows read at once: key states by key id (each
    (revoked_at, blocked_at, expires_at, rotated_to)), and budget rows (with their counters in that
    span's windows) by (scope, subject)."""

    __slots__ = ("budgets", "keys")

    def __init__(self, keys: dict[str, Any], budgets: dict[tuple[str, str], list[Any]]) -> None:
        self.keys = keys
        self.budgets = budgets


def _read_batch(db: Sql, charges: Sequence[Charge], windows: Windows) -> BatchRead:
    """Two queries for any number of callers: their keys, then every budget any of them may hold
    on. (One query each per caller cost a 200-key organisation two statements a request.)"""
    key_ids = sorted({c.caller.key_id for c in charges})
    keys = {row[0]: row[1:] for row in db.all(_KEY_STATES, {"keys": json.dumps(key_ids)})}
    successors = {row[3] for row in keys.values() if row[3] is not None}
    users = {str(c.caller.user_id) for c in charges}
    end_users = {end_user_subject(c.caller.user_id, ANY_END_USER) for c in charges}
    end_users.update(
        end_user_subject(c.caller.user_id, c.end_user) for c in charges if c.end_user is not None
    )
    teams = {str(c.caller.team_id) for c in charges if c.caller.team_id is not None}
    subjects = [
        *(("key", key_id) for key_id in sorted({*key_ids, *successors})),
        *(("user", user) for user in sorted(users)),
        *(("team", team) for team in sorted(teams)),
        *(("end_user", end_user) for end_user in sorted(end_users)),
    ]
    params = {**window_params(windows), "subjects": json.dumps(subjects)}
    budgets: dict[tuple[str, str], list[Any]] = {}
    for row in db.all(_BUDGETS_AND_COUNTERS, params):
        budgets.setdefault((row[1], row[8]), []).append(row)
    return BatchRead(keys, budgets)


def _read_caller(
    db: Sql,
    charge: Charge,
    read: BatchRead,
    windows: Windows,
    at: int,
    counters: dict[tuple[int, int], list[int]],
) -> tuple[tuple[str | None, list[Budget], frozenset[str]], list[Budget] | None]:
    """The charge's caller: its key state, its key, user and team budgets, the periods of its
    user's end-user defaults; and the budgets of the end user the charge names (None when it names
    none, or the key is refused), all from the batch's `read`. Their counters go into `counters`."""
    caller = charge.caller
    key = read.keys.get(caller.key_id)
    state = "revoked" if key is None else key_state(key[0], key[1], key[2], at)
    budgets_of = read.budgets
    defaults_subject = end_user_subject(caller.user_id, ANY_END_USER)
    subjects = [("key", caller.key_id), ("user", str(caller.user_id))]
    if key is not None and key[3] is not None:
        subjects.append(("key", key[3]))
    if caller.team_id is not None:
        subjects.append(("team", str(caller.team_id)))
    mine = [row for subject in subjects for row in budgets_of.get(subject, ())]
    defaults = frozenset(row[2] for row in budgets_of.get(("end_user", defaults_subject), ()) if row[7])
    budgets = _counted(mine, counters)
    theirs = None
    if charge.end_user is not None and state is None:
        subject = end_user_subject(caller.user_id, charge.end_user)
        theirs = _read_end_user(
            db, charge, defaults, windows, at, counters, list(budgets_of.get(("end_user", subject), ()))
        )
    return (state, budgets, defaults), theirs


def _read_end_user(
    db: Sql,
    charge: Charge,
    defaults: frozenset[str],
    windows: Windows,
    at: int,
    counters: dict[tuple[int, int], list[int]],
    read: list[Any] | None = None,
) -> list[Budget]:
    """The budgets of the charge's end user (`read` already, or read here), their counters added
    to `counters`; first those their user's `defaults` (periods) give them, where they have no live
    one of their own yet."""
    assert charge.end_user is not None
    subject = end_user_subject(charge.caller.user_id, charge.end_user)
    params = {**window_params(windows), "end_user": subject}
    if read is None:
        read = db.all(_END_USER_BUDGETS, params)
    if defaults - {row[2] for row in read if row[7]}:
        defaults_subject = end_user_subject(charge.caller.user_id, ANY_END_USER)
        db.changed(ADOPT_DEFAULTS, {"end_user": subject, "defaults": defaults_subject, "at": at})
        read = db.all(_END_USER_BUDGETS, params)
    return _counted(read, counters)


def _counted(read: Sequence[Any], counters: dict[tuple[int, int], list[int]]) -> list[Budget]:
    """Budgets as read (with their counter in the current window), in id order; each counter goes
    into `counters` unless this group has it already: then it is as the group's holds left it."""
    budgets = []
    for budget_id, scope, period, limit, spent, held, enforce, _, _, window, *rule in sorted(read):
        if window is None:
            raise _NewRule
        counters.setdefault((budget_id, window), [limit, spent or 0, held or 0, 0])
        budgets.append((budget_id, scope, period, window, bool(enforce), rule_of(*rule)))
    return budgets


class CounterMismatch(RuntimeError):
    """A counter disagreed with what the same transaction read of it a moment before (a bug)."""
