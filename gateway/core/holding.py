"""What admission shares on both backends: end-user subjects, the budgets' current counters, key
states and their refusals, hold rows, and the words of a budget's refusal (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from gateway.core.metering import Charge, joined
from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import DAY_US, PERIODS, from_key, isoformat, window_end
from gateway.errors import BudgetExceeded, Unauthorized

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


def caller_and_day(charge: Charge, at: int) -> Hashable:
    """Requests with the same key and budgets: one caller's, the same UTC day."""
    caller = charge.caller
    return (caller.key_id, caller.user_id, caller.team_id, at // DAY_US)


def refusal(
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
