"""`gateway apply`: the organisation made to match a file (`orgfile`), planned, then applied in one unit.

`plan` compares what the file declares with what the database holds and lists the changes: create,
change, delete (budgets, limits) and revoke (keys), each with its line and a way to make it. Things
the file does not name are left alone unless `prune`: then budgets and limits it lacks are deleted
(a budget's counters and the ledger stay, as with any deleted budget) and live keys it lacks are
revoked. Teams and users are never deleted. `apply` plans and makes the changes in the same unit of
work, one transaction, through the service functions the CLI and the admin API use (`services`,
`access`, `budgeting`, `limiting`), so each change is audited as those make it, with the actor
`apply sha256:<file's digest> (...)`; a change that fails rolls back every other. (`orgstate` reads
what the database holds, and exports it.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection

from gateway.core.holding import ANY_END_USER
from gateway.core.pricing import credits_json
from gateway.core.windows import PERIODS, UTC_RULE, Rule, iso_us
from gateway.errors import GatewayError
from gateway.ops import access, audit, budgeting, limiting, services
from gateway.ops.orgfile import RULE, Budget, Key, Org, OrgFileError, Problem, Team, User, where
from gateway.ops.orglimits import OrgLimit
from gateway.ops.orgstate import RANK, State, read_state
from gateway.ops.reports import parse_time
from gateway.web.attribution import MAX_END_USER


@dataclass
class Context:
    """What the changes of one apply share: who, when, the keys' ids by (user, name), new secrets."""

    actor: str
    at: int
    key_ids: dict[tuple[str, str], str]
    created: list[dict[str, Any]] = field(default_factory=list)
    # The window rule of a budget made without one (GATEWAY_TIMEZONE, GATEWAY_WEEK_STARTS).
    rule_defaults: Rule = UTC_RULE


@dataclass
class Change:
    """One change of a plan: what, where in the file, the fields before and after, how to make it."""

    action: str  # create, change, delete, revoke
    kind: str  # team, user, key, budget, limit
    target: str
    line: int | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    run: Callable[[Connection, Context], Any] = field(repr=False)

    def json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("action", "kind", "target", "line", "before", "after")}


def _models(value: list[str] | None) -> list[str] | None:
    return None if value is None else sorted(value)


def _diff(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    changed = [name for name in after if before.get(name) != after[name]]
    if not changed:
        return None
    return {n: before.get(n) for n in changed}, {n: after[n] for n in changed}


class _Planner:
    def __init__(self, org: Org, state: State, at: int) -> None:
        self.org, self.state, self.at = org, state, at
        self.changes: list[Change] = []
        self.problems: list[Problem] = []
        self.users = set(state.users) | {u.name for u in org.users}
        self.keys = {k for k, live in state.keys.items() if len(live) == 1} | {
            (k.user, k.name) for k in org.keys()
        }

    def fault(self, path: Any, name: str | None, message: str) -> None:
        lines = self.org.lines
        self.problems.append(Problem(lines.at(path, name) if lines else 1, where(path, name), message))

    def add(
        self,
        action: str,
        kind: str,
        target: str,
        line: int | None,
        before: Any,
        after: Any,
        run: Callable[[Connection, Context], Any],
    ) -> None:
        self.changes.append(Change(action, kind, target, line, before, after, run))

    def team(self, team: Team) -> None:
        after = {"models": _models(team.models)}
        if team.name not in self.state.teams:
            self.add("create", "team", f"team {team.name}", team.line, None, after, _new_team(team))
            return
        diff = _diff({"models": _models(self.state.teams[team.name])}, after)
        if diff is not None:
            run = _set_models("team", team.name, team.models)
            self.add("change", "team", f"team {team.name}", team.line, *diff, run)

    def user(self, user: User) -> None:
        teams = set(self.state.teams) | {t.name for t in self.org.teams}
        if user.team is not None and user.team not in teams:
            self.fault(user.path, "team", f"no team named {user.team!r}: declare it in [[teams]]")
            return
        after = {"team": user.team, "models": _models(user.models)}
        if user.name not in self.state.users:
            self.add("create", "user", f"user {user.name}", user.line, None, after, _new_user(user))
            return
        team, models = self.state.users[user.name]
        if team != user.team:
            self.fault(
                user.path,
                "team",
                f"user {user.name!r} is in {'team ' + repr(team) if team else 'no team'}: apply does not "
                "move users between teams; create a new user in the team instead",
            )
            return
        diff = _diff({"team": team, "models": _models(models)}, after)
        if diff is not None:
            run = _set_models("user", user.name, user.models)
            self.add("change", "user", f"user {user.name}", user.line, *diff, run)

    def key(self, key: Key) -> None:
        target = f"key {key.user}/{key.name}"
        after = {"models": _models(key.models), "expires_at": iso_us(key.expires_at), "blocked": key.blocked}
        live = self.state.keys.get((key.user, key.name), [])
        if len(live) > 1:
            ids = ", ".join(k["id"] for k in live)
            self.fault(
                key.path,
                "name",
                f"{key.user!r} has {len(live)} live keys named {key.name!r} ({ids}): "
                "revoke or rename all but one first",
            )
            return
        old = live[0] if live else None
        expiry_changes = old is None or parse_time("expires_at", old["expires_at"]) != key.expires_at
        if key.expires_at is not None and expiry_changes and key.expires_at <= self.at:
            try:
                access.parse_expiry(iso_us(key.expires_at), None, self.at)
            except GatewayError as exc:
                self.fault(key.path, "expires_at", exc.message)
                return
        if old is None:
            self.add("create", "key", target, key.line, None, after, _new_key(key))
            return
        before = {
            "models": _models(old["models"]),
            "expires_at": old["expires_at"],
            "blocked": old["blocked"],
        }
        diff = _diff(before, after)
        if diff is not None:
            self.add("change", "key", target, key.line, {"id": old["id"], **diff[0]}, diff[1], _set_key(key))

    def budget(self, budget: Budget) -> None:
        reading = self._subject(budget)
        if reading is None:
            return
        after = {
            "limit": credits_json(budget.limit),
            "soft": budget.soft,
            "alert_at": None if budget.alert_at is None else list(budget.alert_at),
            **budget.declared_rule(),
        }
        target = f"budget {budget.scope} {budget.subject} {budget.period}"
        old = self.state.budgets.get(budget.ident)
        if old is None:
            self.add("create", "budget", target, budget.line, None, after, _set_budget(budget, reading))
            return
        before = {
            "limit": credits_json(old.limit),
            "soft": not old.enforce,
            "alert_at": None if old.alert_at is None else list(old.alert_at),
            # (Only the parts the file declares: the others are left as they are.)
            **{name: value for name, value in zip(RULE, old.rule, strict=True) if name in after},
        }
        diff = _diff(before, after)
        if diff is not None:
            self.add("change", "budget", target, budget.line, *diff, _set_budget(budget, reading))

    def limit(self, limit: OrgLimit) -> None:
        reading = self._subject(limit)
        if reading is None:
            return
        per = f" per {limit.per}" if limit.per else ""
        target = f"limit {limit.scope} {limit.subject} {limit.kind}{per}"
        old = self.state.limits.get(limit.ident)
        after = limit.shown()
        if old is None:
            self.add("create", "limit", target, limit.line, None, after, _set_limit(limit, reading))
            return
        before = OrgLimit(*limit.ident[:3], old.limit, limit.per_seconds, 0).shown()
        diff = _diff(before, after)
        if diff is not None:
            self.add("change", "limit", target, limit.line, *diff, _set_limit(limit, reading))

    def _subject(self, budget: Budget | OrgLimit) -> tuple[str, str] | None:
        """The budget's subject read as (name, "") for a team or user, (user, key or end user) for
        the others, from the file's and the stored ones; None (and a fault) if it names nothing."""
        subject = budget.subject
        if budget.scope in ("team", "user"):
            known = set(self.state.teams) | {t.name for t in self.org.teams}
            if budget.scope == "user":
                known = self.users
            if subject not in known:
                self.fault(
                    budget.path,
                    "subject",
                    f"no {budget.scope} named {subject!r}: declare it in [[{budget.scope}s]]",
                )
                return None
            return subject, ""
        readings = [
            (subject[:i], subject[i + 1 :])
            for i, char in enumerate(subject)
            if char == "/" and subject[:i] in self.users and subject[i + 1 :]
        ]
        if budget.scope == "key":
            readings = [r for r in readings if r in self.keys]
        if not readings:
            what = (
                "USER/KEY, a key the file declares under [[users.keys]]"
                if budget.scope == "key"
                else (f"USER/END_USER (or USER/{ANY_END_USER} for each end user of USER)")
            )
            self.fault(budget.path, "subject", f"{subject!r} does not name a {budget.scope}: write {what}")
            return None
        if len(readings) > 1:
            users = " or ".join(repr(user) for user, _ in readings)
            self.fault(budget.path, "subject", f"{subject!r} is ambiguous: its user could be {users}")
            return None
        if budget.scope == "end_user" and len(readings[0][1]) > MAX_END_USER:
            self.fault(budget.path, "subject", f"an end user is at most {MAX_END_USER} characters")
            return None
        return readings[0]

    def pruned(self) -> None:
        declared = {b.ident for b in self.org.budgets}
        gone = [ident for ident in self.state.budgets if ident not in declared]
        for scope, subject, period in sorted(gone, key=lambda i: (RANK[i[0]], i[1], PERIODS.index(i[2]))):
            old = self.state.budgets[(scope, subject, period)]
            before = {"limit": credits_json(old.limit)}
            run = _delete_budget(scope, old.subject, period)
            self.add("delete", "budget", f"budget {scope} {subject} {period}", None, before, None, run)
        limits = {lim.ident for lim in self.org.limits}
        for ident in sorted(set(self.state.limits) - limits, key=lambda i: (RANK[i[0]], i)):
            stored = self.state.limits[ident]
            shown = OrgLimit(*ident[:3], stored.limit, ident[3], 0)
            per = f" per {shown.per}" if shown.per else ""
            target = f"limit {ident[0]} {ident[1]} {ident[2]}{per}"
            self.add("delete", "limit", target, None, shown.shown(), None, _delete_limit(stored.id))
        keys = {(k.user, k.name) for k in self.org.keys()}
        live = [k for ident, ks in self.state.keys.items() if ident not in keys for k in ks]
        for key in sorted([*live, *self.state.unnamed], key=lambda k: (k["user"], k["name"] or "", k["id"])):
            target = f"key {key['user']}/{key['name'] or '(unnamed)'}"
            self.add("revoke", "key", target, None, {"id": key["id"]}, None, _revoke(key["id"]))


def plan(conn: Connection, org: Org, at: int, prune: bool = False) -> list[Change]:
    """The changes that make the database match `org`; OrgFileError if the file cannot be applied."""
    return _plan(conn, org, at, prune)[0]


def _plan(conn: Connection, org: Org, at: int, prune: bool) -> tuple[list[Change], State]:
    state = read_state(conn, at)
    planner = _Planner(org, state, at)
    for team in org.teams:
        planner.team(team)
    for user in org.users:
        planner.user(user)
    for key in org.keys():
        planner.key(key)
    # Budgets are set in the order admissions lock their counters, so that on PostgreSQL an apply and
    # the admissions beside it wait for each other rather than deadlock (and be retried).
    for budget in sorted(org.budgets, key=lambda b: (RANK[b.scope], b.subject, PERIODS.index(b.period))):
        planner.budget(budget)
    for limit in sorted(org.limits, key=lambda lim: (RANK[lim.scope], lim.ident)):
        planner.limit(limit)
    if planner.problems:
        raise OrgFileError(org.file, sorted(planner.problems, key=lambda p: p.line))
    if prune:
        planner.pruned()
    return planner.changes, state


def planned(conn: Connection, org: Org, at: int, prune: bool = False) -> dict[str, Any]:
    """Unit of work (a read): the plan's JSON, as `apply --plan --json` and `?plan=1` answer it."""
    return result(org, plan(conn, org, at, prune), applied=False, prune=prune)


def summary(changes: list[Change]) -> dict[str, int]:
    """How many to create, change and delete (revoking a key counts as a delete)."""
    counts = {"create": 0, "change": 0, "delete": 0}
    for change in changes:
        counts["delete" if change.action == "revoke" else change.action] += 1
    return counts


def result(
    org: Org, changes: list[Change], *, applied: bool, prune: bool, created: Any = ()
) -> dict[str, Any]:
    """The JSON of a plan or an apply (`created`: the new keys with their secrets, shown only here)."""
    return {
        "file": org.file,
        "sha256": org.sha256,
        "applied": applied,
        "prune": prune,
        "summary": summary(changes),
        "changes": [change.json() for change in changes],
        "created_keys": list(created),
    }


def apply(
    conn: Connection,
    org: Org,
    at: int,
    *,
    prune: bool = False,
    actor: str,
    rule_defaults: Rule = UTC_RULE,
) -> dict[str, Any]:
    """Unit of work: plan, then make every change, audited as made by `apply sha256:... (actor)`.
    A budget made without a window rule gets `rule_defaults`' parts."""
    changes, state = _plan(conn, org, at, prune)
    key_ids = {ident: live[0]["id"] for ident, live in state.keys.items() if len(live) == 1}
    context = Context(audit.apply_actor(org.sha256, actor), at, key_ids, rule_defaults=rule_defaults)
    for change in changes:
        try:
            change.run(conn, context)
        except GatewayError as exc:
            if exc.status >= 500:
                raise
            problem = Problem(change.line or 1, change.target, exc.message)
            raise OrgFileError(org.file, [problem]) from None
    if changes:
        after = {"sha256": org.sha256, "prune": prune, **summary(changes)}
        audit.record(conn, at, context.actor, "org.apply", org.file, None, after)
    return result(org, changes, applied=True, prune=prune, created=context.created)


def _new_team(team: Team) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        services.create_team(conn, team.name, ctx.at, actor=ctx.actor)
        if team.models is not None:
            access.set_models(conn, "team", team.name, team.models, ctx.at, actor=ctx.actor)

    return run


def _new_user(user: User) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        services.create_user(conn, user.name, user.team, ctx.at, actor=ctx.actor)
        if user.models is not None:
            access.set_models(conn, "user", user.name, user.models, ctx.at, actor=ctx.actor)

    return run


def _set_models(kind: str, name: str, models: list[str] | None) -> Callable[[Connection, Context], Any]:
    return lambda conn, ctx: access.set_models(conn, kind, name, models, ctx.at, actor=ctx.actor)


def _new_key(key: Key) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        made = services.create_key(
            conn, key.user, key.name, ctx.at, expires_at=key.expires_at, models=key.models, actor=ctx.actor
        )
        ctx.key_ids[(key.user, key.name)] = made["id"]
        ctx.created.append({name: made[name] for name in ("id", "user", "name", "key")})
        if key.blocked:
            access.block_key(conn, made["id"], ctx.at, actor=ctx.actor)

    return run


def _set_key(key: Key) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        key_id = ctx.key_ids[(key.user, key.name)]
        old = services.key_object(conn, key_id)
        changes: dict[str, Any] = {}
        if _models(old["models"]) != _models(key.models):
            changes["models"] = key.models
        if parse_time("expires_at", old["expires_at"]) != key.expires_at:
            changes["expires_at"] = key.expires_at
        if changes:
            access.set_key(conn, key_id, ctx.at, actor=ctx.actor, **changes)
        if old["blocked"] != key.blocked:
            (access.block_key if key.blocked else access.unblock_key)(conn, key_id, ctx.at, actor=ctx.actor)

    return run


def _set_budget(budget: Budget, reading: tuple[str, str]) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        # A key budget names its key by user and name; the services, by its id (perhaps new).
        subject = ctx.key_ids[reading] if budget.scope == "key" else budget.subject
        limit = Decimal(budget.limit).scaleb(-6)
        alert_at = None if budget.alert_at is None else list(budget.alert_at)
        budgeting.set_budget(
            conn,
            budget.scope,
            subject,
            budget.period,
            limit,
            ctx.at,
            actor=ctx.actor,
            enforce=not budget.soft,
            alert_at=alert_at,
            timezone=budget.timezone,
            week_starts=budget.week_starts,
            month_starts_on=budget.month_starts_on,
            rule_defaults=ctx.rule_defaults,
        )

    return run


def _set_limit(limit: OrgLimit, reading: tuple[str, str]) -> Callable[[Connection, Context], Any]:
    def run(conn: Connection, ctx: Context) -> None:
        subject = ctx.key_ids[reading] if limit.scope == "key" else limit.subject
        limiting.set_limit(
            conn, limit.scope, subject, limit.kind, limit.service_limit(), limit.per, ctx.at, actor=ctx.actor
        )

    return run


def _delete_limit(limit_id: int) -> Callable[[Connection, Context], Any]:
    return lambda conn, ctx: limiting.delete_limit(conn, limit_id, ctx.at, actor=ctx.actor)


def _delete_budget(scope: str, subject: str, period: str) -> Callable[[Connection, Context], Any]:
    return lambda conn, ctx: budgeting.delete_budget(conn, scope, subject, period, ctx.at, actor=ctx.actor)


def _revoke(key_id: str) -> Callable[[Connection, Context], Any]:
    return lambda conn, ctx: services.revoke_key(conn, key_id, ctx.at, actor=ctx.actor)
