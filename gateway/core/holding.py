"""What admission shares on both backends: end-user subjects, the budgets' current counters, key
states and their refusals, hold rows, and the words of a budget's refusal (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from gateway.core.metering import Charge, joined
from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import PERIODS, UTC_RULE, Rule, WindowBook, Windows, shown
from gateway.errors import BudgetExceeded, Unauthorized

# The budgets' rules, learned as admission meets them: every batch asks it for its requests' windows.
WINDOWS = WindowBook()

# A budget `b`'s current window key: UTC/monday/1 budgets' (all of them before rules existed) bound
# as :daily, :weekly, :monthly and :total (`Windows.utc`, as before rules); any other rule's looked up
# in :windows (`Windows.json`) by "ZONE WEEK_DAY MONTH_DAY PERIOD" (`Rule.label`): NULL for a rule
# it lacks (whoever reads then learns the rules, `learn_rules`, and reads again).
_UTC_WINDOW = "CASE b.period " + " ".join(f"WHEN '{period}' THEN :{period}" for period in PERIODS) + " END"
_LABEL = "b.timezone || ' ' || b.week_starts || ' ' || b.month_starts_on || ' ' || b.period"
_IS_UTC_RULE = "b.timezone = 'UTC' AND b.week_starts = 'monday' AND b.month_starts_on = 1"
WINDOW_OF_BUDGET = f"CASE WHEN {_IS_UTC_RULE} THEN {_UTC_WINDOW} ELSE :windows ->> ({_LABEL}) END"
_WINDOW_OF_BUDGET_PG = (
    f"CASE WHEN {_IS_UTC_RULE} THEN {_UTC_WINDOW} "
    f"ELSE CAST(CAST(:windows AS jsonb) ->> ({_LABEL}) AS bigint) END"
)
# The budget's rule, as `rule_of` reads it.
RULE_COLUMNS = "b.timezone, b.week_starts, b.month_starts_on"

# SQLite: joins each budget `b` to its counter `c` of its current window (`WINDOW_OF_BUDGET`); NULLs
# where that window has no counter yet. In a batch, which holds the write lock, nothing read with it
# can change before the admission's own updates.
CURRENT_COUNTER = f"LEFT JOIN budget_counters c ON c.budget_id = b.id AND c.window_start = {WINDOW_OF_BUDGET}"


def current_counter(dialect: str) -> str:
    """`CURRENT_COUNTER` in the dialect's SQL (its parameters: `window_params`)."""
    if dialect == "postgresql":
        return (
            f"LEFT JOIN budget_counters c ON c.budget_id = b.id AND c.window_start = {_WINDOW_OF_BUDGET_PG}"
        )
    return CURRENT_COUNTER


def window_params(windows: Windows) -> dict[str, Any]:
    """The parameters of `WINDOW_OF_BUDGET` for these windows."""
    return {**windows.utc, "windows": windows.json}


# Every rule budgets use; for whoever met a budget whose rule `WINDOWS` did not know.
KNOWN_RULES = "SELECT DISTINCT timezone, week_starts, month_starts_on FROM budgets"


def rule_of(zone: str, week_starts: str, month_starts_on: int) -> Rule:
    """A budget's rule from its columns (`RULE_COLUMNS`)."""
    if zone == "UTC" and week_starts == "monday" and month_starts_on == 1:
        return UTC_RULE
    return Rule(zone, week_starts, int(month_starts_on))


def learn_rules(rows: Iterable[Sequence[Any]]) -> None:
    """Make `WINDOWS` know the rules of these rows (`KNOWN_RULES`' columns)."""
    WINDOWS.learn({rule_of(*row) for row in rows})


# The end user of a user's default end-user budgets (stored subject "USER_ID/*"): every end user
# of theirs without a budget of their own. No request may name an end user so (web/attribution.py).
ANY_END_USER = "*"


def end_user_subject(user_id: int, end_user: str) -> str:
    """How an end-user budget stores its subject: "USER_ID/END_USER" (`ANY_END_USER`: the defaults).

    The same text as gateway_admit_batch builds on PostgreSQL (migration 0010)."""
    return f"{user_id}/{end_user}"


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


def hold_row(charge: Charge, instance_id: str, at: int) -> tuple[Any, ...]:
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


def caller_and_span(charge: Charge, windows: Windows) -> Hashable:
    """Requests with the same key and budgets: one caller's, in the same windows."""
    caller = charge.caller
    return (caller.key_id, caller.user_id, caller.team_id, windows.lo)


def refusal(
    charge: Charge,
    scope: str,
    period: str,
    limit: int,
    window: int,
    spent: int,
    held: int,
    rule: Rule = UTC_RULE,
) -> BudgetExceeded:
    """The 402 of a budget the charge does not fit in; its reset shown in the budget's zone."""
    caller = charge.caller
    subject: str | None
    if scope == "end_user":
        subject = f"{caller.user_name}/{charge.end_user}"
        whose = f"end-user budget of {charge.end_user!r} (an end user of {caller.user_name!r})"
    else:
        subject = {"team": caller.team_name, "user": caller.user_name, "key": caller.key_id}[scope]
        whose = f"{scope} budget of {subject!r}"
    remaining = max(limit - spent - held, 0)
    resets_at = shown(period, window, rule)[1]
    return BudgetExceeded(
        f"This request costs {format_credits(charge.credits)} credits but the {period} {whose} has "
        f"{format_credits(remaining)} of {format_credits(limit)} left. "
        + (
            "It does not reset; ask an administrator to raise it."
            if period == "total"
            else f"Wait until it resets at {resets_at} or ask an administrator to raise it."
        ),
        scope=scope,
        subject=subject,
        period=period,
        limit=credits_json(limit),
        spent=credits_json(spent),
        held=credits_json(held),
        remaining=credits_json(remaining),
        cost=credits_json(charge.credits),
        resets_at=resets_at,
        **({"end_user": charge.end_user} if scope == "end_user" else {}),
    )
