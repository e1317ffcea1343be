"""The organisation as the database holds it (`read_state`), and written out as a file (`export`).

`read_state` is what `apply`'s plan compares a file with: teams, users, live keys by (user, name),
and the budgets of their own (an end user's budget made from a default follows the default and is
not part of it). `export` writes that as an organisation file with a small TOML writer of its own
(`render`): `gateway apply --plan` on it finds nothing to change, and exporting again after an
apply of it gives the same text.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from gateway.core import alerts
from gateway.core.holding import rule_of
from gateway.core.pricing import format_credits
from gateway.core.windows import PERIODS, UTC_RULE, Rule, iso_us
from gateway.ops import orglimits, services, subjects
from gateway.ops.orgfile import VERSION, Budget, Key, Org, Team, User
from gateway.ops.orglimits import OrgLimit, StoredLimit
from gateway.ops.reports import parse_time

# Budgets in the order admissions lock counters (key, user, then team and end-user budgets).
RANK = {"key": 0, "user": 1, "team": 2, "end_user": 2}


@dataclass
class StoredBudget:
    limit: int
    enforce: bool
    alert_at: tuple[int, ...] | None
    subject: str  # as the services take it (a key's id for a key budget)
    rule: Rule = UTC_RULE


@dataclass
class State:
    """The organisation as the database holds it now."""

    teams: dict[str, list[str] | None]
    users: dict[str, tuple[str | None, list[str] | None]]
    keys: dict[tuple[str, str], list[dict[str, Any]]]  # live keys by (user, name)
    unnamed: list[dict[str, Any]]  # live keys without a name
    budgets: dict[tuple[str, str, str], StoredBudget]  # own budgets (not made from a default)
    hidden: list[str]  # budgets and limits of live keys a file cannot name (unnamed, or a name used twice)
    limits: dict[tuple[str, str, str, int], StoredLimit]  # by (scope, subject, kind, per seconds)


_BUDGETS = (
    "SELECT b.scope, " + subjects.SUBJECT_NAME + ", b.period, b.limit_micros, b.enforce, b.alert_at, "
    "b.timezone, b.week_starts, b.month_starts_on FROM budgets b "
    + subjects.SUBJECT_JOINS
    + " WHERE b.deleted_at IS NULL AND b.default_id IS NULL"
)


def read_state(conn: Connection, at: int) -> State:
    """Teams, users, live keys and own budgets. A key is live until revoked; one in a rotation's grace
    (it has `rotated_to`) is on its way out and left alone."""
    teams = {t["name"]: t["models"] for t in services.list_teams(conn)}
    users = {u["name"]: (u["team"], u["models"]) for u in services.list_users(conn)}
    keys: dict[tuple[str, str], list[dict[str, Any]]] = {}
    unnamed, names = [], {}
    for key in services.list_keys(conn):
        revoked = parse_time("revoked_at", key["revoked_at"])
        if (revoked is not None and revoked <= at) or key["rotated_to"] is not None:
            continue
        if key["name"] is None:
            unnamed.append(key)
        else:
            keys.setdefault((key["user"], key["name"]), []).append(key)
        names[key["id"]] = key
    budgets, hidden = {}, []
    for scope, subject, period, limit, enforce, stored, *rule in conn.execute(text(_BUDGETS)).all():
        service_subject = subject
        if scope == "key":
            owner = names.get(subject)
            if owner is None:
                continue  # a revoked key's budget applies to nothing
            if owner["name"] is None or len(keys[(owner["user"], owner["name"])]) > 1:
                hidden.append(f"{period} budget of key {subject}")
                continue
            subject = f"{owner['user']}/{owner['name']}"
        alert_at = None if stored is None else alerts.parse(stored)
        budgets[(scope, subject, period)] = StoredBudget(
            int(limit), bool(enforce), alert_at, service_subject, rule_of(*rule)
        )
    key_names = {
        key_id: (
            None
            if key["name"] is None or len(keys[(key["user"], key["name"])]) > 1
            else (key["user"], key["name"])
        )
        for key_id, key in names.items()
    }
    limits, hidden_limits = orglimits.stored(conn, key_names)
    return State(teams, users, keys, unnamed, budgets, hidden + hidden_limits, limits)


def export(conn: Connection, at: int) -> str:
    """The organisation as a file `apply --plan` finds nothing to change in. Left out: revoked keys,
    keys a file cannot name (unnamed, or two live keys of a user with one name, noted in comments),
    and end users' budgets made from a default (they follow it)."""
    state = read_state(conn, at)
    org = Org(teams=[Team(name, 0, models) for name, models in sorted(state.teams.items())])
    for name, (team, models) in sorted(state.users.items()):
        user = User(name, 0, team, models)
        for (owner, key_name), live in sorted(state.keys.items()):
            if owner == name and len(live) == 1:
                key = live[0]
                expires = parse_time("expires_at", key["expires_at"])
                user.keys.append(Key(name, key_name, 0, key["models"], expires, bool(key["blocked"])))
        org.users.append(user)
    for (scope, subject, period), stored in sorted(
        state.budgets.items(),
        key=lambda item: (RANK[item[0][0]], item[0][0], item[0][1], PERIODS.index(item[0][2])),
    ):
        # The rule's parts that differ from UTC, monday, 1 (those every budget had before rules).
        rule = stored.rule
        org.budgets.append(
            Budget(
                scope,
                subject,
                period,
                stored.limit,
                0,
                not stored.enforce,
                stored.alert_at,
                timezone=None if rule.zone == UTC_RULE.zone else rule.zone,
                week_starts=None if rule.week_starts == UTC_RULE.week_starts else rule.week_starts,
                month_starts_on=None
                if rule.month_starts_on == UTC_RULE.month_starts_on
                else rule.month_starts_on,
            )
        )
    org.limits = [
        OrgLimit(scope, subject, kind, stored.limit, per, 0)
        for (scope, subject, kind, per), stored in sorted(
            state.limits.items(), key=lambda item: (RANK[item[0][0]], item[0])
        )
    ]
    notes = [f"left out: live key {k['id']} of {k['user']} has no name" for k in state.unnamed]
    notes += [
        f"left out: {len(ks)} live keys of {u} named {n!r} ({', '.join(k['id'] for k in ks)})"
        for (u, n), ks in sorted(state.keys.items())
        if len(ks) > 1
    ]
    notes += [f"left out: the {h}, which has no name a file can use" for h in state.hidden]
    return render(org, notes)


def _string(value: str) -> str:
    # A JSON string is a TOML basic string, once DEL (which TOML wants escaped) is.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return str(value)


def render(org: Org, notes: Collection[str] = ()) -> str:
    """The TOML text of an organisation, which `parse` reads back as the same `Org`."""
    out = ["# The gateway's organisation (gateway export); apply it with 'gateway apply FILE'."]
    out += [f"# {note}" for note in notes]
    out += [f"version = {VERSION}"]

    def table(header: str, fields: list[tuple[str, object]]) -> None:
        out.extend(["", f"[[{header}]]"])
        out.extend(f"{name} = {text}" for name, text in fields)

    for team in org.teams:
        table("teams", [("name", _string(team.name)), *_models(team.models)])
    for user in org.users:
        team_field = [] if user.team is None else [("team", _string(user.team))]
        table("users", [("name", _string(user.name)), *team_field, *_models(user.models)])
        for key in user.keys:
            fields: list[tuple[str, object]] = [("name", _string(key.name)), *_models(key.models)]
            if key.expires_at is not None:
                fields.append(("expires_at", iso_us(key.expires_at)))
            if key.blocked:
                fields.append(("blocked", "true"))
            table("users.keys", fields)
    for budget in org.budgets:
        fields = [
            ("scope", _string(budget.scope)),
            ("subject", _string(budget.subject)),
            ("period", _string(budget.period)),
            ("limit", format_credits(budget.limit)),
        ]
        if budget.soft:
            fields.append(("soft", "true"))
        if budget.alert_at is not None:
            fields.append(("alert_at", _value(list(budget.alert_at))))
        fields += [(name, _value(value)) for name, value in budget.declared_rule().items()]
        table("budgets", fields)
    for header, fields in orglimits.render(org.limits, _string):
        table(header, fields)
    return "\n".join(out) + "\n"


def _models(models: list[str] | None) -> list[tuple[str, object]]:
    return [] if models is None else [("models", _value(models))]
