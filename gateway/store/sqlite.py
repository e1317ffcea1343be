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
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from gateway.errors import GatewayError
from gateway.store.sql import driver_connection
from gateway.store.units import GROUPS, Many, answer, fail_waiting, select_one, unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a SQLite transaction waits for another process's write lock before the gateway answers
# 503: short enough that a locked database is reported within 2 seconds, far longer than any
# transaction of a gateway (a few milliseconds), so processes sharing a file never get there.
SQLITE_BUSY_TIMEOUT_MS = 1_500
# The WAL is checkpointed by a thread of its own after this many commits (see `_start_checkpoint`);
# the writer itself checkpoints only past the safety limit below, should that ever fall behind.
CHECKPOINT_EVERY_COMMITS = 200
WRITER_AUTOCHECKPOINT_PAGES = 10_000
CHECKPOINT_PAUSE_MAX_SECONDS = 0.05
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
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._commits = 0
        self._checkpointing = False
        # Writes held back while a checkpoint finishes (see `_start_checkpoint`).
        self._paused = False
        self._unpause_timer: asyncio.TimerHandle | None = None
        # The next batch goes to the thread: the first commit after the WAL restarts syncs it.
        self._next_in_thread = False
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
            self._outage = _is_outage(exc)
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
                if _is_outage(exc):
                    raise
                raw.execute("ROLLBACK")
                return [(False, _for_caller(exc))]
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
                results[index] = _in_savepoint(raw, fn, conn, *args)
                continue
            calls = [batch[member][1] for member in members]
            for member, result in zip(members, _together(raw, GROUPS[fn], conn, calls), strict=True):
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
        if self._paused:
            self._busy = False  # `_checkpoint_done` resumes
            return
        batch, self._pending = self._pending, []
        units = [(fn, args) for fn, args, _ in batch]
        futures = [future for _, _, future in batch]
        try:
            results = None
            if self._conn is not None and not self._next_in_thread:
                results = self._run_batch(units, wait=False)
            if results is None:
                self._next_in_thread = False
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
            if self._commits >= CHECKPOINT_EVERY_COMMITS and not self._checkpointing:
                self._start_checkpoint()
        self._resume()

    def _resume(self) -> None:
        """Start the next batch if work is waiting and writes are not held back."""
        if self._pending and not self._busy and not self._paused:
            self._busy = True
            asyncio.get_running_loop().call_soon(self._gather, 0, 0)

    def _start_checkpoint(self) -> None:
        """Copy the WAL into the database file in the checkpoint thread, in two passes.

        The first copies the bulk beside the writes. Writes appended meanwhile would keep the WAL
        from ever being copied whole, and SQLite starts the WAL afresh only once it is: so the
        second pass copies the rest with writes held back, which takes a moment (the loop serves
        everything else meanwhile), and the WAL stays a few megabytes long.
        """
        self._commits = 0
        self._checkpointing = True
        loop = asyncio.get_running_loop()
        bulk = loop.run_in_executor(self._checkpointer, self._checkpoint)
        bulk.add_done_callback(lambda _: self._finish_checkpoint())

    def _finish_checkpoint(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            rest = loop.run_in_executor(self._checkpointer, self._checkpoint)
        except RuntimeError:  # closing
            self._checkpointing = False
            return
        self._paused = True
        rest.add_done_callback(lambda _: self._checkpoint_done())
        # Writes wait for the second pass at most this long; if the disk is that slow, they go on
        # beside it (PASSIVE is safe beside writes) and the WAL restarts at a later checkpoint.
        self._unpause_timer = loop.call_later(CHECKPOINT_PAUSE_MAX_SECONDS, self._unpause)

    def _checkpoint_done(self) -> None:
        self._checkpointing = False
        self._next_in_thread = True
        self._unpause()

    def _unpause(self) -> None:
        if self._unpause_timer is not None:
            self._unpause_timer.cancel()
            self._unpause_timer = None
        if self._paused:
            self._paused = False
            self._resume()

    def _checkpoint(self) -> None:
        """In the checkpoint thread: copy the WAL into the database file, beside the writes.

        PASSIVE never waits for the writer, nor makes it wait; SQLite runs it without the GIL, so
        it costs the event loop nothing.
        """
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("checkpoint skipped: %s", exc)

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

    def _close_checkpointer(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    async def close(self) -> None:
        """Wait for queued work and a checkpoint under way, then close the connections and the threads."""
        while self._busy or self._pending or self._checkpointing:
            await asyncio.sleep(0.005)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        await loop.run_in_executor(self._reader, self._close_reader)
        await loop.run_in_executor(self._checkpointer, self._close_checkpointer)
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._engine is not None:
            self._engine.dispose()


def _outcome(task: asyncio.Future[list[tuple[bool, Any]] | None]) -> list[tuple[bool, Any]] | BaseException:
    """A batch's results, or what went wrong running it in the thread."""
    if task.cancelled():
        return RuntimeError("the batch was cancelled")
    return task.exception() or task.result() or RuntimeError("no result")


# SQLite's primary result codes that say the database cannot be used (locked, out of memory,
# read-only, I/O error, corrupt, full, cannot open, not a database); any other error of a unit
# (SQLITE_ERROR: a statement SQLite cannot run) is that unit's alone, unless it says the schema is
# missing (a database never migrated), which no unit can use either.
_OUTAGE_CODES = frozenset(
    getattr(sqlite3, name)
    for name in (
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_NOMEM",
        "SQLITE_READONLY",
        "SQLITE_IOERR",
        "SQLITE_CORRUPT",
        "SQLITE_FULL",
        "SQLITE_CANTOPEN",
        "SQLITE_PROTOCOL",
        "SQLITE_NOTADB",
    )
)

_NO_SCHEMA = ("no such table", "no such column")


def _is_outage(exc: BaseException) -> bool:
    """Locked past the busy timeout, unreadable, full: the database itself, not a faulty unit."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, OperationalError):
        exc = exc.orig if isinstance(exc.orig, BaseException) else exc
    if not isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code & 0xFF in _OUTAGE_CODES or str(exc).startswith(_NO_SCHEMA)


def _for_caller(exc: Exception) -> Exception:
    """A unit's error as its caller gets it. A refusal (a GatewayError, such as BudgetExceeded)
    loses its traceback, which says nothing a refusal needs: it held the store's frames, and through
    them the batch with this very error, in a reference cycle that kept each refused request (its
    body, up to the size limit) alive until a collection. A bug keeps its traceback, for the log."""
    return exc.with_traceback(None) if isinstance(exc, GatewayError) else exc


def _in_savepoint(raw: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """SQLite, inside a transaction: `fn(*args)`, rolled back alone if it raises; (ok, result or error)."""
    raw.execute("SAVEPOINT unit")
    try:
        result = fn(*args)
    except Exception as exc:
        if _is_outage(exc):
            raise
        raw.execute("ROLLBACK TO unit")
        raw.execute("RELEASE unit")
        return (False, _for_caller(exc))
    raw.execute("RELEASE unit")
    return (True, result)


def _together(
    raw: sqlite3.Connection,
    many: Many,
    conn: Connection,
    calls: list[tuple[Any, ...]],
) -> list[tuple[bool, Any]]:
    """SQLite: `many(conn, calls)` in a savepoint; if it raises (or answers for the wrong number of
    calls), each call alone, so one call's error (a bug) is that call's only."""
    ok, results = _in_savepoint(raw, _answered, many, conn, calls)
    if ok:
        return list(results)
    log.warning("grouped calls failed together (%s); running the %d calls one by one", results, len(calls))
    alone: list[tuple[bool, Any]] = []
    for args in calls:
        ok, result = _in_savepoint(raw, _answered, many, conn, [args])
        alone.append(result[0] if ok else (False, result))
    return alone


def _answered(
    many: Many,
    conn: Connection,
    calls: list[tuple[Any, ...]],
) -> list[tuple[bool, Any]]:
    """`many(conn, calls)`, which must answer each call once."""
    results = many(conn, calls)
    if len(results) != len(calls):
        raise AssertionError(f"{len(results)} results for {len(calls)} calls")
    return results
