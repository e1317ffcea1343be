"""The organisation file of `gateway apply`: TOML read, checked field by field, each fault at `file:line`.

`parse` turns the text into an `Org` (teams, users with their keys, budgets, limits: `orglimits`)
or raises `OrgFileError` listing every fault found, each with its line and field, before anything is
read from or written to the database. Values are checked by the same functions the CLI and the
admin API use (`services`, `access`, `budgeting`'s and `limiting`'s rules), so a fault reads as it
would there. What needs the database (a team that exists, a key a budget names) is checked by the
plan (`gateway/ops/apply.py`), which reports its faults the same way. `render` writes an `Org` back
as such a file (for `gateway export`).

tomllib gives no positions, so `Lines` finds them with a light scan of the text: table headers
(`[[users]]`, `[[users.keys]]`, counted per parent) and the `name = ...` lines under each. Values
written inline (`keys = [{...}]`) are placed at the line of their key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from gateway.core import alerts
from gateway.core.pricing import parse_credits
from gateway.core.windows import PERIODS, check_month_day, check_week_starts, check_zone
from gateway.errors import GatewayError, InvalidRequest
from gateway.ops import access, budgeting, orglimits, services
from gateway.ops.orglimits import OrgLimit
from gateway.ops.reports import parse_time

VERSION = 1
# Where a budget's windows begin (gateway/core/windows.py); each left out: as the budget has it, or
# the gateway's default for a new one.
RULE = ("timezone", "week_starts", "month_starts_on")
TOP = ("version", "teams", "users", "budgets", "limits")
TEAM = ("name", "models")
USER = ("name", "team", "models", "keys")
KEY = ("name", "models", "expires_at", "blocked")
BUDGET = ("scope", "subject", "period", "limit", "soft", "alert_at", *RULE)
# Said of a field this version does not take, where it is known what it would be.
HINTS = {
    "webhooks": "webhooks are settings of the gateway (GATEWAY_WEBHOOK_URL, or [[webhooks]] in its "
    "configuration file), not part of the organisation",
    "keys": "keys belong to their user: [[users.keys]] after that user's [[users]]",
    "enforce": "write `soft = true` for a budget that never refuses",
}

Path = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One fault of a file: where, which field, what is wrong."""

    line: int
    field: str
    message: str


class OrgFileError(InvalidRequest):
    """A file refused before any change: every fault, each at `file:line` with its field."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        shown = problems[:50]
        lines = [f"{file}:{p.line}: {p.field}: {p.message}" for p in shown]
        if len(problems) > len(shown):
            lines.append(f"... and {len(problems) - len(shown)} more")
        super().__init__(
            "\n".join(lines),
            field=shown[0].field if shown else None,
            line=shown[0].line if shown else None,
            problems=[{"file": file, "line": p.line, "field": p.field, "message": p.message} for p in shown],
        )


@dataclass
class Key:
    user: str
    name: str
    line: int
    models: list[str] | None = None
    expires_at: int | None = None
    blocked: bool = False
    path: Path = ()


@dataclass
class User:
    name: str
    line: int
    team: str | None = None
    models: list[str] | None = None
    keys: list[Key] = field(default_factory=list)
    path: Path = ()


@dataclass
class Team:
    name: str
    line: int
    models: list[str] | None = None
    path: Path = ()


@dataclass
class Budget:
    scope: str
    subject: str
    period: str
    limit: int  # micro-credits
    line: int
    soft: bool = False
    alert_at: tuple[int, ...] | None = None  # None: the gateway's default thresholds
    path: Path = ()
    # Its rule's parts the file declares (None: not declared), in `RULE` order.
    timezone: str | None = None
    week_starts: str | None = None
    month_starts_on: int | None = None

    def declared_rule(self) -> dict[str, str | int]:
        """The parts of its window rule the file declares, by field."""
        values = (self.timezone, self.week_starts, self.month_starts_on)
        return {name: value for name, value in zip(RULE, values, strict=True) if value is not None}

    @property
    def ident(self) -> tuple[str, str, str]:
        return self.scope, self.subject, self.period


@dataclass
class Org:
    """What a file declares; `file` and `sha256` name it in messages and the audit log."""

    file: str = "-"
    sha256: str = ""
    teams: list[Team] = field(default_factory=list)
    users: list[User] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    limits: list[OrgLimit] = field(default_factory=list)
    lines: Lines | None = None

    def keys(self) -> Iterator[Key]:
        for user in self.users:
            yield from user.keys


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')\s*[.=]")


def _names(header: str) -> list[str]:
    return [part.strip().strip("\"'") for part in header.split(".")]


class Lines:
    """Where each table and key of a TOML text is: a scan of its headers and `key =` lines."""

    def __init__(self, text: str) -> None:
        self.tables: dict[Path, int] = {}
        self.keys: dict[tuple[Path, str], int] = {}
        latest: dict[tuple[str, ...], int] = {}
        counts: dict[Path, int] = {}
        current: Path = ()
        quoted: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if quoted is not None:  # inside a multi-line string
                if line.count(quoted) % 2:
                    quoted = None
                continue
            header = _HEADER.match(line)
            if header is not None:
                parts = _names(header.group(2))
                path: Path = ()
                for depth, name in enumerate(parts[:-1], start=1):
                    path += (name,)
                    if tuple(parts[:depth]) in latest:
                        path += (latest[tuple(parts[:depth])],)
                path += (parts[-1],)
                if header.group(1) == "[[":
                    index = counts.get(path, 0)
                    counts[path] = index + 1
                    latest[tuple(parts)] = index
                    path += (index,)
                current = path
                self.tables.setdefault(current, number)
                continue
            key = _KEY.match(line)
            if key is not None:
                self.keys.setdefault((current, key.group(1).strip("\"'")), number)
            for mark in ('"""', "'''"):
                if line.count(mark) % 2:
                    quoted = mark
                    break

    def at(self, path: Path, name: str | None = None) -> int:
        """The line of key `name` in the table at `path` (or of the table), else of what holds it."""
        while True:
            if name is not None and (path, name) in self.keys:
                return self.keys[(path, name)]
            if path in self.tables:
                return self.tables[path]
            if not path:
                return 1
            # An element written inline: the line of the key holding its array (or of its table).
            path, last = (path[:-2], path[-2]) if isinstance(path[-1], int) else (path[:-1], path[-1])
            name = str(last)


def where(path: Path, name: str | None = None) -> str:
    """A field as a person reads it: users[2].keys[0].models."""
    out = ""
    for part in (*path, *([name] if name else [])):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Reader:
    """Collects the faults of one file while turning its tables into an `Org`."""

    def __init__(self, lines: Lines, priced: Collection[str]) -> None:
        self.lines, self.priced = lines, priced
        self.problems: list[Problem] = []

    def fault(self, path: Path, name: str | None, message: str) -> None:
        self.problems.append(Problem(self.lines.at(path, name), where(path, name), message))

    def check(self, path: Path, name: str, fn: Callable[..., T], *args: Any) -> T | None:
        """`fn(*args)`, its refusal (a GatewayError or ValueError) recorded at the field; None then."""
        try:
            return fn(*args)
        except (GatewayError, ValueError) as exc:
            self.fault(path, name, exc.message if isinstance(exc, GatewayError) else str(exc))
            return None

    def table(
        self, path: Path, value: object, allowed: tuple[str, ...], required: str | None
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fault(path, None, "must be a table")
            return {}
        for name in value:
            if name not in allowed:
                hint = f" ({HINTS[name]})" if name in HINTS else ""
                self.fault(path, name, f"unknown field{hint}; this table takes {', '.join(allowed)}")
        if required is not None and required not in value:
            self.fault(path, required, f"`{required}` is missing")
        return {name: item for name, item in value.items() if name in allowed}

    def missing(self, path: Path, item: dict[str, Any], names: Collection[str]) -> bool:
        """Whether any of `names` is missing from `item`; each one missing is recorded."""
        absent = [name for name in names if name not in item]
        for name in absent:
            self.fault(path, name, f"`{name}` is missing")
        return bool(absent)

    def tables(self, path: Path, value: object) -> list[Any]:
        if not isinstance(value, list):
            self.fault(path[:-1], str(path[-1]), f"must be an array of tables: [[{where(path)}]]")
            return []
        return value

    def name(self, path: Path, item: dict[str, Any], seen: dict[str, int], kind: str) -> str | None:
        """The item's checked name; a fault if `seen` has it (`kind` says what it is: "team {}")."""
        if "name" not in item:
            return None
        name = self.check(path, "name", services.check_name, "name", item["name"])
        if name is not None:
            if name in seen:
                self.fault(
                    path,
                    "name",
                    f"{kind.replace('{}', repr(name), 1)} is declared twice (first at line {seen[name]})",
                )
                return None
            seen[name] = self.lines.at(path, "name")
        return str(name) if name is not None else None

    def models(self, path: Path, item: dict[str, Any]) -> list[str] | None:
        if "models" not in item:
            return None
        return self.check(path, "models", access.parse_models, item["models"], self.priced, "models")

    def flag(self, path: Path, item: dict[str, Any], name: str) -> bool:
        value = item.get(name, False)
        if not isinstance(value, bool):
            self.fault(path, name, f"`{name}` must be true or false; got {value!r}")
            return False
        return value

    def expiry(self, path: Path, value: object) -> int | None:
        if isinstance(value, datetime):
            moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
            return parse_time("expires_at", moment.isoformat())
        if isinstance(value, str) and value.strip():
            return self.check(path, "expires_at", parse_time, "expires_at", value)
        self.fault(path, "expires_at", "`expires_at` must be a date-time, e.g. 2027-01-31T18:00:00Z")
        return None


def parse(text: str, priced: Collection[str], file: str = "-") -> Org:
    """The organisation a file declares; OrgFileError naming every fault at `file:line`."""
    lines = Lines(text)
    org = Org(file=file, sha256=hashlib.sha256(text.encode()).hexdigest(), lines=lines)
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        raise OrgFileError(file, [Problem(int(found.group(1)) if found else 1, "toml", str(exc))]) from None
    read = _Reader(lines, priced)
    top = read.table((), data, TOP, "version")
    if "version" in top and (isinstance(top["version"], bool) or top["version"] != VERSION):
        read.fault((), "version", f"`version` must be {VERSION}; got {top['version']!r}")
    seen: dict[str, int] = {}
    for i, item in enumerate(read.tables(("teams",), top.get("teams", []))):
        path: Path = ("teams", i)
        item = read.table(path, item, TEAM, "name")
        name = read.name(path, item, seen, "team {}")
        if name is not None:
            org.teams.append(Team(name, lines.at(path), read.models(path, item), path))
    seen = {}
    for i, item in enumerate(read.tables(("users",), top.get("users", []))):
        path = ("users", i)
        item = read.table(path, item, USER, "name")
        name = read.name(path, item, seen, "user {}")
        team = read.check(path, "team", services.check_name, "team", item["team"]) if "team" in item else None
        user = User(name or "", lines.at(path), team, read.models(path, item), path=path)
        keys: dict[str, int] = {}
        for j, key_item in enumerate(read.tables((*path, "keys"), item.get("keys", []))):
            key_path: Path = (*path, "keys", j)
            key_item = read.table(key_path, key_item, KEY, "name")
            key_name = read.name(key_path, key_item, keys, "key {} of user " + repr(name))
            expires = read.expiry(key_path, key_item["expires_at"]) if "expires_at" in key_item else None
            models = read.models(key_path, key_item)
            blocked = read.flag(key_path, key_item, "blocked")
            key = Key(user.name, key_name or "", lines.at(key_path), models, expires, blocked, key_path)
            if key_name is not None:
                user.keys.append(key)
        if name is not None:
            org.users.append(user)
    budgets: dict[tuple[str, str, str], int] = {}
    for i, item in enumerate(read.tables(("budgets",), top.get("budgets", []))):
        path = ("budgets", i)
        item = read.table(path, item, BUDGET, None)
        budget = _budget(read, path, item)
        if budget is None:
            continue
        if budget.ident in budgets:
            read.fault(
                path,
                None,
                f"a {budget.period} {budget.scope} budget of {budget.subject!r} is "
                f"declared twice (first at line {budgets[budget.ident]})",
            )
            continue
        budgets[budget.ident] = budget.line
        org.budgets.append(budget)
    limits: dict[tuple[str, str, str, int], int] = {}
    for i, item in enumerate(read.tables(("limits",), top.get("limits", []))):
        path = ("limits", i)
        item = read.table(path, item, orglimits.FIELDS, None)
        limit = orglimits.parse(read, path, item)
        if limit is None:
            continue
        if limit.ident in limits:
            what = f"{limit.kind} per {limit.per}" if limit.per else limit.kind
            read.fault(
                path,
                None,
                f"a {what} {limit.scope} limit of {limit.subject!r} is declared twice (first at "
                f"line {limits[limit.ident]})",
            )
            continue
        limits[limit.ident] = limit.line
        org.limits.append(limit)
    if read.problems:
        raise OrgFileError(file, sorted(read.problems, key=lambda p: p.line))
    return org


def _budget(read: _Reader, path: Path, item: dict[str, Any]) -> Budget | None:
    if read.missing(path, item, BUDGET[:4]):
        return None
    scope = read.check(path, "scope", services.check_choice, "scope", item["scope"], budgeting.SCOPES)
    subject = read.check(path, "subject", services.check_name, "subject", item["subject"])
    period = read.check(path, "period", services.check_choice, "period", item["period"], PERIODS)
    limit = read.check(path, "limit", _limit, item["limit"])
    if limit is not None and limit > budgeting.MAX_LIMIT_MICROS:
        read.fault(path, "limit", f"`limit` must be at most {budgeting.MAX_LIMIT_MICROS // 10**6} credits")
        limit = None
    alert_at = None
    if "alert_at" in item:
        alert_at = read.check(path, "alert_at", alerts.check, item["alert_at"], "`alert_at`")
        if alert_at is None:
            return None
    soft = read.flag(path, item, "soft")
    timezone = read.check(path, "timezone", check_zone, item["timezone"]) if "timezone" in item else None
    week_starts = (
        read.check(path, "week_starts", check_week_starts, item["week_starts"])
        if "week_starts" in item
        else None
    )
    month_day = (
        read.check(path, "month_starts_on", _month_day, item["month_starts_on"])
        if "month_starts_on" in item
        else None
    )
    declared = (timezone, week_starts, month_day)
    if any(name in item and value is None for name, value in zip(RULE, declared, strict=True)):
        return None
    if scope is None or subject is None or period is None or limit is None:
        return None
    return Budget(
        scope,
        subject,
        period,
        limit,
        read.lines.at(path),
        soft,
        alert_at,
        path,
        timezone,
        week_starts,
        month_day,
    )


def _month_day(value: object) -> int:
    if isinstance(value, str):
        raise ValueError(f"the month's start day must be a whole number from 1 to 28; got {value!r}")
    return check_month_day(value)


def _limit(value: object) -> int:
    try:
        return parse_credits(value)
    except ValueError as exc:
        raise ValueError(f"`limit`: {exc}") from None
