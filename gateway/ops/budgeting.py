"""Budgets: set, changed, deleted and listed, with end users' defaults; for the CLI and the admin API.

Each function is a unit of work for the store (`fn(conn, ...)`) returning the HTTP API's JSON, and
appends its audit row in the same transaction (see `services`). A budget's subject is stored as an
id (see `subjects`); admission (gateway/core/admission.py) reads the budgets, and makes the end
users' budgets of a default on their first request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Connection, bindparam, text

from gateway.core import alerts
from gateway.core.holding import (
    ANY_END_USER,
    KNOWN_RULES,
    RULE_COLUMNS,
    WINDOWS,
    current_counter,
    end_user_subject,
    learn_rules,
    rule_of,
    window_params,
)
from gateway.core.metering import now_us
from gateway.core.pricing import MICROS, credits_json, parse_credits
from gateway.core.windows import (
    PERIODS,
    UTC_RULE,
    Rule,
    bounds,
    check_month_day,
    check_week_starts,
    check_zone,
    shown,
)
from gateway.errors import InvalidRequest, NotFound
from gateway.ops import alert_events, audit, services, subjects
from gateway.ops.services import INTERNAL, check_choice, check_name

SCOPES = ("team", "user", "key", "end_user")
MAX_LIMIT_MICROS = 10**18


def _subject_id(conn: Connection, scope: str, subject: object) -> tuple[str, int | None]:
    """The stored subject of a team or user name, a key id, or "USER/END_USER" (see `subjects`),
    and for an end-user budget its user's id."""
    subject = check_name("subject", subject)
    if scope == "team":
        return str(services.team_id_of(conn, subject)), None
    if scope == "user":
        return str(services.user_id_of(conn, subject)), None
    if scope == "end_user":
        user_id, _, end_user = subjects.end_user_of(conn, subject)
        return end_user_subject(user_id, end_user), user_id
    if conn.execute(text("SELECT 1 FROM api_keys WHERE id = :id"), {"id": subject}).first() is None:
        raise NotFound(f"No key with id {subject!r}.", field="subject")
    return subject, None


def _is_default(scope: str, stored: str) -> bool:
    return scope == "end_user" and stored.endswith("/" + ANY_END_USER)


def set_budget(
    conn: Connection,
    scope: object,
    subject: object,
    period: object,
    limit: object,
    at: int,
    *,
    actor: str = INTERNAL,
    enforce: object = True,
    alert_at: object = None,
    timezone: object = None,
    week_starts: object = None,
    month_starts_on: object = None,
    rule_defaults: Rule = UTC_RULE,
) -> dict[str, Any]:
    """Create a budget or change its limit; a lower limit blocks requests once spending reaches it.

    `enforce` False makes it soft (counted and alerted on, never refusing); `alert_at` its alert
    thresholds (None: the defaults). Alert thresholds the change reaches are emitted, and those it
    takes spending back below are re-armed (see `alert_events.budget_changed`). `timezone`,
    `week_starts`, `month_starts_on`: where its windows begin (gateway/core/windows.py); each one
    not given stays as the budget has it, or for a new one is `rule_defaults`' (GATEWAY_TIMEZONE,
    GATEWAY_WEEK_STARTS, 1). A budget whose rule changes starts counting in its new rule's window.
    """
    if not isinstance(enforce, bool):
        raise InvalidRequest(f"`enforce` must be true or false; got {enforce!r}.", field="enforce")
    stored_alert_at = None
    if alert_at is not None:
        try:
            stored_alert_at = alerts.render(alerts.check(alert_at, "`alert_at`"))
        except ValueError as exc:
            raise InvalidRequest(f"{exc}.", field="alert_at") from None
    scope = check_choice("scope", scope, SCOPES)
    period = check_choice("period", period, PERIODS)
    try:
        limit_micros = parse_credits(limit)
    except ValueError as exc:
        raise InvalidRequest(f"`limit`: {exc}", field="limit") from None
    if limit_micros > MAX_LIMIT_MICROS:
        # Beyond a 64-bit column: the database would refuse it with an error that is no 400.
        raise InvalidRequest(f"`limit` must be at most {MAX_LIMIT_MICROS // MICROS} credits.", field="limit")
    given = _given_rule(timezone, week_starts, month_starts_on)
    subject_id, user_id = _subject_id(conn, scope, subject)
    before = list_budgets(conn, scope, str(subject), at, period=period)
    # A budget there is keeps its rule; a deleted one set again starts from the defaults.
    kept = (
        Rule(before[0]["timezone"], before[0]["week_starts"], before[0]["month_starts_on"])
        if before
        else rule_defaults
    )
    zone, week_day, month_day = given
    rule = Rule(
        kept.zone if zone is None else zone,
        kept.week_starts if week_day is None else week_day,
        kept.month_starts_on if month_day is None else month_day,
    )
    alerts_before = alert_events.budget_before(conn, scope, subject_id, period)
    budget_id = conn.execute(
        text(
            "INSERT INTO budgets (scope, subject, period, limit_micros, enforce, alert_at, created_at, "
            "updated_at, user_id, timezone, week_starts, month_starts_on) VALUES (:scope, :subject, "
            ":period, :limit, :enforce, :alert_at, :at, :at, :user_id, :timezone, :week_starts, "
            ":month_starts_on) ON CONFLICT (scope, subject, period) "
            # A deleted budget set again is the same budget: its counters, and what they say was
            # spent in the current window, still count. So is an end user's budget that came from
            # a default: from now on it is their own, no longer following the default.
            "DO UPDATE SET limit_micros = excluded.limit_micros, updated_at = excluded.updated_at, "
            "deleted_at = NULL, enforce = excluded.enforce, alert_at = excluded.alert_at, "
            "default_id = NULL, timezone = excluded.timezone, week_starts = excluded.week_starts, "
            "month_starts_on = excluded.month_starts_on RETURNING id"
        ),
        {
            "scope": scope,
            "subject": subject_id,
            "period": period,
            "limit": limit_micros,
            "enforce": enforce,
            "alert_at": stored_alert_at,
            "at": at,
            "user_id": user_id,
            "timezone": rule.zone,
            "week_starts": rule.week_starts,
            "month_starts_on": rule.month_starts_on,
        },
    ).scalar_one()
    alert_events.budget_changed(conn, scope, subject_id, period, alerts_before, at)
    if _is_default(scope, subject_id):
        _follow_default(conn, budget_id, period, (limit_micros, enforce, stored_alert_at), rule, at)
    budget = list_budgets(conn, scope, str(subject), at, period=period)[0]
    target = f"{scope}:{subject}:{period}"
    audit.record(conn, at, actor, "budget.set", target, before[0] if before else None, budget)
    return budget


def _given_rule(timezone: object, week_starts: object, month_starts_on: object) -> tuple[Any, ...]:
    """The parts of a rule given (None: not given), checked: 400 naming the field."""
    checks = (("timezone", timezone, check_zone), ("week_starts", week_starts, check_week_starts))
    given: list[Any] = []
    for field, value, check in (*checks, ("month_starts_on", month_starts_on, check_month_day)):
        try:
            given.append(None if value is None else check(value))
        except ValueError as exc:
            raise InvalidRequest(f"`{field}`: {exc}.", field=field) from None
    return tuple(given)


_LOCK_COUNTERS_MADE_FROM = text(
    "SELECT 1 FROM budget_counters c JOIN budgets b ON b.id = c.budget_id "
    "WHERE b.default_id = :id AND c.window_start = :window ORDER BY c.budget_id FOR UPDATE OF c"
).bindparams(bindparam("window", type_=BigInteger))


def _follow_default(
    conn: Connection,
    default_id: int,
    period: str,
    values: tuple[int, bool, str | None],
    rule: Rule,
    at: int,
) -> None:
    """The end users' budgets created from a default take its new limit, softness, thresholds and
    rule (and live again if the default had been deleted), with their alerts as any budget's change."""
    children = _lock_made_from(conn, default_id, "subject, limit_micros, alert_at, deleted_at")
    if conn.dialect.name == "postgresql":
        # Their counters of this window, which each one's alert check below locks, all locked now
        # in the order admissions and settlements lock counters (by budget id: all of one rank):
        # one by one in subject order, a settlement holding one and waiting for another deadlocked.
        window = bounds(period, at, rule)[0]
        conn.execute(_LOCK_COUNTERS_MADE_FROM, {"id": default_id, "window": window})
    defaults = alert_events.default_thresholds(conn)
    limit, enforce, alert_at = values
    conn.execute(
        text(
            "UPDATE budgets SET limit_micros = :limit, enforce = :enforce, alert_at = :alert_at, "
            "deleted_at = NULL, updated_at = :at, timezone = :timezone, week_starts = :week_starts, "
            "month_starts_on = :month_starts_on WHERE default_id = :id"
        ),
        {
            "limit": limit,
            "enforce": enforce,
            "alert_at": alert_at,
            "at": at,
            "id": default_id,
            "timezone": rule.zone,
            "week_starts": rule.week_starts,
            "month_starts_on": rule.month_starts_on,
        },
    )
    for subject, old_limit, old_alert_at, deleted_at in children:
        before = None if deleted_at is not None else (int(old_limit), alerts.parse(old_alert_at, defaults))
        alert_events.budget_changed(conn, "end_user", subject, period, before, at)


def _lock_made_from(conn: Connection, default_id: int, columns: str) -> list[Any]:
    """The budgets made from a default (`columns` of each), locked on PostgreSQL before any counter,
    in the order admission makes and revives them, (subject, period): an admission reviving some
    of them takes their rows in that order too, and holds no counter until it has."""
    lock = " FOR " + alert_events.BUDGET_LOCK if conn.dialect.name == "postgresql" else ""
    return list(
        conn.execute(
            text(f"SELECT {columns} FROM budgets WHERE default_id = :id ORDER BY subject, period{lock}"),
            {"id": default_id},
        ).all()
    )


def delete_budget(
    conn: Connection,
    scope: object,
    subject: object,
    period: object,
    at: int | None = None,
    *,
    actor: str = INTERNAL,
) -> None:
    """Remove a budget: no limit applies to that subject and period afterwards.

    The row and its counters stay, counting spend but refusing nothing, so that a budget set again
    in the same window is held to what was spent in it (requests in flight meanwhile included),
    and `ledger verify` still checks them.
    """
    scope = check_choice("scope", scope, SCOPES)
    period = check_choice("period", period, PERIODS)
    subject_id, _ = _subject_id(conn, scope, subject)
    at = now_us() if at is None else at
    before = list_budgets(conn, scope, str(subject), at, period=period)
    deleted = conn.execute(
        text(
            "UPDATE budgets SET deleted_at = :at, updated_at = :at WHERE scope = :scope "
            "AND subject = :subject AND period = :period AND deleted_at IS NULL AND default_id IS NULL "
            "RETURNING id"
        ),
        {"scope": scope, "subject": subject_id, "period": period, "at": at},
    ).first()
    if deleted is None:
        if before:
            raise NotFound(
                f"{subject!r} has no {period} budget of their own: theirs follows the default "
                f"{before[0]['from_default']!r}. Change or delete that, or set one of their own.",
                field="subject",
            )
        raise NotFound(f"No {period} {scope} budget for {subject!r}.", field="subject")
    if _is_default(scope, subject_id):
        # Its end users' budgets go with it: counted still, as any deleted budget, refusing nothing.
        _lock_made_from(conn, deleted[0], "id")
        conn.execute(
            text("UPDATE budgets SET deleted_at = :at, updated_at = :at WHERE default_id = :id"),
            {"at": at, "id": deleted[0]},
        )
    audit.record(conn, at, actor, "budget.delete", f"{scope}:{subject}:{period}", before[0], None)


_BUDGET_ROWS = (
    "SELECT b.id, b.scope, b.period, b.limit_micros, " + subjects.SUBJECT_NAME + ", b.enforce, "
    "COALESCE(b.alert_at, (SELECT ad.thresholds FROM alert_defaults ad WHERE ad.id = 1)), "
    "c.spent_micros, c.held_micros, b.subject, b.default_id, eu.name, " + RULE_COLUMNS + " "
    "FROM budgets b " + subjects.SUBJECT_JOINS + " "
)


def list_budgets(
    conn: Connection,
    scope: str | None = None,
    subject: str | None = None,
    at: int | None = None,
    *,
    period: str | None = None,
    expand: bool = False,
) -> list[dict[str, Any]]:
    """Budgets with their current window's spent, held and remaining.

    End users' budgets created from a default are listed with `expand`, or when `subject` names
    the end user; each shows the default it follows (`from_default`).
    """
    at = now_us() if at is None else at
    clauses: list[str] = []
    params: dict[str, Any] = {"at": at}
    if scope is not None:
        clauses.append("b.scope = :scope")
        params["scope"] = check_choice("scope", scope, SCOPES)
        if subject is not None:
            clauses.append("b.subject = :subject")
            params["subject"] = _subject_id(conn, scope, subject)[0]
    elif subject is not None:
        raise InvalidRequest("`subject` needs `scope` beside it.", field="subject")
    if period is not None:
        clauses.append("b.period = :period")
        params["period"] = period
    if not expand and subject is None:
        clauses.append("b.default_id IS NULL")
    return _budget_rows(conn, clauses, params)


def end_user_budgets(conn: Connection, user_id: int, end_user: str, at: int) -> list[dict[str, Any]]:
    """The budgets an end user of a user is held to: their own, and for each other period the
    default they will get their own from on first use (shown as theirs, nothing spent yet)."""
    params: dict[str, Any] = {
        "at": at,
        "own": end_user_subject(user_id, end_user),
        "default": end_user_subject(user_id, ANY_END_USER),
    }
    own = _budget_rows(conn, ["b.scope = 'end_user'", "b.subject = :own"], params)
    defaults = _budget_rows(conn, ["b.scope = 'end_user'", "b.subject = :default"], params)
    theirs = {budget["period"] for budget in own}
    for budget in defaults:
        if budget["period"] not in theirs:
            subject = budget["subject"]
            budget.update(
                subject=subject[: -len(ANY_END_USER)] + end_user,
                spent=0,
                held=0,
                remaining=budget["limit"],
                default=False,
                from_default=subject,
            )
            own.append(budget)
    return sorted(own, key=lambda budget: PERIODS.index(budget["period"]))


def _budget_rows(conn: Connection, clauses: list[str], params: dict[str, Any]) -> list[dict[str, Any]]:
    """The budgets `clauses` select (not deleted), in `list_budgets`' shape, in their windows at
    `params["at"]`."""
    # Every rule there is first: a rule another process made has no window in `WINDOWS` yet.
    learn_rules(conn.execute(text(KNOWN_RULES)).all())
    clauses = [*clauses, "b.deleted_at IS NULL"]
    query = _BUDGET_ROWS + current_counter(conn.dialect.name) + " WHERE " + " AND ".join(clauses)
    # (The windows typed: PostgreSQL cannot tell a CASE's parameters are numbers.)
    windows = (bindparam(period, type_=BigInteger) for period in PERIODS)
    params = dict(params)
    at = params.pop("at")
    params.update(window_params(WINDOWS.at(at)))
    rows = conn.execute(
        text(query + " ORDER BY b.scope, b.subject, b.period").bindparams(*windows), params
    ).all()
    out = []
    for row in rows:
        _, scope_, period_, limit, subject_name, enforce, alert_at, spent, held, stored, default_id, user = (
            row[:12]
        )
        rule = rule_of(*row[12:])
        spent, held = int(spent or 0), int(held or 0)
        window_start, resets_at = shown(period_, bounds(period_, at, rule)[0], rule)
        out.append(
            {
                "scope": scope_,
                "subject": subject_name,
                "period": period_,
                "limit": credits_json(limit),
                "spent": credits_json(spent),
                "held": credits_json(held),
                "remaining": credits_json(max(limit - spent - held, 0)),
                "window_start": window_start,
                "resets_at": resets_at,
                "timezone": rule.zone,
                "week_starts": rule.week_starts,
                "month_starts_on": rule.month_starts_on,
                "enforce": bool(enforce),
                "alert_at": list(alerts.parse(alert_at)),
                "default": _is_default(scope_, stored),
                "from_default": None if default_id is None else f"{user}/{ANY_END_USER}",
            }
        )
    return out
