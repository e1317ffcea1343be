"""The overview's figures: billing reports over the report index, earlier days cached, today live.

A 30-day report over a million ledger rows takes about half a second, too long for a page. The
days before today change rarely (a late settlement, an adjustment), so their sums are computed
once per process and kept a minute; today's, a few tens of milliseconds, are kept 5 seconds. Once
older than that, a page is answered with the kept figures while they are computed again in the
background; when the UTC day changes they are computed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from gateway.ops import reports
from gateway.store import Store

DAYS = 30
TOP = ("user", "end_user", "model")
US_PER_DAY = reports.US_PER_DAY
CREDITS = reports.SUMS.index("credits")
REQUESTS = reports.SUMS.index("requests")


@dataclass
class Figures:
    """Sums by group: {(field, value): [requests, ..., credits, ...]} as `reports.SUMS` orders them."""

    by_team_day: dict[tuple[Any, str], list[int]] = field(default_factory=dict)
    top: dict[str, dict[Any, list[int]]] = field(default_factory=dict)
    totals: list[int] = field(default_factory=lambda: [0] * len(reports.SUMS))


def day_start(at_us: int) -> int:
    return at_us - at_us % US_PER_DAY


def month_start(today_us: int) -> int:
    today = datetime.fromtimestamp(today_us / 1_000_000, UTC).date()
    first = today.replace(day=1)
    return (first - date(1970, 1, 1)).days * US_PER_DAY


def days_shown(today_us: int) -> list[str]:
    """The last DAYS UTC days, today last, as ISO dates."""
    today = date(1970, 1, 1) + timedelta(days=today_us // US_PER_DAY)
    return [(today - timedelta(days=n)).isoformat() for n in range(DAYS - 1, -1, -1)]


def _add(into: dict[Any, list[int]], key: Any, sums: Iterable[int]) -> None:
    acc = into.get(key)
    into[key] = list(sums) if acc is None else [a + b for a, b in zip(acc, sums, strict=True)]


def figures(conn: Connection, start: int, end: int, top_from: int) -> Figures:
    """Unit of work: credits by team and day over [start, end); top groups and totals over [top_from, end)."""
    out = Figures()
    if end <= start:
        return out
    by_day = reports.usage_report(conn, reports.ReportQuery(start, end, ("team", "day")))
    for (team, day), sums in by_day.rows:
        out.by_team_day[(team, day)] = list(sums)
    top_start = max(top_from, start)
    if end > top_start:
        for name in TOP:
            report = reports.usage_report(conn, reports.ReportQuery(top_start, end, (name,)))
            out.top[name] = {group[0]: list(sums) for group, sums in report.rows}
        out.totals = list(reports.usage_report(conn, reports.ReportQuery(top_start, end, ())).totals)
    return out


def merge(past: Figures, today: Figures) -> Figures:
    """The two periods' sums together."""
    out = Figures(dict(past.by_team_day), {}, [a + b for a, b in zip(past.totals, today.totals, strict=True)])
    for key, sums in today.by_team_day.items():
        _add(out.by_team_day, key, sums)
    for name in TOP:
        merged: dict[Any, list[int]] = {k: list(v) for k, v in past.top.get(name, {}).items()}
        for key, sums in today.top.get(name, {}).items():
            _add(merged, key, sums)
        out.top[name] = merged
    return out


class Kept:
    """One value computed by a unit of work, kept for `ttl` seconds, then refreshed in the
    background while the kept one is still answered (computed at once when its key changes)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._key: Any = None
        self._value: Figures | None = None
        self._at = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def _refresh_in_background(self, key: Any, compute: Callable[[], Awaitable[Figures]]) -> None:
        try:
            value = await compute()
            if self._key == key:
                self._value, self._at = value, time.monotonic()
        finally:
            self._refresh = None

    async def get(self, key: Any, compute: Callable[[], Awaitable[Figures]]) -> Figures:
        if self._value is None or self._key != key:
            self._value = await compute()
            self._key, self._at = key, time.monotonic()
        elif time.monotonic() - self._at > self.ttl and self._refresh is None:
            loop = asyncio.get_running_loop()
            self._refresh = loop.create_task(self._refresh_in_background(key, compute))
        return self._value

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh


class OverviewCache:
    """The days before today (kept a minute) and today (kept 5 seconds), per process."""

    def __init__(self, past_ttl: float = 60.0, today_ttl: float = 5.0) -> None:
        self._past = Kept(past_ttl)
        self._today = Kept(today_ttl)

    async def past(self, store: Store, today: int) -> Figures:
        """The figures of the days before `today` (its start, in microseconds)."""
        start = min(today - (DAYS - 1) * US_PER_DAY, month_start(today))
        return await self._past.get(today, lambda: store.read(figures, start, today, month_start(today)))

    async def today(self, store: Store, today: int) -> Figures:
        """Today's figures so far (at most a few seconds old)."""
        return await self._today.get(today, lambda: store.read(_today_figures, today))

    async def month(self, store: Store, at: int) -> Figures:
        """This month's (and the last 30 days') figures: the earlier days and today, together."""
        today = day_start(at)
        return merge(await self.past(store, today), await self.today(store, today))

    async def close(self) -> None:
        await self._past.close()
        await self._today.close()


def _today_figures(conn: Connection, today: int) -> Figures:
    return figures(conn, today, today + US_PER_DAY, today)
