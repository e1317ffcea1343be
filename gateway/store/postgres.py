"""PostgreSQL on an asyncpg pool: a READ COMMITTED transaction per unit, or one statement per group.

Admission and settlement are single statements (functions taking arrays, migration 0006), marked
`grouped`: run without BEGIN and COMMIT, one round trip each. While one admission statement is
under way, the admissions of every caller that arrive meanwhile wait, then go together as the next
statement, and the same for settlements: under load a statement (and its one commit, the WAL flush
every request of a team used to queue for on the team's counter row) serves as many requests as
arrived during the last one, so commits per request fall as load grows. The functions lock every
counter they change in one fixed order, so statements of any number of processes cannot deadlock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.errors import LedgerUnavailable
from gateway.store.units import GROUPS, ONE_STATEMENT, Many, answer, fail_waiting, select_one, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs worth retrying on PostgreSQL: serialization failure, deadlock detected.
PG_RETRY_SQLSTATES = {"40001", "40P01"}
# SQLSTATEs of a database that cannot be used, not of a faulty unit: connection exceptions (08),
# insufficient resources (53: disk full, out of memory), operator intervention (57), and a
# read-only transaction (25006: a read-only database or standby).
PG_OUTAGE_SQLSTATES = ("08", "53", "57", "25006")
PG_MAX_ATTEMPTS = 5
# How long a unit waits for a free PostgreSQL connection. Waiting for the pool means the database
# answers but every connection is busy (a burst): the unit queues rather than being told 503. A
# database that cannot be reached fails its connections at once (or after the 2 s connect timeout),
# which empties the queue with 503s well before this.
PG_POOL_WAIT_SECONDS = 10
# Calls per grouped statement, at most: the rest wait for the next.
GROUP_MAX = 500
# How long closing the store waits for grouped calls under way or queued.
CLOSE_WAIT_SECONDS = 10.0

_Call = tuple[tuple[Any, ...], asyncio.Future[Any]]


def _in_transaction(conn: Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with conn.begin():
        return fn(conn, *args)


class PostgresStore:
    """PostgreSQL on an asyncpg pool; each unit is one READ COMMITTED transaction, or one statement."""

    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        # Grouped calls waiting for the statement under way of their kind (see `units.grouped`).
        self._waiting: dict[Many, list[_Call]] = {}
        self._groups: set[asyncio.Task[None]] = set()
        self._closing = False
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=PG_POOL_WAIT_SECONDS,
            pool_pre_ping=False,
            connect_args={"timeout": 2, "command_timeout": 10},
        )

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in its own transaction, retrying serialization failures."""
        many = GROUPS.get(fn)
        if many is not None:
            return await self._grouped(many, args)
        # shield: a caller cancelled meanwhile must not roll back a unit (a settlement) half-way.
        return await asyncio.shield(self._run(fn, *args))

    async def _grouped(self, many: Many, args: tuple[Any, ...]) -> T:
        """Queue the call behind the statement of its kind under way, or start one."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(many)
        if waiting is not None:
            waiting.append((args, future))
        else:
            self._waiting[many] = []
            self._start_group(many, [(args, future)])
        # A caller cancelled meanwhile cancels only its wait: the call runs all the same.
        try:
            return await future
        finally:
            # No reference cycle through an error (see `SqliteStore.run`): neither the future nor
            # the list it was queued in.
            del future, waiting

    def _start_group(self, many: Many, calls: list[_Call]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_group(many, calls))
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    async def _run_group(self, many: Many, calls: list[_Call]) -> None:
        """One statement for `calls`, then the next group of its kind, whatever happens."""
        cancelled = False
        try:
            results = await self._results(many, [args for args, _ in calls])
            answer([future for _, future in calls], results)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            fail_waiting(future for _, future in calls)
            waiting = self._waiting.get(many, [])
            if waiting and not cancelled and not self._closing:
                self._waiting[many] = waiting[GROUP_MAX:]
                self._start_group(many, waiting[:GROUP_MAX])
            else:
                self._waiting.pop(many, None)
                fail_waiting(future for _, future in waiting)
        if cancelled:
            raise asyncio.CancelledError

    async def _results(self, many: Many, calls: list[tuple[Any, ...]]) -> list[tuple[bool, Any]]:
        """(ok, result or error) for each call: together, or alone if together fails.

        A database that cannot be reached fails them all. Any other error (a value the database
        refuses, a bug) is one call's: each is then run alone, so the others are not lost with it.
        """
        try:
            results = await self._run(many, calls)
        except LedgerUnavailable as exc:
            return [(False, exc)] * len(calls)
        except Exception as exc:
            if len(calls) == 1:
                return [(False, exc)]
            log.warning("a grouped statement failed (%s); running its %d calls one by one", exc, len(calls))
            alone: list[tuple[bool, Any]] = []
            for args in calls:
                alone += await self._results(many, [args])
            return alone
        if len(results) != len(calls):
            raise AssertionError(f"{len(results)} results for {len(calls)} calls")
        return results

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        for attempt in range(1, PG_MAX_ATTEMPTS + 1):
            try:
                async with self.engine.connect() as conn:
                    if fn in ONE_STATEMENT:
                        alone = await conn.execution_options(isolation_level="AUTOCOMMIT")
                        return await alone.run_sync(fn, *args)
                    return await conn.run_sync(_in_transaction, fn, args)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
                    getattr(exc.orig, "__cause__", None), "sqlstate", None
                )
                if sqlstate in PG_RETRY_SQLSTATES and attempt < PG_MAX_ATTEMPTS:
                    # Retried unseen by the caller, but said: the lock order should make these
                    # never happen, so one is a bug worth seeing (tests look for this line).
                    log.warning(
                        "PostgreSQL %s in %s; retrying (attempt %d of %d)",
                        "deadlock detected" if sqlstate == "40P01" else "serialization failure",
                        getattr(fn, "__name__", fn),
                        attempt + 1,
                        PG_MAX_ATTEMPTS,
                    )
                    await asyncio.sleep(0.005 * attempt)
                    continue
                if exc.connection_invalidated or sqlstate is None or sqlstate.startswith(PG_OUTAGE_SQLSTATES):
                    raise unavailable(exc) from None
                raise
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                raise unavailable(exc) from None
        raise AssertionError("unreachable")

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Read-only work: a transaction like any other on PostgreSQL."""
        return await self.run(fn, *args)

    async def ping(self) -> None:
        """Raise LedgerUnavailable unless the database answers."""
        await self.run(select_one)

    async def close(self) -> None:
        """Close the pool, once the grouped calls under way or queued are done (10 s at most)."""
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_SECONDS
        while self._groups:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(set(self._groups), timeout=left)
        # Past the deadline: no new group starts, and whatever still waits hears 503.
        self._closing = True
        for waiting in self._waiting.values():
            fail_waiting(future for _, future in waiting)
        await self.engine.dispose()
