"""Rate and concurrency limits: set, deleted and listed, for the CLI and the admin API (contract §13).

Each function is a unit of work for the store (`fn(conn, ...)`) returning the HTTP API's JSON, and
appends its audit row in the same transaction. Subjects are stored as budgets store them (see
`subjects`); admission (gateway/core/ratelimits.py) applies the limits. Key caches learn that a key
is limited when they next load it (within GATEWAY_CACHE_TTL_SECONDS on other processes).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from gateway.core.holding import ANY_END_USER, end_user_subject
from gateway.core.metering import Caller, now_us
from gateway.core.pricing import credits_json, parse_credits
from gateway.core.ratelimits import KINDS, PERIODS, SECOND_US, limit_json, remaining, reset_text
from gateway.errors import InvalidRequest, NotFound
from gateway.ops import audit, budgeting, subjects
from gateway.ops.services import INTERNAL, check_choice

SCOPES = budgeting.SCOPES
# At most a million requests a second (a request then still moves a rate by a whole microsecond),
# and as many in flight.
MAX_REQUESTS_PER_SECOND = 1_000_000
MAX_CONCURRENT = 1_000_000

_LIMIT_ROWS = (
    "SELECT b.id, b.scope, " + subjects.SUBJECT_NAME + ", b.kind, b.limit_value, b.per_seconds, "
    "b.subject FROM rate_limits b " + subjects.SUBJECT_JOINS
)


def limit_value_of(kind: str, limit: object, per_seconds: int) -> int:
    """The stored limit: requests or requests in flight, or micro-credits; InvalidRequest if bad."""
    if kind == "credits":
        try:
            micros = parse_credits(limit)
        except ValueError as exc:
            raise InvalidRequest(f"`limit`: {exc}", field="limit") from None
        if micros <= 0 or micros > budgeting.MAX_LIMIT_MICROS:
            raise InvalidRequest(
                f"`limit` must be more than 0 and at most {budgeting.MAX_LIMIT_MICROS // SECOND_US} credits.",
                field="limit",
            )
        return micros
    if isinstance(limit, str) and limit.strip().isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidRequest(f"`limit` must be a whole number greater than 0; got {limit!r}.", field="limit")
    most = MAX_CONCURRENT if kind == "concurrent" else MAX_REQUESTS_PER_SECOND * per_seconds
    if limit > most:
        raise InvalidRequest(f"`limit` must be at most {most}; got {limit}.", field="limit")
    return limit


def per_seconds_of(kind: str, per: object) -> int:
    if kind == "concurrent":
        if per is not None:
            raise InvalidRequest(
                "A `concurrent` limit has no `per`: it counts requests in flight.", field="per"
            )
        return 0
    return PERIODS[check_choice("per", "minute" if per is None else per, tuple(PERIODS))]


def set_limit(
    conn: Connection,
    scope: object,
    subject: object,
    kind: object,
    limit: object,
    per: object = None,
    at: int | None = None,
    *,
    actor: str = INTERNAL,
) -> dict[str, Any]:
    """Create a limit, or change the number of the one of that scope, subject, kind and period.

    `per` (second, minute, hour, day; default minute) for `requests` and `credits`; none for
    `concurrent`. A changed rate keeps its state: what was admitted lately still counts.
    """
    scope = check_choice("scope", scope, SCOPES)
    kind = check_choice("kind", kind, KINDS)
    per_seconds = per_seconds_of(kind, per)
    value = limit_value_of(kind, limit, per_seconds)
    stored, user_id = _subject(conn, scope, subject)
    at = now_us() if at is None else at
    params = {"scope": scope, "subject": stored, "kind": kind, "per": per_seconds}
    same = "b.scope = :scope AND b.subject = :subject AND b.kind = :kind AND b.per_seconds = :per"
    before = _rows(conn, same, params)
    limit_id = conn.execute(
        text(
            "INSERT INTO rate_limits (scope, subject, kind, limit_value, per_seconds, user_id, created_at, "
            "updated_at) VALUES (:scope, :subject, :kind, :limit, :per, :user_id, :at, :at) "
            "ON CONFLICT (scope, subject, kind, per_seconds) DO UPDATE SET "
            "limit_value = excluded.limit_value, updated_at = excluded.updated_at RETURNING id"
        ),
        {**params, "limit": value, "user_id": user_id, "at": at},
    ).scalar_one()
    (after,) = _rows(conn, "b.id = :id", {"id": limit_id})
    audit.record(conn, at, actor, "limit.set", _target(after), before[0] if before else None, after)
    return after


def delete_limit(conn: Connection, limit_id: object, at: int | None = None, *, actor: str = INTERNAL) -> None:
    """Remove a limit (and its state): it refuses nothing from now on."""
    number = _id(limit_id)
    before = _rows(conn, "b.id = :id", {"id": number})
    if not before:
        raise NotFound(f"No limit with id {limit_id!r}.", field="id")
    conn.execute(text("DELETE FROM rate_limit_state WHERE limit_id = :id"), {"id": number})
    conn.execute(text("DELETE FROM rate_limits WHERE id = :id"), {"id": number})
    at = now_us() if at is None else at
    audit.record(conn, at, actor, "limit.delete", _target(before[0]), before[0], None)


def list_limits(
    conn: Connection, scope: str | None = None, subject: str | None = None
) -> list[dict[str, Any]]:
    """Every limit, or a scope's, or one subject's."""
    clauses = []
    params: dict[str, Any] = {}
    if scope is not None:
        params["scope"] = check_choice("scope", scope, SCOPES)
        clauses.append("b.scope = :scope")
        if subject is not None:
            params["subject"] = _subject(conn, params["scope"], subject)[0]
            clauses.append("b.subject = :subject")
    elif subject is not None:
        raise InvalidRequest("`subject` needs `scope` beside it.", field="subject")
    return _rows(conn, " AND ".join(clauses) or "1 = 1", params)


def caller_limits(conn: Connection, caller: Caller, at: int) -> list[dict[str, Any]]:
    """The limits that apply to a caller's requests (for `/api/v1/usage`), each with what it has
    left now: rates from their state, `concurrent` from the open holds of its subject."""
    params = {
        "key": caller.key_id,
        "user": str(caller.user_id),
        "team": "" if caller.team_id is None else str(caller.team_id),
        "defaults": end_user_subject(caller.user_id, ANY_END_USER),
    }
    rows = _stored_rows(
        conn,
        "(b.scope = 'key' AND b.subject = :key) OR (b.scope = 'user' AND b.subject = :user) "
        "OR (b.scope = 'team' AND b.subject = :team) OR (b.scope = 'end_user' AND b.subject = :defaults)",
        params,
    )
    out = []
    for row, stored, limit_value, per_seconds in rows:
        if row["kind"] == "concurrent":
            row["in_flight"] = _in_flight(conn, row["scope"], stored)
        elif row["scope"] != "end_user":
            state = conn.execute(
                text("SELECT tat_us FROM rate_limit_state WHERE limit_id = :id AND subject = :subject"),
                {"id": row["id"], "subject": stored},
            ).first()
            tat = 0 if state is None else int(state[0])
            left = remaining(row["kind"], limit_value, per_seconds * SECOND_US, tat, at)
            row["remaining"] = left if row["kind"] == "requests" else credits_json(max(left, 0))
            row["reset"] = reset_text(tat - at)
        out.append(row)
    return out


def _in_flight(conn: Connection, scope: str, stored: str) -> int | None:
    column = {"key": "key_id", "user": "CAST(user_id AS VARCHAR)", "team": "CAST(team_id AS VARCHAR)"}
    if scope not in column:
        return None  # each end user counts their own
    row = conn.execute(text(f"SELECT count(*) FROM holds WHERE {column[scope]} = :s"), {"s": stored}).first()
    return int(row[0]) if row is not None else 0


def _subject(conn: Connection, scope: str, subject: object) -> tuple[str, int | None]:
    """The stored subject, as a budget's (see `budgeting`); an unknown one is a 404 naming `subject`."""
    try:
        return budgeting._subject_id(conn, scope, subject)
    except NotFound as exc:
        raise NotFound(exc.message, field="subject") from None


def _id(limit_id: object) -> int:
    if isinstance(limit_id, str) and limit_id.isdigit():
        return int(limit_id)
    if isinstance(limit_id, int) and not isinstance(limit_id, bool):
        return limit_id
    raise InvalidRequest(f"A limit's id is a whole number; got {limit_id!r}.", field="id")


def _target(limit: dict[str, Any]) -> str:
    per = f":{limit['per']}" if limit["per"] else ""
    return f"{limit['scope']}:{limit['subject']}:{limit['kind']}{per}"


def _rows(conn: Connection, where: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The limits `where` selects, in the API's shape."""
    return [shape for shape, _, _, _ in _stored_rows(conn, where, params)]


def _stored_rows(
    conn: Connection, where: str, params: dict[str, Any]
) -> list[tuple[dict[str, Any], str, int, int]]:
    """The limits `where` selects, each as (the API's shape, stored subject, stored limit, per seconds)."""
    found = conn.execute(text(f"{_LIMIT_ROWS} WHERE {where} ORDER BY b.id"), params).all()
    out = []
    for limit_id, scope, name, kind, value, per_seconds, subject in found:
        shape = limit_json(limit_id, scope, name, kind, value, per_seconds, subject)
        out.append((shape, subject, int(value), int(per_seconds)))
    return out
