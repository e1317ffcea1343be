"""Budget windows: UTC calendar periods (pure, no I/O)."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

PERIODS = ("daily", "weekly", "monthly", "total")

# The `total` window never resets; it starts at the epoch.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_US = 86_400_000_000


def window_start(period: str, now: datetime) -> datetime:
    """The start of the window of `period` that contains `now` (a UTC datetime)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())
    if period == "monthly":
        return day.replace(day=1)
    if period == "total":
        return EPOCH
    raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIODS)}")


def window_end(period: str, start: datetime) -> datetime | None:
    """When the window starting at `start` resets; None for `total`."""
    if period == "daily":
        return start + timedelta(days=1)
    if period == "weekly":
        return start + timedelta(days=7)
    if period == "monthly":
        return (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    if period == "total":
        return None
    raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIODS)}")


def window_key(period: str, now: datetime) -> int:
    """The window's start as integer seconds since the epoch: the counters' key."""
    return int(window_start(period, now).timestamp())


def window_keys(us: int) -> dict[str, int]:
    """The key of each period's window (in `PERIODS` order) at `us` microseconds since the epoch."""
    # Every window starts at a UTC midnight, so the keys change only from one day to the next.
    return dict(zip(PERIODS, _window_keys_of_day(us // DAY_US), strict=True))


@functools.lru_cache(maxsize=4)
def _window_keys_of_day(day: int) -> tuple[int, ...]:
    midnight = datetime.fromtimestamp(day * 86_400, UTC)
    return tuple(window_key(period, midnight) for period in PERIODS)


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
