"""The SQLite store's own machinery: batches on the loop, a lock waited for in a thread, checkpoints.

The metering tests exercise the store through the gateway; these pin down what they cannot see:
that a write lock held by another process never blocks the event loop, that units arriving
together share one transaction, and that the WAL stays short under sustained writes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, text

from gateway.errors import LedgerUnavailable
from gateway.store import SqliteStore, grouped, sql_of
from gateway.store import sqlite as store_module
from gateway.store.sql import _parameters


def _create(conn: Connection) -> None:
    conn.execute(text("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, b BLOB)"))


def _insert(conn: Connection, i: int, size: int = 16) -> int:
    conn.execute(text("INSERT INTO t (i, b) VALUES (:i, randomblob(:size))"), {"i": i, "size": size})
    return i


def _fail(conn: Connection, i: int) -> None:
    _insert(conn, i)
    raise ValueError("refused")


def _count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT COUNT(*) FROM t")).scalar_one())


async def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "store.db"))
    await store.run(_create)
    return store


def _batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of units of every batch (transaction) the store runs from now on."""
    sizes: list[int] = []
    run_batch = SqliteStore._run_batch

    def recorded(self: SqliteStore, batch: list[Any], wait: bool) -> Any:
        sizes.append(len(batch))
        return run_batch(self, batch, wait)

    monkeypatch.setattr(SqliteStore, "_run_batch", recorded)
    return sizes


async def test_units_of_one_turn_share_a_transaction_and_fail_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _store(tmp_path)
    try:
        sizes = _batch_sizes(monkeypatch)
        results = await asyncio.gather(
            *(store.run(_fail if i == 3 else _insert, i) for i in range(10)), return_exceptions=True
        )
        assert [r for r in results if not isinstance(r, Exception)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert isinstance(results[3], ValueError)
        # One transaction for the ten units, and the failing unit's insert was rolled back alone.
        assert sizes == [10]
        assert await store.read(_count) == 9
    finally:
        await store.close()


def _bad_sql(conn: Connection, i: int) -> None:
    _insert(conn, i)
    conn.execute(text("SELECT * FROM t WHERE i ="))  # sqlite3.OperationalError, SQLITE_ERROR


async def test_a_units_own_operational_error_fails_that_unit_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OperationalError that is the unit's (a statement SQLite cannot run) is no outage: the
    other units of its batch commit, and it is not answered 503 (issue 15, suspected defect 6)."""
    store = await _store(tmp_path)
    try:
        sizes = _batch_sizes(monkeypatch)
        results = await asyncio.gather(
            *(store.run(_bad_sql if i == 3 else _insert, i) for i in range(10)), return_exceptions=True
        )
        assert [r for r in results if not isinstance(r, Exception)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert not isinstance(results[3], LedgerUnavailable)
        assert "SELECT * FROM t WHERE i =" in str(results[3])
        assert sizes == [10]
        assert await store.read(_count) == 9
        assert await store.run(_insert, 10) == 10  # and the store goes on
    finally:
        await store.close()


async def test_units_arriving_over_several_turns_share_a_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _store(tmp_path)
    try:
        sizes = _batch_sizes(monkeypatch)

        async def arriving(i: int) -> int:
            for _ in range(i):  # unit i reaches the store i turns of the loop after the first
                await asyncio.sleep(0)
            return await store.run(_insert, i)

        assert await asyncio.gather(*(arriving(i) for i in range(5))) == [0, 1, 2, 3, 4]
        assert sizes == [5]
        # Nothing else coming: a lone unit runs at once, in a transaction of its own.
        assert await store.run(_insert, 5) == 5
        assert sizes == [5, 1]
    finally:
        await store.close()


# A grouped unit (see `store.grouped`): `_put(conn, i)` alone, `_put_many(conn, calls)` together.
_GROUP_CALLS: list[list[int]] = []


def _put_many(conn: Connection, calls: list[tuple[int]]) -> list[tuple[bool, Any]]:
    _GROUP_CALLS.append([i for (i,) in calls])
    results: list[tuple[bool, Any]] = []
    for (i,) in calls:
        _insert(conn, i)
        if i == 13:
            raise ValueError("13 is refused, and fails the statement it is in")
        results.append((True, i))
    return results


@grouped(_put_many)
def _put(conn: Connection, i: int) -> int:
    ((_, result),) = _put_many(conn, [(i,)])
    return int(result)


async def test_a_grouped_units_calls_in_a_batch_go_together_whatever_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _store(tmp_path)
    try:
        sizes = _batch_sizes(monkeypatch)
        _GROUP_CALLS.clear()
        units = [store.run(_put, i) for i in range(6)] + [store.run(_insert, 100)]
        assert await asyncio.gather(*units) == [0, 1, 2, 3, 4, 5, 100]
        # One transaction, and one call of `_put_many` for the six (of both keys): the key only
        # matters on PostgreSQL, where it keeps groups from deadlocking.
        assert sizes == [7]
        assert _GROUP_CALLS == [[0, 1, 2, 3, 4, 5]]
        assert await store.read(_count) == 7
    finally:
        await store.close()


async def test_grouped_calls_that_fail_together_run_one_by_one(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        _GROUP_CALLS.clear()
        results = await asyncio.gather(
            *(store.run(_put, i) for i in (11, 12, 13, 14)), return_exceptions=True
        )
        assert results[:2] == [11, 12] and results[3] == 14
        assert isinstance(results[2], ValueError)
        # Together first (rolled back whole: nothing of it stays), then each alone.
        assert _GROUP_CALLS == [[11, 12, 13, 14], [11], [12], [13], [14]]
        assert await store.read(_count) == 3
    finally:
        await store.close()


def _short_many(conn: Connection, calls: list[tuple[int]]) -> list[tuple[bool, Any]]:
    """A buggy `many`: together, it writes every call's row but answers one call short."""
    results: list[tuple[bool, Any]] = [(True, _insert(conn, i)) for (i,) in calls]
    return results[:-1] if len(results) > 1 else results


@grouped(_short_many)
def _short(conn: Connection, i: int) -> int:
    return int(_short_many(conn, [(i,)])[0][1])


async def test_grouped_calls_answered_for_the_wrong_number_run_one_by_one(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        assert await asyncio.gather(*(store.run(_short, i) for i in (21, 22, 23))) == [21, 22, 23]
        # The group's writes were rolled back with it: each row once, from the calls alone.
        assert await store.read(_count) == 3
    finally:
        await store.close()


async def test_a_lock_held_elsewhere_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            for _ in range(40):
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.ensure_future(ticker())
        write = asyncio.ensure_future(store.run(_insert, 1))
        await asyncio.sleep(0.3)
        assert not write.done(), "the write went through while another connection held the lock"
        other.execute("COMMIT")
        assert await asyncio.wait_for(write, 2) == 1
        await ticking
        # The loop kept turning while the write waited for the lock in the store's thread.
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.3f} s"
        # Back on the loop afterwards: the next unit needs no thread.
        assert await store.run(_insert, 2) == 2
    finally:
        other.close()
        await store.close()


async def test_the_wal_stays_short_under_sustained_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY_COMMITS", 50)
    store = await _store(tmp_path)
    wal = tmp_path / "store.db-wal"
    largest = 0
    try:
        for i in range(1_500):
            await store.run(_insert, i, 8_000)  # one commit each, three pages or so
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # let the checkpoint thread's callbacks in
                largest = max(largest, os.path.getsize(wal))
    finally:
        await store.close()
    written = 1_500 * 8_000
    # Without checkpoints that complete, the WAL would hold all ~12 MB (the writer's own safety
    # checkpoint waits for 10,000 pages); with them it is started afresh every 50 commits or so.
    assert largest < written / 4, f"the WAL grew to {largest:,} bytes for {written:,} written"


async def test_close_during_a_checkpoint_and_work_after_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY_COMMITS", 5)
    store = await _store(tmp_path)
    for i in range(5):
        await store.run(_insert, i, 8_000)
    # The fifth commit started a checkpoint; closing waits for it instead of hanging or leaking.
    await asyncio.wait_for(store.close(), 5)
    # A late unit (a settlement retried after shutdown, say) is refused, not left waiting forever.
    with pytest.raises(LedgerUnavailable):
        await asyncio.wait_for(store.run(_insert, 99), 5)


def _put_rows(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> list[Any]:
    conn.execute(text("CREATE TABLE u (a INTEGER, b TEXT, c INTEGER)"))
    sql_of(conn).many(sql, rows)
    return list(conn.execute(text("SELECT a, b, c FROM u ORDER BY a")).all())


async def test_many_takes_each_rows_values_in_the_order_the_statement_first_names_them(
    tmp_path: Path,
) -> None:
    """`Sql.many` binds tuples (sqlite3 binds them faster than mappings): the `:name`s become
    numbered parameters, a name used twice takes one value, and a PostgreSQL `::cast` is no name."""
    store = await _store(tmp_path)
    try:
        sql = "INSERT INTO u (c, b, a) VALUES (:count, :label, :count + :base)"
        rows = await store.run(_put_rows, sql, [(1, "x", 10), (2, "y", 20)])
        assert rows == [(11, "x", 1), (22, "y", 2)]
    finally:
        await store.close()
    assert _parameters("SELECT CAST(:a AS int)::text, :b, :a") == ("a", "b")
