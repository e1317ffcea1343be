"""Graceful shutdown: let requests in flight finish within the grace, cut the rest, settle everything.

On SIGTERM or SIGINT, aiohttp stops accepting connections and closes idle ones, then runs the
app's `on_shutdown` hooks before it touches the requests under way: `drain` is that hook.

1. Requests in flight go on until they end or `GATEWAY_SHUTDOWN_GRACE_SECONDS` have passed.
2. Those still running are cut (cancelled), except while they write their settlement; each
   settles in its `finally` like any other request (a stream whose 2xx headers went out is
   charged, anything else released). A request waiting for its admission is cut once it has its
   answer, and releases its own hold (`admitting`).
3. Settlements that found the database down keep being retried until the grace is over (and at
   least SETTLE_AFTER_CUT_SECONDS after the cut).

Only then does the process retire its heartbeat row (`app._expiry_ctx`), and only if nothing is
left unsettled: the holds of a retired process may be released by any sweep at once, so a
request answered 2xx and not yet written would be recorded `expired`. If the database is still
down at the end, the row and the holds stay, the TTL rules apply, and one line says how many.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy import Connection, text

from gateway.core import metering, settlement
from gateway.core.metering import Admission, Settlement
from gateway.errors import LedgerUnavailable
from gateway.web.state import BACKGROUND, METRICS, REQUESTS, SETTINGS, SETTLING, STORE

log = logging.getLogger(__name__)

T = TypeVar("T")

# Settlements still being retried get at least this long after the last request was cut.
SETTLE_AFTER_CUT_SECONDS = 5.0
RETRY_MAX_SECONDS = 5.0
# How often the cut looks again for requests that have finished writing their settlement.
CUT_POLL_SECONDS = 0.05

_FREE_IDEMPOTENCY_KEY = text(
    "DELETE FROM idempotency_keys WHERE request_id = :request_id AND state = 'in_flight'"
)


# What a shutdown may do to a request now (the values of `app[REQUESTS]`).
RUNNING = 0  # cut it (cancel it)
BUSY = 1  # not now: it is waiting for its admission or writing its settlement
CUT = 2  # it was busy when the grace ended: it is cut as soon as it is not


def setup(app: web.Application) -> None:
    """Track the chat requests of `app` and drain them when the server shuts down."""
    app[REQUESTS] = {}
    app.on_shutdown.append(drain)


def busy(app: web.Application, task: asyncio.Task[Any] | None) -> None:
    """The request in `task` starts writing its settlement: a shutdown must not cut it meanwhile.

    A settlement cancelled half-way would still be written (the store runs a unit to its end), but
    its caller would not hear of a failure, and so would not retry it.
    """
    requests = app[REQUESTS]
    if task in requests:
        requests[task] = BUSY


def idle(app: web.Application, task: asyncio.Task[Any] | None) -> None:
    """The request in `task` may be cut again."""
    requests = app[REQUESTS]
    if task in requests:
        requests[task] = RUNNING


async def admitting(app: web.Application, task: asyncio.Task[Any], admission: Awaitable[T]) -> T:
    """Await an admission, which a shutdown does not cut; if it asked to meanwhile, release the hold.

    A request cancelled while its admission waits in the store would not hear the answer, yet the
    store runs the unit to its end: the hold would be committed after its caller was gone and
    linger until a sweep. So the cut waits for the answer, and the request releases its own hold.
    """
    requests = app[REQUESTS]
    requests[task] = BUSY
    try:
        result = await admission
        if requests[task] == CUT and isinstance(result, Admission):
            # Still not RUNNING: a drain must not cut the release half-way, which would leave the
            # request counted as unsettled and keep the process from retiring its heartbeat row.
            await release(app, result)
            raise asyncio.CancelledError
    finally:
        requests[task] = RUNNING
        # A refusal's traceback holds this frame: no reference cycle through the task.
        del task
    return result


async def drain(app: web.Application) -> None:
    """Wait for the chat requests in flight for up to the grace, cut the rest, settle everything."""
    loop = asyncio.get_running_loop()
    grace = app[SETTINGS].shutdown_grace_seconds
    deadline = loop.time() + grace
    requests = app[REQUESTS]
    if requests:
        log.info("shutting down: waiting up to %gs for %d request(s) in flight", grace, len(requests))
        await asyncio.wait(set(requests), timeout=grace)
    if requests:
        log.warning("shutdown grace of %gs is over: cutting %d request(s) in flight", grace, len(requests))
    cut: set[asyncio.Task[Any]] = set()
    while requests:
        for task, state in list(requests.items()):
            if task in cut:
                continue
            if state == RUNNING:
                cut.add(task)
                task.cancel()
            else:
                requests[task] = CUT
        await asyncio.wait(set(requests), timeout=CUT_POLL_SECONDS)
    retrying = {task for task in app[BACKGROUND] if not task.done()}
    if retrying:
        until = max(deadline, loop.time() + SETTLE_AFTER_CUT_SECONDS) if cut else deadline
        await asyncio.wait(retrying, timeout=max(until - loop.time(), 0))
    left = unsettled(app)
    if left:
        log.error(
            "shutting down with %d request(s) unsettled: the database could not be reached within the "
            "shutdown grace; their holds stay and are released (outcome expired, not charged) by another "
            "gateway process once older than GATEWAY_HOLD_TTL_SECONDS",
            left,
        )


def unsettled(app: web.Application) -> int:
    """How many requests this process admitted and has not written the settlement of."""
    return len(app[SETTLING])


async def release(app: web.Application, admission: Admission) -> None:
    """Release the hold of an admitted request that was never forwarded (outcome upstream_unavailable).

    If the database is down, the release is retried in the background like a settlement.
    """
    request_id = admission.charge.request_id
    app[SETTLING].add(request_id)
    try:
        await app[STORE].run(_release_unit, admission, metering.now_us())
    except LedgerUnavailable:
        task = asyncio.get_running_loop().create_task(_release_later(app, admission))
        app[BACKGROUND].add(task)
        task.add_done_callback(app[BACKGROUND].discard)
        return
    app[SETTLING].discard(request_id)
    _count_release(app, admission)


async def _release_later(app: web.Application, admission: Admission) -> None:
    delay = 0.1
    try:
        while True:
            await asyncio.sleep(delay)
            try:
                await app[STORE].run(_release_unit, admission, metering.now_us())
            except LedgerUnavailable:
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            _count_release(app, admission)
            return
    finally:
        app[SETTLING].discard(admission.charge.request_id)


def _release_unit(conn: Connection, admission: Admission, at: int) -> bool:
    """Settle as not forwarded and free an Idempotency-Key the request reserved."""
    if not settlement.settle(conn, admission, Settlement("upstream_unavailable"), at):
        return False
    conn.execute(_FREE_IDEMPOTENCY_KEY, {"request_id": admission.charge.request_id})
    return True


def _count_release(app: web.Application, admission: Admission) -> None:
    log.warning("request %s was cut at shutdown after its admission; released", admission.charge.request_id)
    app[METRICS].requests.labels(admission.charge.model, "upstream_unavailable").inc()
