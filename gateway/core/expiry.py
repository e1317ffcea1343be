"""Hold expiry: this process beats in the `instances` table, and releases holds of processes that stopped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from gateway.core import idempotency, metering
from gateway.errors import LedgerUnavailable
from gateway.ops.metrics import Metrics
from gateway.store import Store

log = logging.getLogger(__name__)

# Instances silent for this long are forgotten altogether.
FORGET_AFTER_US = 24 * 3600 * 1_000_000


def sweep_interval(ttl: float) -> float:
    """How often to beat and sweep: a few times per TTL, at most every 15 seconds."""
    return min(ttl / 4, 15.0)


async def beat_and_sweep(
    store: Store,
    metrics: Metrics,
    instance_id: str,
    ttl: float,
    settling: Collection[str] = (),
    *,
    sweeper: bool = True,
    clock: Callable[[], int] = metering.now_us,
) -> int:
    """Mark this process alive, then release every hold older than the TTL whose process is silent.

    Also this process's own holds older than the TTL that are not in `settling` (the requests it
    has admitted and not yet settled): they were lost, e.g. in an outage during an admission.
    Not the `sweeper` (the other workers of a `serve --workers` server): only those of its own,
    and no purge of old idempotency keys; one sweeper a server is enough.

    `clock` is this process's time (microseconds); on PostgreSQL whether a process is silent is
    judged by the database's clock instead, so replicas' clocks may disagree.
    """
    now = clock()
    await store.run(metering.heartbeat, instance_id, now, now - FORGET_AFTER_US)
    if sweeper:
        await store.run(idempotency.purge, now)
    # Other processes' holds come in batches of `batch`; this one's own all at once.
    batch = 500 if sweeper else 0
    total = 0
    while True:
        expired = await store.run(
            metering.expire_holds,
            now - int(ttl * 1_000_000),
            clock(),
            batch,
            instance_id,
            frozenset(settling),
        )
        total += expired
        if expired:
            metrics.holds_expired.inc(expired)
            log.warning("released %d hold(s) left by stopped gateway processes or lost in an outage", expired)
        if expired < batch or not sweeper:
            return total


async def run_forever(
    store: Store,
    metrics: Metrics,
    instance_id: str,
    ttl: float,
    settling: Collection[str] = (),
    *,
    sweeper: bool = True,
) -> None:
    """Beat and sweep every interval until cancelled; a database outage is logged and outlived."""
    interval = sweep_interval(ttl)
    while True:
        await asyncio.sleep(interval)
        try:
            await beat_and_sweep(store, metrics, instance_id, ttl, settling, sweeper=sweeper)
        except LedgerUnavailable:
            log.warning("hold expiry skipped: database unavailable")
        except Exception:
            log.exception("hold expiry failed")
