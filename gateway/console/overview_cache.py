"""The overview's figures: billing reports over the report index, earlier days cached, today live.

A 30-day report over a million ledger rows takes a few tenths of a second, too long for a page. The
days before today change rarely (a late settlement, an adjustment), so their sums are computed
once per process and kept: refreshed in the background once they are `ttl` seconds old (the page
meanwhile shows the kept figures), and computed again at once when the UTC day changes. Today's
sums are read on every page, from the same report function over today alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
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


class OverviewCache:
    """The days before today, per process (see the module's docstring)."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._key: int | None = None
        self._past: Figures | None = None
        self._at = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def _compute(self, store: Store, today: int) -> Figures:
        start = today - (DAYS - 1) * US_PER_DAY
        return await store.read(figures, min(start, month_start(today)), today, month_start(today))

    async def _refresh_in_background(self, store: Store, today: int) -> None:
        try:
            past = await self._compute(store, today)
            if self._key == today:
                self._past, self._at = past, time.monotonic()
        finally:
            self._refresh = None

    async def past(self, store: Store, today: int) -> Figures:
        """The figures of the days before `today` (its start, in microseconds)."""
        if self._past is None or self._key != today:
            self._past = await self._compute(store, today)
            self._key, self._at = today, time.monotonic()
        elif time.monotonic() - self._at > self.ttl and self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_in_background(store, today))
        return self._past

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            try:
                await self._refresh
            except (asyncio.CancelledError, Exception):
                pass


def _today_figures(conn: Connection, today: int, at: int) -> Figures:
    return figures(conn, today, at + 1, today)


async def month_figures(cache: OverviewCache, store: Store, at: int) -> Figures:
    """This month's (and the last 30 days') figures: the cached earlier days and today, read now."""
    today = day_start(at)
    past = await cache.past(store, today)
    return merge(past, await store.read(_today_figures, today, at))
