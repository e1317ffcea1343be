"""Hold expiry: this process beats in the `instances` table, and releases holds of processes that stopped.

The loop (`run_forever`, `beat_and_sweep`) and its units of work (`heartbeat`, `expire_holds`, `retire`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import Connection, text

from gateway.core import idempotency, metering, settlement
from gateway.errors import LedgerUnavailable
from gateway.ops.metrics import Metrics
from gateway.store import Store, sql_of

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
    await store.run(heartbeat, instance_id, now, now - FORGET_AFTER_US)
    if sweeper:
        await store.run(idempotency.purge, now)
    # Other processes' holds come in batches of `batch`; this one's own all at once.
    batch = 500 if sweeper else 0
    total = 0
    while True:
        expired = await store.run(
            expire_holds,
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


# A hold's columns, as `expire_holds` reads them.
_HOLD_COLUMNS = (
    "request_id, key_id, user_id, team_id, model, message_count, unit_price_micros AS unit_price, "
    "credits_micros AS credits, stream, admitted_at, end_user, tags"
)
# PostgreSQL's own clock in microseconds since the epoch. Replicas' clocks may disagree; on
# PostgreSQL heartbeats are written and judged by this one clock, so a replica whose clock runs
# ahead cannot take a live process for a dead one (SQLite: one machine, one clock).
DB_NOW_US = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
_STALE_HOLDS = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.admitted_at < :cutoff AND NOT EXISTS "
    "(SELECT 1 FROM instances i WHERE i.id = h.instance_id AND i.heartbeat_at >= :cutoff) "
    "ORDER BY admitted_at LIMIT :limit"
)
# The same on PostgreSQL: a process is alive if it beat within the TTL (`:at - :cutoff`) by the
# database's clock, whatever the sweeping replica's clock says.
_STALE_HOLDS_PG = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.admitted_at < :cutoff AND NOT EXISTS "
    "(SELECT 1 FROM instances i WHERE i.id = h.instance_id "
    f"AND i.heartbeat_at >= {DB_NOW_US} - (:at - :cutoff)) "
    "ORDER BY admitted_at LIMIT :limit"
)
# An Idempotency-Key reserved by a request that never settled is freed with its hold.
_FREE_IDEMPOTENCY_KEY = "DELETE FROM idempotency_keys WHERE request_id = :request_id AND state = 'in_flight'"
# This process's own old holds: those it is not settling were lost (see `expire_holds`).
_OWN_STALE_HOLDS = text(
    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE instance_id = :instance_id AND admitted_at < :cutoff"
)
_ALLOCATIONS_OF = text(
    "SELECT budget_id, window_start FROM allocations WHERE request_id = :request_id ORDER BY budget_id"
)


def expire_holds(
    conn: Connection,
    cutoff: int,
    at: int,
    limit: int = 500,
    instance_id: str | None = None,
    settling: frozenset[str] = frozenset(),
) -> int:
    """Release holds admitted before `cutoff` whose process stopped beating; returns how many.

    With `instance_id`, also this process's own holds admitted before `cutoff` that it is not
    `settling`: holds it lost track of, as when the connection broke while an admission committed
    (the caller was answered 503, yet the hold was written).

    Safe to run in many processes at once: a hold is released only by whoever deletes its row.
    """
    db = sql_of(conn)
    if conn.dialect.name == "postgresql":
        stale = conn.execute(_STALE_HOLDS_PG, {"cutoff": cutoff, "at": at, "limit": limit})
    else:
        stale = conn.execute(_STALE_HOLDS, {"cutoff": cutoff, "limit": limit})
    rows = list(stale.mappings().all())
    if instance_id is not None:
        own = conn.execute(_OWN_STALE_HOLDS, {"instance_id": instance_id, "cutoff": cutoff}).mappings()
        rows += [row for row in own if row["request_id"] not in settling]
    if conn.dialect.name == "postgresql":
        # The settlement statement, which locks counters in the order admissions do: a sweep of
        # many holds cannot deadlock with them.
        ids = sorted({row["request_id"] for row in rows})
        if not ids:
            return 0
        expired = [
            rid
            for rid, done in zip(
                ids,
                settlement.settle_pg(conn, [(rid, metering.Settlement("expired"), at) for rid in ids]),
                strict=True,
            )
            if done
        ]
        if expired:
            db.many(_FREE_IDEMPOTENCY_KEY, [(rid,) for rid in expired])
        return len(expired)
    ledger_rows: list[tuple[Any, ...]] = []
    # Released credits per counter, applied last (SQLite: the batch holds the only write lock).
    released: dict[tuple[int, int], tuple[int, int]] = {}
    for row in rows:
        if not db.changed(settlement.DELETE_HOLD, {"request_id": row["request_id"]}):
            continue
        db.many(_FREE_IDEMPOTENCY_KEY, [(row["request_id"],)])
        allocations = conn.execute(_ALLOCATIONS_OF, {"request_id": row["request_id"]}).all()
        # An expired hold charges nothing.
        settlement.release(released, [(b, w) for b, w in allocations], row["credits"], 0)
        ledger_rows.append(
            settlement.ledger_row(
                row["request_id"],
                row["admitted_at"],
                (row["key_id"], row["user_id"], row["team_id"]),
                (row["model"], row["message_count"], row["unit_price"], row["stream"]),
                0,
                metering.Settlement("expired"),
                at,
                (row["end_user"], row["tags"]),
            )
        )
    settlement.write_settlements(db, ledger_rows, released)
    return len(ledger_rows)


_UPSERT_INSTANCE = text(
    "INSERT INTO instances (id, started_at, heartbeat_at) VALUES (:id, :at, :at) "
    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
_FORGET_INSTANCES = text("DELETE FROM instances WHERE heartbeat_at < :cutoff")
_UPSERT_INSTANCE_PG = text(
    f"INSERT INTO instances (id, started_at, heartbeat_at) VALUES (:id, {DB_NOW_US}, {DB_NOW_US}) "
    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
)
_FORGET_INSTANCES_PG = text(f"DELETE FROM instances WHERE heartbeat_at < {DB_NOW_US} - :age")


def heartbeat(conn: Connection, instance_id: str, at: int, forget_before: int) -> None:
    """Mark this process alive (its holds are not expired) and forget long-dead processes.

    On PostgreSQL the beat is the database's time, not `at` (see DB_NOW_US).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_UPSERT_INSTANCE_PG, {"id": instance_id})
        conn.execute(_FORGET_INSTANCES_PG, {"age": at - forget_before})
        return
    conn.execute(_UPSERT_INSTANCE, {"id": instance_id, "at": at})
    conn.execute(_FORGET_INSTANCES, {"cutoff": forget_before})


def retire(conn: Connection, instance_id: str) -> None:
    """Forget this process on a clean shutdown."""
    conn.execute(text("DELETE FROM instances WHERE id = :id"), {"id": instance_id})
