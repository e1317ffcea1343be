"""Settle an admitted chat request: write its outcome, retry in the background while the database is down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import Connection

from gateway.core import idempotency, metering
from gateway.core.idempotency import Answer, Reservation
from gateway.core.metering import Admission, Settlement
from gateway.core.settlement import ledger_outcome
from gateway.core.settlement import settle as settle_hold
from gateway.errors import LedgerUnavailable
from gateway.web import shutdown
from gateway.web.state import BACKGROUND, GAUGES, METRICS, SETTLING, STORE

log = logging.getLogger(__name__)

SETTLE_RETRY_MAX_SECONDS = 5.0


@dataclass
class Progress:
    """How far an admitted request got: what to settle, and when upstream was done with."""

    settlement: Settlement
    started: float
    forwarded_at: float
    upstream_done: float
    reservation: Reservation | None = None
    # The first answer, kept for replays when the request carries an Idempotency-Key.
    answer: Answer | None = None
    settled: bool = False
    # Its hold was expired by a sweep before it settled: it is not charged (see `settle`).
    expired: bool = False

    def unit(self, admission: Admission) -> tuple[Callable[..., bool], tuple[Any, ...]]:
        """The unit of work that settles the request, and its arguments (minus the time)."""
        if self.reservation is None:
            return settle_hold, (admission, self.settlement)
        return _settle_once, (admission, self.settlement, self.reservation, self.answer)


def _settle_once(
    conn: Connection,
    admission: Admission,
    settlement: Settlement,
    reservation: Reservation,
    answer: Answer | None,
    at: int,
) -> bool:
    return idempotency.settle_once(conn, admission, settlement, at, reservation, answer)


# How far an admitted request got, for its access log line.
PROGRESS: web.RequestKey[Progress] = web.RequestKey("progress")


async def settle(app: web.Application, admission: Admission, progress: Progress) -> None:
    """Write the settlement; if the database is down, keep retrying in the background."""
    store = app[STORE]
    settlement = progress.settlement
    progress.settled = True
    settled = time.perf_counter()
    retrying = False
    fn, args = progress.unit(admission)
    # Not cut while it writes: a cut would leave the settlement's outcome unheard, and not retried.
    current = asyncio.current_task()
    shutdown.busy(app, current)
    try:
        done = await store.run(fn, *args, metering.now_us())
    except LedgerUnavailable:
        retrying = True
        task = asyncio.get_running_loop().create_task(_settle_later(app, admission, progress))
        app[BACKGROUND].add(task)
        task.add_done_callback(app[BACKGROUND].discard)
        return
    finally:
        shutdown.idle(app, current)
        del current  # no reference cycle through an error's traceback
        if not retrying:
            app[SETTLING].discard(admission.charge.request_id)
    if not done:
        # Its process stalled past the hold TTL and another released the hold: the budget may have
        # been given to other requests since, so charging now could overspend. It stays `expired`,
        # uncharged, and the caller is told so (`forward`, EXPIRED_NOTE).
        progress.expired = True
        log.warning(
            "request %s settled after its hold expired; left as expired, not charged",
            admission.charge.request_id,
        )
        app[METRICS].requests.labels(admission.charge.model, "expired").inc()
        return
    finished = time.perf_counter()
    record_settlement(app, admission, settlement, finished - progress.started)
    app[METRICS].overhead.observe((progress.forwarded_at - progress.started) + (finished - settled))


async def _settle_later(app: web.Application, admission: Admission, progress: Progress) -> None:
    delay = 0.1
    settlement = progress.settlement
    fn, args = progress.unit(admission)
    try:
        while True:
            await asyncio.sleep(delay)
            try:
                done = await app[STORE].run(fn, *args, metering.now_us())
                if not done:
                    # Gone: expired by a sweep, or settled by an earlier try whose commit went
                    # through although its answer was lost with the connection.
                    ours = await app[STORE].read(ledger_outcome, admission.charge.request_id)
                    done = ours == settlement.outcome
            except LedgerUnavailable:
                delay = min(delay * 2, SETTLE_RETRY_MAX_SECONDS)
                continue
            if done:
                record_settlement(app, admission, settlement, None)
            return
    finally:
        app[SETTLING].discard(admission.charge.request_id)


def record_settlement(
    app: web.Application, admission: Admission, settlement: Settlement, duration: float | None
) -> None:
    """Count a settled request in the metrics."""
    metrics = app[METRICS]
    charge = admission.charge
    metrics.requests.labels(charge.model, settlement.outcome).inc()
    if settlement.outcome == "charged":
        team = charge.caller.team_name or ""
        metrics.credits_charged.labels(charge.model, team).inc(charge.credits / 1_000_000)
        metrics.messages_charged.labels(charge.model, team).inc(charge.message_count)
        if settlement.prompt_tokens is not None:
            metrics.tokens.labels(charge.model, "prompt").inc(settlement.prompt_tokens)
        if settlement.completion_tokens is not None:
            metrics.tokens.labels(charge.model, "completion").inc(settlement.completion_tokens)
    if duration is not None:
        metrics.request_duration.labels(charge.model, "true" if charge.stream else "false").observe(duration)
    if admission.allocations:
        # The budget gauges refresh soon after, once for a burst of settlements.
        app[GAUGES].mark_dirty()
