"""SQLite on the event loop with group commit; processes may share the file (WAL, BEGIN IMMEDIATE).

Units that arrive in the same turn of the loop (and the next few turns, while more keep arriving),
or while a batch runs, share one transaction: one `BEGIN IMMEDIATE`, a savepoint per unit so that
one failing rolls back alone, one `COMMIT`, then every caller is answered. The admissions of a
batch run as one unit, a few statements for all of them, and so do its settlements (see
`units.grouped`). Each request still gets its answer only after its own commit. A batch is a few
hundred microseconds of SQLite work (no fsync: WAL with `synchronous=NORMAL`, checkpoints in a
thread of their own), cheaper run in place than the two thread hops and GIL hand-offs a database
thread costs. Only when another process holds the write lock does a batch wait, for up to the busy
timeout, in a thread of its own, so the loop never blocks on a lock. Reads run on a second
connection in a thread of their own (`read`), so a long report never holds up admissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from gateway.store.checkpoint import Checkpointer
from gateway.store.savepoints import for_caller, in_savepoint, is_outage, many_in_savepoint
from gateway.store.sql import driver_connection
from gateway.store.units import GROUPS, answer, fail_waiting, select_one, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a SQLite transaction waits for another process's write lock before the gateway answers
# 503: short enough that a locked database is reported within 2 seconds, far longer than any
# transaction of a gateway (a few milliseconds), so processes sharing a file never get there.
SQLITE_BUSY_TIMEOUT_MS = 1_500
# The WAL is checkpointed by a thread of its own after this many commits (see `Checkpointer`);
# the writer itself checkpoints only past the safety limit below, should that ever fall behind.
CHECKPOINT_EVERY_COMMITS = 200
WRITER_AUTOCHECKPOINT_PAGES = 10_000
# Group commit: a batch waits for more units while they keep arriving, one turn of the event loop
# at a time, for at most this many turns, and takes at most about this many units.
GATHER_MAX_TURNS = 8
GATHER_MAX_UNITS = 256


class SqliteStore:
    """SQLite on the event loop with group commit; processes may share the file (WAL, BEGIN IMMEDIATE)."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        # Batches that must wait for another process's write lock wait here, not on the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite")
        # Holds writes back while a checkpoint finishes, and sends the batch after it to the thread.
        self._checkpoints = Checkpointer(path, self._resume)
        self._commits = 0
        # Reads (key lookups, reports, listings) run beside the writer, on their own connection:
        # WAL lets them see the last commit without waiting for, or holding up, the writes.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite-read")
        self._read_conn: Connection | None = None
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._busy = False
        # Set when the last batch found the database locked or broken.
        self._outage = False

    def _make_engine(self) -> Engine:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # AUTOCOMMIT: SQLAlchemy leaves transactions alone; the store says BEGIN IMMEDIATE,
        # SAVEPOINT and COMMIT itself on the driver's connection, the cheapest way there is.
        engine = create_engine(
            f"sqlite:///{self.path}",
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: commits survive a process crash; a power cut may lose the last
            # commits, but never half of one, so counters and ledger stay consistent.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine

    def _connection(self) -> Connection:
        if self._conn is None:
            if self._engine is None:
                self._engine = self._make_engine()
            self._conn = self._engine.connect()
            raw = driver_connection(self._conn)
            # On the loop a busy database is not waited for (see `_flush`); checkpoints are the
            # checkpoint thread's work.
            raw.execute("PRAGMA busy_timeout=0")
            raw.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except SQLAlchemyError:
                pass
            self._conn = None

    def _run_batch(
        self, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]], wait: bool
    ) -> list[tuple[bool, Any]] | None:
        """Run every unit in one transaction; (ok, result or error) each.

        A unit that raises is rolled back alone (its savepoint) and its caller gets the error; a
        database that cannot be used fails the whole batch with LedgerUnavailable. Without `wait`,
        returns None at once if another process holds the write lock.
        """
        self._outage = False
        raw: sqlite3.Connection | None = None
        try:
            conn = self._connection()
            raw = driver_connection(conn)
            if wait:
                raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            try:
                # Take the write lock up front: a deferred transaction that reads then writes fails
                # with "database is locked" under contention, whatever the busy timeout.
                raw.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # Any kind of busy (another writer, another process recovering the WAL).
                if not wait and exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
                    return None
                raise
            finally:
                if wait:
                    raw.execute("PRAGMA busy_timeout=0")
            return self._units(conn, raw, batch)
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            self._abandon(raw)
            # Locked (past the busy timeout), unreadable, full: the database, not a faulty unit.
            self._outage = is_outage(exc)
            error = unavailable(exc)
            return [(False, error)] * len(batch)
        except BaseException:
            # A bug in the store itself: nothing of the batch stays, nor its write lock (in the
            # thread, nobody else would roll it back).
            self._abandon(raw)
            raise

    def _abandon(self, raw: sqlite3.Connection | None) -> None:
        """Roll back whatever the writer has under way, and drop its connection."""
        if raw is not None:
            with contextlib.suppress(sqlite3.Error):
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
        self._drop_connection()

    @staticmethod
    def _units(
        conn: Connection, raw: sqlite3.Connection, batch: list[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[tuple[bool, Any]]:
        """Inside the batch's transaction: each unit, and COMMIT. A lone unit needs no savepoint.

        The calls of a grouped unit (see `grouped`) run together, as one call of its `many`, where
        the first of them comes: the batch is then as if they had come one after the other there.
        """
        if len(batch) == 1:
            fn, args = batch[0]
            try:
                result = fn(conn, *args)
            except Exception as exc:
                if is_outage(exc):
                    raise
                raw.execute("ROLLBACK")
                return [(False, for_caller(exc))]
            raw.execute("COMMIT")
            return [(True, result)]
        together: dict[Callable[..., Any], list[int]] = {}
        for index, (fn, _) in enumerate(batch):
            if fn in GROUPS:
                together.setdefault(fn, []).append(index)
        results: list[tuple[bool, Any] | None] = [None] * len(batch)
        for index, (fn, args) in enumerate(batch):
            if results[index] is not None:
                continue
            members = together.get(fn, [index])
            if len(members) == 1:
                results[index] = in_savepoint(raw, fn, conn, *args)
                continue
            calls = [batch[member][1] for member in members]
            for member, result in zip(members, many_in_savepoint(raw, GROUPS[fn], conn, calls), strict=True):
                results[member] = result
        done = [result for result in results if result is not None]
        if len(done) != len(batch):
            raise AssertionError(f"{len(done)} results for a batch of {len(batch)}")
        raw.execute("COMMIT")
        return done

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in a transaction, batched with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((fn, args, future))
        # Soon, not now: the units of every request that gets here in this turn of the loop (and in
        # the next ones, while more keep coming) then share the transaction.
        self._resume()
        # A caller cancelled meanwhile cancels only its wait: the unit runs and commits all the same.
        try:
            return await future
        finally:
            # A unit's error keeps this frame in its traceback: without the future, no reference
            # cycle keeps the request (its body, up to the size limit) alive until a collection.
            del future

    def _gather(self, seen: int, turns: int) -> None:
        """Run the batch now, or one turn of the loop later if units arrived during the last one.

        Under load, requests reach the store over several turns of the loop: waiting while they
        keep coming makes batches several times larger, and a commit's cost (writing each page it
        changed to the WAL) is shared by all of them. A lone unit runs one turn later (microseconds).
        """
        pending = len(self._pending)
        if seen < pending < GATHER_MAX_UNITS and turns < GATHER_MAX_TURNS:
            asyncio.get_running_loop().call_soon(self._gather, pending, turns + 1)
        else:
            self._flush()

    def _flush(self) -> None:
        """On the loop: run what is pending as one batch.

        In a thread instead, where it may have to wait: when another process holds the write
        lock, when the connection must be made again (after an outage), and for the first commit
        after a checkpoint (SQLite syncs the restarted WAL then).
        """
        if self._checkpoints.paused:
            self._busy = False  # the checkpointer resumes
            return
        batch, self._pending = self._pending, []
        units = [(fn, args) for fn, args, _ in batch]
        futures = [future for _, _, future in batch]
        try:
            results = None
            if self._conn is not None and not self._checkpoints.next_in_thread:
                results = self._run_batch(units, wait=False)
            if results is None:
                self._checkpoints.next_in_thread = False
                loop = asyncio.get_running_loop()
                done = loop.run_in_executor(self._executor, self._run_batch, units, True)
                done.add_done_callback(lambda t: self._finish_batch(futures, _outcome(t)))
                return
        except BaseException as exc:
            # Never leave the store busy for good: whatever went wrong, every caller hears of it,
            # and a transaction left open is rolled back with the connection.
            self._drop_connection()
            self._finish_batch(futures, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._finish_batch(futures, results)

    def _finish_batch(
        self, futures: list[asyncio.Future[Any]], results: list[tuple[bool, Any]] | BaseException
    ) -> None:
        self._busy = False
        if not isinstance(results, list):
            results = [(False, unavailable(results))] * len(futures)
        answer(futures, results)
        if self._outage and self._pending:
            # Work queued while that batch waited out the busy timeout would wait as long again:
            # fail it now, so that during an outage every caller hears within one busy timeout.
            waiting, self._pending = self._pending, []
            fail_waiting(future for _, _, future in waiting)
        if not self._outage:
            self._commits += 1
            if self._commits >= CHECKPOINT_EVERY_COMMITS and not self._checkpoints.running:
                self._commits = 0
                self._checkpoints.start()
        self._resume()

    def _resume(self) -> None:
        """Start the next batch if work is waiting and writes are not held back."""
        if self._pending and not self._busy and not self._checkpoints.paused:
            self._busy = True
            asyncio.get_running_loop().call_soon(self._gather, 0, 0)

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """In the reader thread: one deferred transaction, so the unit sees one snapshot."""
        try:
            if self._read_conn is None:
                if self._engine is None:
                    self._engine = self._make_engine()
                self._read_conn = self._engine.connect()
            raw = driver_connection(self._read_conn)
            raw.execute("BEGIN")
            try:
                return fn(self._read_conn, *args)
            finally:
                raw.execute("ROLLBACK")
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            if self._read_conn is not None:
                with contextlib.suppress(SQLAlchemyError):
                    self._read_conn.close()
                self._read_conn = None
            raise unavailable(exc) from None

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read-only `fn(conn, *args)` on the reader connection, beside the writes."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._read, fn, args)

    async def ping(self) -> None:
        """Raise LedgerUnavailable unless the database answers."""
        await self.run(select_one)

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._read_conn.close()
            self._read_conn = None

    async def close(self) -> None:
        """Wait for queued work and a checkpoint under way, then close the connections and the threads."""
        while self._busy or self._pending or self._checkpoints.running:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        await loop.run_in_executor(self._reader, self._close_reader)
        await self._checkpoints.close()
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        if self._engine is not None:
            self._engine.dispose()


def _outcome(task: asyncio.Future[list[tuple[bool, Any]] | None]) -> list[tuple[bool, Any]] | BaseException:
    """A batch's results, or what went wrong running it in the thread."""
    if task.cancelled():
        return RuntimeError("the batch was cancelled")
    return task.exception() or task.result() or RuntimeError("no result")
