"""Budget windows: calendar periods in a budget's time zone and billing cycle (pure, no I/O).

A budget's `Rule` says where its windows begin: local midnight in its zone (IANA, via `zoneinfo`),
weeks from its week day, months from its cycle day (1-28). A window begins at the first instant
whose local date is its first day, so a day across a DST change lasts 23 or 25 hours, a midnight
that does not exist (a gap) begins the day when the clocks jump, and windows tile time: each
instant lies in exactly one, and none is ever skipped or begun twice. The counters' key of a window
is its start in whole seconds since the epoch. UTC/monday/1 (`UTC_RULE`) is every budget made
before rules existed, and the cheapest: its keys change only at a UTC midnight.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("daily", "weekly", "monthly", "total")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# The last cycle day every month has.
MAX_MONTH_DAY = 28

# The `total` window never resets; it starts at the epoch.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000
_SECOND_US = 1_000_000


class Rule(NamedTuple):
    """Where a budget's windows begin: its zone, its weeks' first day, its months' cycle day."""

    zone: str = "UTC"
    week_starts: str = "monday"
    month_starts_on: int = 1

    def label(self) -> str:
        """How the SQL finds this rule's keys in `WindowBook`'s JSON (see gateway/core/holding.py)."""
        return f"{self.zone} {self.week_starts} {self.month_starts_on}"


UTC_RULE = Rule()


def check_zone(name: object) -> str:
    """An IANA zone name that `zoneinfo` knows, or ValueError saying what is wrong."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError(f"{name!r} is not a time zone name; expected an IANA name such as 'Europe/Berlin'")
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; expected an IANA name such as 'Europe/Berlin'"
        ) from None
    return name


def check_week_starts(name: object) -> str:
    """A lower-case week day name, or ValueError."""
    if not isinstance(name, str) or name.lower() not in WEEKDAYS:
        raise ValueError(f"{name!r} is not a week day; expected one of {', '.join(WEEKDAYS)}")
    return name.lower()


def check_month_day(day: object) -> int:
    """A billing cycle day, 1 to 28, or ValueError."""
    if isinstance(day, str) and day.strip().isdigit():
        day = int(day)
    if isinstance(day, bool) or not isinstance(day, int) or not 1 <= day <= MAX_MONTH_DAY:
        raise ValueError(
            f"the month's start day must be a whole number from 1 to {MAX_MONTH_DAY}; got {day!r}"
        )
    return day


@functools.lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The zone of that name (KeyError-free: ZoneInfoNotFoundError for one unknown)."""
    if name.startswith(("/", ".")) or ".." in name:
        raise ValueError(name)
    return ZoneInfo(name)


def _floor_day(period: str, day: date, rule: Rule) -> date:
    """The first day of the window of `period` that the local date `day` falls in."""
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=(day.weekday() - WEEKDAYS.index(rule.week_starts)) % 7)
    cycle = rule.month_starts_on
    if day.day >= cycle:
        return day.replace(day=cycle)
    return (day.replace(day=1) - timedelta(days=1)).replace(day=cycle)


def _next_day(period: str, first: date, rule: Rule) -> date:
    """The first day of the window after the one beginning on `first`."""
    if period == "daily":
        return first + timedelta(days=1)
    if period == "weekly":
        return first + timedelta(days=7)
    return (first.replace(day=1) + timedelta(days=32)).replace(day=rule.month_starts_on)


@functools.lru_cache(maxsize=4096)
def _day_start(day: date, zone_name: str) -> int:
    """The first instant (whole seconds since the epoch) whose local date in the zone is `day` or later."""
    tz = zone(zone_name)
    midnight = datetime(day.year, day.month, day.day)
    # Both readings of a local midnight: the same instant, unless it falls in a fold (the earlier
    # is then the first) or a gap (the day then begins at the jump, between the two).
    early, late = sorted(int(midnight.replace(tzinfo=tz, fold=fold).timestamp()) for fold in (0, 1))
    if _local_date(early, tz) >= day:
        return early
    while late - early > 1:
        middle = (early + late) // 2
        if _local_date(middle, tz) >= day:
            late = middle
        else:
            early = middle
    return late


def _local_date(seconds: int, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(seconds, tz).date()


def bounds(period: str, us: int, rule: Rule = UTC_RULE) -> tuple[int, int | None]:
    """The window of `period` containing `us` (microseconds since the epoch) under `rule`: its
    start (the counters' key) and its end, in whole seconds since the epoch (end None: `total`)."""
    if period == "total":
        return 0, None
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIODS)}")
    seconds = us // _SECOND_US
    first = _floor_day(period, _local_date(seconds, zone(rule.zone)), rule)
    following = _next_day(period, first, rule)
    # A clock set back across midnight can give an instant of the new window an earlier local date.
    while _day_start(following, rule.zone) <= seconds:
        first, following = following, _next_day(period, following, rule)
    return _day_start(first, rule.zone), _day_start(following, rule.zone)


def window_start(period: str, now: datetime, rule: Rule = UTC_RULE) -> datetime:
    """The start of the window of `period` that contains `now` (an aware datetime), in UTC."""
    return from_key(bounds(period, _us_of(now), rule)[0])


def window_end(period: str, start: datetime, rule: Rule = UTC_RULE) -> datetime | None:
    """When the window starting at `start` resets, in UTC; None for `total`."""
    end = bounds(period, _us_of(start), rule)[1]
    return None if end is None else from_key(end)


def window_key(period: str, now: datetime, rule: Rule = UTC_RULE) -> int:
    """The window's start as integer seconds since the epoch: the counters' key."""
    return bounds(period, _us_of(now), rule)[0]


def _us_of(moment: datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * _SECOND_US + delta.microseconds


def window_keys(us: int) -> dict[str, int]:
    """The key of each period's UTC_RULE window (in `PERIODS` order) at `us` microseconds since the epoch."""
    # Every such window starts at a UTC midnight, so the keys change only from one day to the next.
    return dict(zip(PERIODS, _window_keys_of_day(us // DAY_US), strict=True))


@functools.lru_cache(maxsize=4)
def _window_keys_of_day(day: int) -> tuple[int, ...]:
    return tuple(bounds(period, day * DAY_US)[0] for period in PERIODS)


class Windows:
    """The current windows of every rule a `WindowBook` knows, for one span of time [`lo`, `hi`)
    (microseconds) in which none of them changes: `utc`, UTC_RULE's keys by period; `json`, every
    other rule's keys by "ZONE WEEK_DAY MONTH_DAY PERIOD" (`Rule.label` and the period), as the SQL
    looks them up."""

    __slots__ = ("hi", "json", "lo", "rules", "utc")

    def __init__(self, us: int, rules: frozenset[Rule]) -> None:
        day = us // DAY_US
        self.utc = window_keys(us)
        self.rules = rules
        lo, hi = day * DAY_US, (day + 1) * DAY_US
        keys: dict[str, int] = {}
        for rule in sorted(rules - {UTC_RULE}):
            label = rule.label()
            for period in PERIODS:
                start, end = bounds(period, us, rule)
                keys[f"{label} {period}"] = start
                lo = max(lo, start * _SECOND_US)
                if end is not None:
                    hi = min(hi, end * _SECOND_US)
        self.lo, self.hi = lo, hi
        self.json = json.dumps(keys, separators=(",", ":"))


class WindowBook:
    """The rules this process's budgets use, learned as admission meets them, and their windows now.

    `at(us)` is computed once per span in which no known rule's window changes (for UTC_RULE
    alone: a UTC day), so admission asks for windows per request at the cost of a comparison.
    """

    def __init__(self) -> None:
        self.rules: frozenset[Rule] = frozenset({UTC_RULE})
        self._recent: tuple[Windows, ...] = ()

    def at(self, us: int) -> Windows:
        """The windows of every known rule at `us` (microseconds since the epoch)."""
        for windows in self._recent:
            if windows.lo <= us < windows.hi:
                return windows
        windows = Windows(us, self.rules)
        # Two kept: a batch may straddle a boundary, its requests' times a little out of order.
        self._recent = (windows, *self._recent[:1])
        return windows

    def forget(self) -> None:
        """Know UTC_RULE alone again (for a process that goes on with another database: every
        admission would otherwise send the windows of rules no budget of it has)."""
        self.rules = frozenset({UTC_RULE})
        self._recent = ()

    def learn(self, rules: set[Rule] | frozenset[Rule]) -> None:
        """Know these rules too (the windows are computed again)."""
        if not rules <= self.rules:
            self.rules = self.rules | frozenset(rules)
            self._recent = ()


def from_key(key: int) -> datetime:
    """A window key back to an aware UTC datetime."""
    return datetime.fromtimestamp(key, UTC)


def from_us(us: int) -> datetime:
    """Integer microseconds since the epoch (how the database keeps times) as an aware UTC datetime."""
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def iso_us(us: int | None) -> str | None:
    """Integer microseconds since the epoch as ISO 8601 with a Z suffix, or None."""
    return None if us is None else isoformat(from_us(us))


def isoformat(moment: datetime | None) -> str | None:
    """ISO 8601 with a Z suffix, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_key(key: int | None, zone_name: str = "UTC") -> str | None:
    """A window key (or end) as ISO 8601 with the offset of the zone there ("Z" in UTC), or None."""
    if key is None:
        return None
    if zone_name == "UTC":
        return isoformat(from_key(key))
    return datetime.fromtimestamp(key, zone(zone_name)).isoformat()


def shown(period: str, key: int, rule: Rule = UTC_RULE) -> tuple[str | None, str | None]:
    """A window's `window_start` and `resets_at` as shown everywhere: ISO 8601 with the offset of
    the budget's zone."""
    end = bounds(period, key * _SECOND_US, rule)[1]
    return iso_key(key, rule.zone), iso_key(end, rule.zone)
