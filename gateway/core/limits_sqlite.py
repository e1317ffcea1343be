"""Rate and concurrency limits on SQLite: a batch's limited calls judged in Python under the batch's
write lock (see `admission_sqlite`), their states written with one statement at its end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.core import ratelimits
from gateway.core.holding import ANY_END_USER, end_user_subject
from gateway.core.metering import Charge
from gateway.core.ratelimits import SECOND_US, Limit
from gateway.errors import RateLimited
from gateway.store import Sql

# Every limit that may apply to the batch's callers: their keys', users', teams', and their users'
# end users' (explicit and defaults; which apply is decided per request below).
_LIMITS = (
    "SELECT id, scope, subject, kind, limit_value, per_seconds FROM rate_limits "
    "WHERE (scope = 'key' AND subject IN (SELECT value FROM json_each(:keys))) "
    "OR (scope = 'user' AND subject IN (SELECT value FROM json_each(:users))) "
    "OR (scope = 'team' AND subject IN (SELECT value FROM json_each(:teams))) "
    "OR (scope = 'end_user' AND user_id IN (SELECT value FROM json_each(:user_ids)))"
)
_STATES = (
    "SELECT s.limit_id, s.subject, s.tat_us FROM rate_limit_state s "
    "JOIN json_each(:pairs) p ON s.limit_id = json_extract(p.value, '$[0]') "
    "AND s.subject = json_extract(p.value, '$[1]')"
)
_WRITE_STATE = (
    "INSERT INTO rate_limit_state (limit_id, subject, tat_us) VALUES (:id, :subject, :tat) "
    "ON CONFLICT (limit_id, subject) DO UPDATE SET tat_us = excluded.tat_us"
)
# The holds open of a `concurrent` subject (the batch's own are written after it is decided).
_OPEN = {
    "key": "SELECT count(*) FROM holds WHERE key_id = :subject",
    "user": "SELECT count(*) FROM holds WHERE user_id = CAST(:subject AS INTEGER)",
    "team": "SELECT count(*) FROM holds WHERE team_id = CAST(:subject AS INTEGER)",
    "end_user": "SELECT count(*) FROM holds WHERE user_id = :user_id AND end_user = :end_user",
}


class LimitBatch:
    """The limits of a batch's limited calls, with their states as the calls decided so far left them."""

    __slots__ = ("_limits_of", "_open", "_tat", "_written")

    def __init__(self, db: Sql, charges: Sequence[Charge]) -> None:
        callers = [c.caller for c in charges]
        params = {
            "keys": json.dumps(sorted({c.key_id for c in callers})),
            "users": json.dumps(sorted({str(c.user_id) for c in callers})),
            "teams": json.dumps(sorted({str(c.team_id) for c in callers if c.team_id is not None})),
            "user_ids": json.dumps(sorted({c.user_id for c in callers})),
        }
        rows: dict[tuple[str, str], list[Any]] = {}
        for row in db.all(_LIMITS, params):
            rows.setdefault((row[1], row[2]), []).append(row)
        self._limits_of: dict[tuple[str, int, int | None, str | None], list[Limit]] = {}
        for charge in charges:
            self._limits_of.setdefault(_who(charge), _resolve(charge, rows))
        pairs = sorted({(lim.id, lim.state) for limits in self._limits_of.values() for lim in limits})
        states = db.all(_STATES, {"pairs": json.dumps(pairs)})
        self._tat: dict[tuple[int, str], int] = {(row[0], row[1]): row[2] for row in states}
        self._open: dict[tuple[str, str], int] = {}
        for limits in self._limits_of.values():
            for lim in limits:
                if lim.kind == "concurrent" and (lim.scope, lim.state) not in self._open:
                    self._open[(lim.scope, lim.state)] = _count_open(db, lim)
        self._written: set[tuple[int, str]] = set()

    def judge(self, charge: Charge, at: int) -> RateLimited | None:
        """The refusal of the first limit (in id order) that does not admit the charge, or None."""
        for lim in self._limits_of[_who(charge)]:
            if lim.kind == "concurrent":
                in_flight = self._open[(lim.scope, lim.state)]
                if in_flight >= lim.limit:
                    return self._refused(charge, lim, 0, in_flight, at)
                continue
            tat = self._tat.get((lim.id, lim.state), 0)
            inc = ratelimits.increment(lim.kind, lim.limit, lim.per_us, charge.credits)
            if not ratelimits.admits(tat, at, inc, lim.per_us):
                return self._refused(charge, lim, tat, 0, at)
        return None

    def take(self, charge: Charge, at: int) -> dict[str, str]:
        """Count an admitted charge on its limits; the x-ratelimit-* headers after it."""
        figures = []
        for lim in self._limits_of[_who(charge)]:
            if lim.kind == "concurrent":
                self._open[(lim.scope, lim.state)] += 1
                continue
            where = (lim.id, lim.state)
            inc = ratelimits.increment(lim.kind, lim.limit, lim.per_us, charge.credits)
            tat = self._tat[where] = ratelimits.advanced(self._tat.get(where, 0), at, inc)
            self._written.add(where)
            figures.append((lim, tat))
        return ratelimits.rate_headers(figures, at)

    def write(self, db: Sql) -> None:
        """Write the states the batch's admissions moved."""
        if self._written:
            db.many(
                _WRITE_STATE,
                [(where[0], where[1], self._tat[where]) for where in sorted(self._written)],
            )

    @staticmethod
    def _refused(charge: Charge, lim: Limit, tat: int, in_flight: int, at: int) -> RateLimited:
        caller = charge.caller
        subject = ratelimits.subject_name(
            lim.scope, lim.state, caller.key_id, caller.user_name, caller.team_name
        )
        return ratelimits.refused(lim, subject, tat, in_flight, at, charge.credits)


def _who(charge: Charge) -> tuple[str, int, int | None, str | None]:
    caller = charge.caller
    return (caller.key_id, caller.user_id, caller.team_id, charge.end_user)


def _resolve(charge: Charge, rows: dict[tuple[str, str], list[Any]]) -> list[Limit]:
    """The limits that apply to the charge, in id order (an end user's own limit of a kind and
    period replaces their user's default of the same)."""
    caller = charge.caller
    found = [*rows.get(("key", caller.key_id), ()), *rows.get(("user", str(caller.user_id)), ())]
    if caller.team_id is not None:
        found += rows.get(("team", str(caller.team_id)), ())
    limits = [_limit(row, row[2]) for row in found]
    if charge.end_user is not None:
        subject = end_user_subject(caller.user_id, charge.end_user)
        own = rows.get(("end_user", subject), [])
        kinds = {(row[3], row[5]) for row in own}
        defaults = rows.get(("end_user", end_user_subject(caller.user_id, ANY_END_USER)), ())
        limits += [_limit(row, subject) for row in own]
        limits += [_limit(row, subject) for row in defaults if (row[3], row[5]) not in kinds]
    return sorted(limits, key=lambda lim: lim.id)


def _limit(row: Sequence[Any], state: str) -> Limit:
    return Limit(row[0], row[1], row[3], row[4], row[5] * SECOND_US, state)


def _count_open(db: Sql, lim: Limit) -> int:
    if lim.scope == "end_user":
        user_id, _, end_user = lim.state.partition("/")
        params: dict[str, Any] = {"user_id": int(user_id), "end_user": end_user}
    else:
        params = {"subject": lim.state}
    rows = db.all(_OPEN[lim.scope], params)
    return int(rows[0][0])
