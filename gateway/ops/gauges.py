"""Budget gauges: every budget's limit, spent and remaining, refreshed from the database.

Each process exports every budget, not only those its own traffic touched, so a dashboard shows
all of them whichever replica it scrapes. The gauges are read with one query for all budgets (after
one for the window rules they use): every `REFRESH_INTERVAL_SECONDS` (to see other replicas' spend
and admin changes), and shortly after this process settles a request on a budget (`mark_dirty`),
coalescing a burst of settlements into one refresh rather than a query per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

from sqlalchemy import BigInteger, Connection, TextClause, bindparam, text

from gateway.core import holding, metering
from gateway.core.windows import PERIODS
from gateway.errors import LedgerUnavailable
from gateway.ops import subjects
from gateway.ops.metrics import Metrics
from gateway.store import Store

log = logging.getLogger(__name__)

REFRESH_INTERVAL_SECONDS = 5.0
# After a settlement, wait this long for more before reading: one query per burst.
DEBOUNCE_SECONDS = 0.5

# One row per budget, with its counter in the current window of its period (if any).
_BUDGETS_NOW = (
    f"SELECT b.scope, {subjects.SUBJECT_NAME}, b.period, b.limit_micros, "
    "COALESCE(c.spent_micros, 0), COALESCE(c.held_micros, 0) "
    f"FROM budgets b {subjects.SUBJECT_JOINS} "
    "{current_counter}"
    # Not the end users' budgets made from defaults, one per end user: labels stay bounded. (The
    # defaults themselves have no counter.)
    " WHERE b.deleted_at IS NULL AND b.default_id IS NULL "
    "AND NOT (b.scope = 'end_user' AND b.subject = CAST(b.user_id AS VARCHAR(32)) || '/*')"
)


@functools.cache
def _budgets_now(dialect: str) -> TextClause:
    sql = _BUDGETS_NOW.replace("{current_counter}", holding.current_counter(dialect))
    return text(sql).bindparams(*(bindparam(period, type_=BigInteger) for period in PERIODS))


Labels = tuple[str, str, str]


@dataclass(frozen=True)
class BudgetNow:
    """A budget in its current window, in micro-credits."""

    scope: str
    subject: str  # team name, user name, or key id
    period: str
    limit: int
    spent: int
    held: int

    @property
    def remaining(self) -> int:
        """What is left to admit, as the admin API reports it (never below zero)."""
        return max(self.limit - self.spent - self.held, 0)


def budgets_now(conn: Connection, at: int) -> list[BudgetNow]:
    """Unit of work: every budget with its spent and held in the window containing `at` (µs)."""
    holding.learn_rules(conn.execute(text(holding.KNOWN_RULES)).all())
    params = holding.window_params(holding.WINDOWS.at(at))
    rows = conn.execute(_budgets_now(conn.dialect.name), params).all()
    return [BudgetNow(r[0], str(r[1]), r[2], int(r[3]), int(r[4]), int(r[5])) for r in rows]


class BudgetGauges:
    """Keeps the budget gauges of one `Metrics` equal to the database."""

    def __init__(self, metrics: Metrics, interval: float = REFRESH_INTERVAL_SECONDS) -> None:
        self.metrics = metrics
        self.interval = interval
        self._dirty = asyncio.Event()
        self._shown: set[Labels] = set()
        # Refreshes are serialized, so an older reading never overwrites a newer one.
        self._lock = asyncio.Lock()

    def mark_dirty(self) -> None:
        """This process changed a budget's counters: refresh soon (many calls, one refresh)."""
        self._dirty.set()

    async def refresh(self, store: Store) -> None:
        """Read every budget now and show exactly those."""
        async with self._lock:
            self.show(await store.read(budgets_now, metering.now_us()))

    def show(self, budgets: list[BudgetNow]) -> None:
        """Set the gauges to `budgets`, removing the series of budgets no longer there."""
        m = self.metrics
        shown: set[Labels] = set()
        for b in budgets:
            labels = (b.scope, b.subject, b.period)
            shown.add(labels)
            m.budget_limit.labels(*labels).set(b.limit / 1_000_000)
            m.budget_spent.labels(*labels).set(b.spent / 1_000_000)
            m.budget_remaining.labels(*labels).set(b.remaining / 1_000_000)
        for labels in self._shown - shown:
            for gauge in (m.budget_limit, m.budget_spent, m.budget_remaining):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._shown = shown

    async def run_forever(self, store: Store) -> None:
        """Refresh now, then every interval and soon after `mark_dirty`, until cancelled."""
        while True:
            try:
                await self.refresh(store)
            except LedgerUnavailable:
                log.warning("budget gauges not refreshed: database unavailable")
            except Exception:
                log.exception("budget gauges refresh failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._dirty.wait()
            if self._dirty.is_set():
                await asyncio.sleep(DEBOUNCE_SECONDS)
            # Cleared before reading, so a settlement during the read triggers the next refresh.
            self._dirty.clear()
