"""Billing reports: sums of charged ledger rows grouped by team, user, key, model, day, month,
end user or tag.

What is counted: only ledger rows with outcome `charged`. `credits` is the sum of what was charged;
`requests` and `messages` count charged requests only (a request that upstream refused, that failed
or expired cost nothing and is not billed; the ledger endpoint lists those). Tokens are summed as
upstream reported them (0 where it did not). A row belongs to the day and month it was admitted in,
in the report's time zone (`--timezone`, default GATEWAY_TIMEZONE: UTC unless set), as a budget in
that zone counts it. `from` is inclusive and `to` exclusive; either may be left out for an open
range; a date or a datetime without an offset is read in the report's zone.

`day` is computed in SQL from the integer microsecond `admitted_at` (integer division, the same on
SQLite and PostgreSQL): in UTC the day itself; in another zone the quarter hour, which Python then
puts in its local day (every zone's offset has been a whole number of quarter hours since 1979, so
a quarter hour never straddles a local midnight). `month` is folded from days in Python, so it is
exact on both. Team and user
names are looked up once per report rather than joined per row. In CSV, totals are left out (a
spreadsheet sums a column) and a text cell that begins like a formula gets a leading `'`, so a
crafted team or user name cannot run in a spreadsheet.

`tag`: SQL groups by the row's stored tag list (few distinct lists; read from the report index, no
join), and each group is then counted in the row of every tag of its list (rows without tags under
a null tag), so a request with two tags counts in both rows; `totals` sum the ledger rows, each once.
`adjustments` sums the corrections of the rows in each group (gateway/ops/adjustments.py), whatever
their outcome; `credits` includes them.
"""

from __future__ import annotations

import csv
import functools
import io
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from gateway.core.pricing import credits_json, format_credits
from gateway.core.windows import check_zone, zone
from gateway.errors import InvalidRequest

GROUPS = ("team", "user", "key", "model", "day", "month", "end_user", "tag")
SUMS = ("requests", "messages", "credits", "prompt_tokens", "completion_tokens", "adjustments")
CREDIT_SUMS = ("credits", "adjustments")
US_PER_DAY = 86_400_000_000
US_PER_QUARTER_HOUR = 900_000_000
EPOCH_DAY = date(1970, 1, 1)

# The SQL of each group field kept per ledger row (`month` is folded from `day`).
_GROUP_SQL = {
    "team": "team_id",
    "user": "user_id",
    "key": "key_id",
    "model": "model",
    "day": f"admitted_at / {US_PER_DAY}",
    "end_user": "end_user",
    "tag": "tags",
}


@dataclass(frozen=True)
class ReportQuery:
    """A validated report request: the admitted-at range in microseconds and the group fields."""

    start: int | None
    end: int | None
    group_by: tuple[str, ...]
    # The zone of `day` and `month`.
    timezone: str = "UTC"


def parse_time(field: str, value: str | None, timezone: str = "UTC") -> int | None:
    """An ISO 8601 date or datetime (in `timezone` unless it names an offset) as microseconds since
    the epoch."""
    if value is None or value == "":
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"`{field}` must be an ISO 8601 date or datetime in UTC, e.g. 2026-11-01 or "
            f"2026-11-01T12:00:00Z; got {value[:100]!r}.",
            field=field,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC if timezone == "UTC" else zone(timezone))
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def parse_range(start: str | None, end: str | None, timezone: str = "UTC") -> tuple[int | None, int | None]:
    """`from` (inclusive) and `to` (exclusive) in microseconds; `to` must not be before `from`."""
    lo, hi = parse_time("from", start, timezone), parse_time("to", end, timezone)
    if lo is not None and hi is not None and hi < lo:
        raise InvalidRequest(
            "`to` must not be before `from` (`from` is inclusive, `to` exclusive).", field="to"
        )
    return lo, hi


def parse_group_by(value: str | None) -> tuple[str, ...]:
    """A comma-separated list of distinct group fields."""
    if not value:
        return ()
    fields = tuple(part.strip() for part in value.split(","))
    for name in fields:
        if name not in GROUPS:
            raise InvalidRequest(
                f"`group_by` takes a comma-separated list of {', '.join(GROUPS)}; got {name[:100]!r}.",
                field="group_by",
            )
    if len(set(fields)) != len(fields):
        raise InvalidRequest("`group_by` names a field twice.", field="group_by")
    return fields


def parse_query(
    start: str | None, end: str | None, group_by: str | None, timezone: str | None = None
) -> ReportQuery:
    """Validate the report's parameters, naming the field at fault (`timezone` None: UTC)."""
    zone_name = "UTC"
    if timezone is not None:
        try:
            zone_name = check_zone(timezone)
        except ValueError as exc:
            raise InvalidRequest(f"`timezone`: {exc}.", field="timezone") from None
    lo, hi = parse_range(start, end, zone_name)
    return ReportQuery(lo, hi, parse_group_by(group_by), zone_name)


def _group_sql(field: str, query: ReportQuery) -> str:
    if field == "day" and query.timezone != "UTC":
        return f"admitted_at / {US_PER_QUARTER_HOUR}"
    return _GROUP_SQL[field]


def range_clause(
    start: int | None, end: int | None, column: str = "admitted_at"
) -> tuple[str, dict[str, int]]:
    """SQL conditions (joined with AND, possibly none) for an admitted-at range."""
    clauses, params = [], {}
    if start is not None:
        clauses.append(f"{column} >= :start")
        params["start"] = start
    if end is not None:
        clauses.append(f"{column} < :end")
        params["end"] = end
    return " AND ".join(clauses), params


def report_sql(query: ReportQuery, dialect: str) -> tuple[str, dict[str, int]]:
    """The grouped SQL over charged ledger rows; `month` is grouped by day and folded afterwards.

    The `outcome = 'charged'` literal matches the partial index `ix_ledger_charged_report`, which
    holds every column read here. SQLite is told to use it: with statistics from ANALYZE its planner
    prefers a skip-scan of the (team_id, admitted_at) index that reads the table, twice as slow.
    """
    exprs = [_group_sql(g, query) for g in _stored_groups(query.group_by)]
    where, params = range_clause(query.start, query.end)
    hint = " INDEXED BY ix_ledger_charged_report" if dialect == "sqlite" else ""
    sql = (
        "SELECT "
        + "".join(f"{e}, " for e in exprs)
        + "COUNT(*), SUM(message_count), SUM(credits_micros), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM ledger{hint} WHERE outcome = 'charged'"
        + (f" AND {where}" if where else "")
        + (" GROUP BY " + ", ".join(exprs) if exprs else "")
    )
    return sql, params


def adjustments_sql(query: ReportQuery) -> tuple[str, dict[str, int]]:
    """The adjustments of the ledger rows in range, grouped as the report is."""
    exprs = [f"l.{_group_sql(g, query)}" for g in _stored_groups(query.group_by)]
    where, params = range_clause(query.start, query.end, "l.admitted_at")
    sql = (
        "SELECT "
        + "".join(f"{e}, " for e in exprs)
        + "SUM(a.credits_micros) FROM ledger_adjustments a JOIN ledger l ON l.request_id = a.request_id"
        + (f" WHERE {where}" if where else "")
        + (" GROUP BY " + ", ".join(exprs) if exprs else "")
    )
    return sql, params


def _stored_groups(group_by: tuple[str, ...]) -> list[str]:
    """The group fields SQL groups by: `month` needs `day` underneath it."""
    stored = [g for g in group_by if g != "month"]
    if "month" in group_by and "day" not in stored:
        stored.append("day")
    return stored


@dataclass(frozen=True)
class Report:
    """A computed report: its group fields, (group values, sums) rows in order, and totals.

    Sums are integers (credits in micro-credits) until rendered.
    """

    group_by: tuple[str, ...]
    rows: list[tuple[tuple[Any, ...], tuple[int, ...]]]
    totals: tuple[int, ...]

    def json(self) -> dict[str, Any]:
        """The HTTP API's body: {"rows": [...], "totals": {...}}."""
        return {
            "rows": [
                {**dict(zip(self.group_by, group, strict=True)), **_sums_json(sums)}
                for group, sums in self.rows
            ],
            "totals": _sums_json(self.totals),
        }

    def columns(self) -> list[str]:
        """The columns of a row: the group fields, then the sums."""
        return [*self.group_by, *SUMS]

    def text_rows(self) -> list[list[str]]:
        """Every row as text cells: empty for a missing team, exact decimals for credits."""
        return [
            [*("" if v is None else str(v) for v in group), *_sums_text(sums)] for group, sums in self.rows
        ]

    def csv(self, newline: str = "\r\n") -> str:
        """The rows as CSV with a header row (no totals row)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator=newline)
        writer.writerow(self.columns())
        width = len(self.group_by)
        for cells in self.text_rows():
            writer.writerow([_csv_safe(c) if i < width else c for i, c in enumerate(cells)])
        return out.getvalue()

    def table(self) -> list[dict[str, str]]:
        """Rows for a terminal table, ending with a TOTAL row."""
        cols = self.columns()
        rows = [dict(zip(cols, cells, strict=True)) for cells in self.text_rows()]
        total = dict(zip(SUMS, _sums_text(self.totals), strict=True))
        if self.group_by:
            total[self.group_by[0]] = "TOTAL"
        return [*rows, total]


def usage_report(conn: Connection, query: ReportQuery) -> Report:
    """Run the report's queries and fold their rows (days into months, tag lists into tags)."""
    stored = _stored_groups(query.group_by)
    teams = _names(conn, "teams") if "team" in stored else {}
    users = _names(conn, "users") if "user" in stored else {}
    width = len(stored)
    sql, params = report_sql(query, conn.dialect.name)
    found = [
        (row[:width], [int(v or 0) for v in row[width:]] + [0]) for row in conn.execute(text(sql), params)
    ]
    sql, params = adjustments_sql(query)
    for row in conn.execute(text(sql), params):
        if row[-1] is not None:
            found.append((row[:width], [0, 0, int(row[-1]), 0, 0, int(row[-1])]))
    if "day" in stored and query.timezone != "UTC":
        # Quarter hours into their local days (as days since the epoch, as UTC's are stored).
        at = stored.index("day")
        found = [
            ((*key[:at], _local_day(key[at], query.timezone), *key[at + 1 :]), sums) for key, sums in found
        ]
    # Rows are folded by their stored values (a day's month appended after them) and shown once
    # per group (ids as names, days as dates: one to one, so no sum changes).
    day_at = stored.index("day") if "month" in query.group_by else None
    tag_at = stored.index("tag") if "tag" in stored else None
    key_of = _key_of([width if g == "month" else stored.index(g) for g in query.group_by])
    folded: dict[tuple[Any, ...], list[int]] = {}
    totals = [0] * len(SUMS)
    add = operator.add
    for key, sums in found:
        if not any(sums):
            continue  # the one empty aggregate of a query without GROUP BY
        totals = list(map(add, totals, sums))
        values = list(key)
        if day_at is not None:
            values.append(_day(values[day_at])[:7])
        tags = values[tag_at].split(",") if tag_at is not None and values[tag_at] else (None,)
        for tag in tags:
            if tag_at is not None:
                values[tag_at] = tag
            group = key_of(values)
            acc = folded.get(group)
            folded[group] = sums if acc is None else list(map(add, acc, sums))
    shown_as = [_shown(g, teams, users) for g in query.group_by]
    named: dict[tuple[Any, ...], list[int]] = {}
    for group, sums in folded.items():
        shown = tuple(show(v) for show, v in zip(shown_as, group, strict=True))
        acc = named.get(shown)
        named[shown] = sums if acc is None else list(map(add, acc, sums))
    order = sorted(named, key=lambda g: tuple((v is None, v or "") for v in g))
    rows = [(group, tuple(named[group])) for group in order]
    return Report(query.group_by, rows, tuple(totals))


def _key_of(positions: list[int]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """The group of a row's values: those at `positions`, as a tuple."""
    if not positions:
        return lambda values: ()
    if len(positions) == 1:
        (at,) = positions
        return lambda values: (values[at],)
    return operator.itemgetter(*positions)


def _names(conn: Connection, table: str) -> dict[int, str]:
    return {int(i): str(n) for i, n in conn.execute(text(f"SELECT id, name FROM {table}")).all()}


def _shown(field: str, teams: dict[int, str], users: dict[int, str]) -> Callable[[Any], Any]:
    """How a group field's stored value is shown: names for ids, ISO dates for days."""
    if field == "team":
        return lambda v: None if v is None else teams.get(v, str(v))
    if field == "user":
        return lambda v: users.get(v, str(v))
    if field == "day":
        return _day
    return lambda v: v  # `month` is folded as its text already


@functools.lru_cache(maxsize=65_536)
def _local_day(quarter: int | None, zone_name: str) -> int | None:
    """The local day (days since 1970-01-01) of a quarter hour since the epoch, in the zone."""
    if quarter is None:
        return None
    moment = datetime.fromtimestamp(int(quarter) * (US_PER_QUARTER_HOUR // 1_000_000), zone(zone_name))
    return (moment.date() - EPOCH_DAY).days


@functools.lru_cache(maxsize=4096)
def _day(value: int) -> str:
    return (EPOCH_DAY + timedelta(days=int(value))).isoformat()


def _sums_json(sums: tuple[int, ...]) -> dict[str, Any]:
    return {name: credits_json(v) if name in CREDIT_SUMS else v for name, v in zip(SUMS, sums, strict=True)}


def _sums_text(sums: tuple[int, ...]) -> list[str]:
    return [format_credits(v) if name in CREDIT_SUMS else str(v) for name, v in zip(SUMS, sums, strict=True)]


def _csv_safe(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell
