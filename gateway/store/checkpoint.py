"""SQLite WAL checkpoints in a thread of their own, beside the writes of `SqliteStore`."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

CHECKPOINT_PAUSE_MAX_SECONDS = 0.05


class Checkpointer:
    """Copies the WAL into the database file in the checkpoint thread, in two passes.

    The first copies the bulk beside the writes. Writes appended meanwhile would keep the WAL
    from ever being copied whole, and SQLite starts the WAL afresh only once it is: so the
    second pass copies the rest with writes held back (`paused`), which takes a moment (the loop
    serves everything else meanwhile), and the WAL stays a few megabytes long. `resume` is called
    when writes may go on again.
    """

    def __init__(self, path: str, resume: Callable[[], None]) -> None:
        self.path = path
        self._resume = resume
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-sqlite-checkpoint")
        self._conn: sqlite3.Connection | None = None
        # A checkpoint is under way (either pass).
        self.running = False
        # Writes held back while a checkpoint finishes.
        self.paused = False
        self._unpause_timer: asyncio.TimerHandle | None = None
        # The next batch goes to the thread: the first commit after the WAL restarts syncs it.
        self.next_in_thread = False

    def start(self) -> None:
        """Start a checkpoint: the first pass, beside the writes."""
        self.running = True
        loop = asyncio.get_running_loop()
        bulk = loop.run_in_executor(self._executor, self._checkpoint)
        bulk.add_done_callback(lambda _: self._finish())

    def _finish(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            rest = loop.run_in_executor(self._executor, self._checkpoint)
        except RuntimeError:  # closing
            self.running = False
            return
        self.paused = True
        rest.add_done_callback(lambda _: self._done())
        # Writes wait for the second pass at most this long; if the disk is that slow, they go on
        # beside it (PASSIVE is safe beside writes) and the WAL restarts at a later checkpoint.
        self._unpause_timer = loop.call_later(CHECKPOINT_PAUSE_MAX_SECONDS, self._unpause)

    def _done(self) -> None:
        self.running = False
        self.next_in_thread = True
        self._unpause()

    def _unpause(self) -> None:
        if self._unpause_timer is not None:
            self._unpause_timer.cancel()
            self._unpause_timer = None
        if self.paused:
            self.paused = False
            self._resume()

    def _checkpoint(self) -> None:
        """In the checkpoint thread: copy the WAL into the database file, beside the writes.

        PASSIVE never waits for the writer, nor makes it wait; SQLite runs it without the GIL, so
        it costs the event loop nothing.
        """
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("checkpoint skipped: %s", exc)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection and the thread (once no checkpoint is under way)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=True)
