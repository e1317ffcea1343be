"""Rate and concurrency limits in the organisation file (`[[limits]]`, see `orgfile`): read and checked,
as the database holds them (`stored`), and written back (`render`). `apply` plans and makes them.

A limit is named by (scope, subject, kind, per), as `gateway limits set` names it; a key's subject is
USER/KEY_NAME, as for budgets. Values are checked by `limiting`'s own rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.pricing import credits_json, format_credits
from gateway.core.ratelimits import KINDS, PERIOD_NAMES
from gateway.ops import limiting, services, subjects

FIELDS = ("scope", "subject", "kind", "limit", "per")


@dataclass
class OrgLimit:
    scope: str
    subject: str
    kind: str
    limit: int  # requests, requests in flight, or micro-credits
    per_seconds: int  # 0 for concurrent
    line: int
    path: tuple[str | int, ...] = ()

    @property
    def ident(self) -> tuple[str, str, str, int]:
        return self.scope, self.subject, self.kind, self.per_seconds

    @property
    def per(self) -> str | None:
        return PERIOD_NAMES.get(self.per_seconds) if self.per_seconds else None

    def shown(self) -> dict[str, Any]:
        """Its number as the admin API shows it (credits as a decimal)."""
        return {"limit": credits_json(self.limit) if self.kind == "credits" else self.limit}

    def service_limit(self) -> object:
        """Its number as `limiting.set_limit` takes it."""
        return format_credits(self.limit) if self.kind == "credits" else self.limit


def parse(read: Any, path: tuple[str | int, ...], item: dict[str, Any]) -> OrgLimit | None:
    """One `[[limits]]` table (already checked for unknown fields by `read`, orgfile's reader)."""
    if read.missing(path, item, FIELDS[:4]):
        return None
    scope = read.check(path, "scope", services.check_choice, "scope", item["scope"], limiting.SCOPES)
    subject = read.check(path, "subject", services.check_name, "subject", item["subject"])
    kind = read.check(path, "kind", services.check_choice, "kind", item["kind"], KINDS)
    if kind is None:
        return None
    per = read.check(path, "per", limiting.per_seconds_of, kind, item.get("per"))
    if per is None:
        return None
    value = read.check(path, "limit", limiting.limit_value_of, kind, item["limit"], per)
    if scope is None or subject is None or value is None:
        return None
    return OrgLimit(scope, subject, kind, value, per, read.lines.at(path), path)


@dataclass
class StoredLimit:
    id: int
    limit: int
    subject: str  # as the services take it (a key's id for a key limit)


_LIMITS = (
    "SELECT b.id, b.scope, " + subjects.SUBJECT_NAME + ", b.kind, b.limit_value, b.per_seconds "
    "FROM rate_limits b " + subjects.SUBJECT_JOINS + " ORDER BY b.id"
)


def stored(
    conn: Connection, key_names: dict[str, tuple[str, str] | None]
) -> tuple[dict[tuple[str, str, str, int], StoredLimit], list[str]]:
    """The limits the database holds, by identity; and those of live keys a file cannot name.
    `key_names`: each live key's (user, name), None when a file cannot name it."""
    out, hidden = {}, []
    for limit_id, scope, subject, kind, value, per in conn.execute(text(_LIMITS)).all():
        service_subject = subject
        if scope == "key":
            if subject not in key_names:
                continue  # a revoked key's limit applies to nothing
            named = key_names[subject]
            if named is None:
                hidden.append(f"{kind} limit of key {subject}")
                continue
            subject = f"{named[0]}/{named[1]}"
        out[(scope, subject, kind, int(per))] = StoredLimit(int(limit_id), int(value), service_subject)
    return out, hidden


def render(limits: list[OrgLimit], string: Any) -> list[tuple[str, list[tuple[str, object]]]]:
    """Each limit as a `[[limits]]` table's fields (`string` quotes a TOML string)."""
    tables = []
    for lim in limits:
        value = format_credits(lim.limit) if lim.kind == "credits" else str(lim.limit)
        fields: list[tuple[str, object]] = [
            ("scope", string(lim.scope)),
            ("subject", string(lim.subject)),
            ("kind", string(lim.kind)),
            ("limit", value),
        ]
        if lim.per is not None:
            fields.append(("per", string(lim.per)))
        tables.append(("limits", fields))
    return tables
