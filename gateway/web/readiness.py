"""`/readyz`: ready while the ledger database accepts writes, not merely while it answers.

A database that answers reads can still refuse every write (disk full, read-only, locked by
another process past the busy timeout), and then every chat request fails with 503. Readiness is
the outcome of the most recent write: a chat request that was admitted (its hold written) counts
as one; when none succeeded within FRESH_SECONDS, or the last one failed, `/readyz` writes
itself: this process's heartbeat row. Probes that arrive together share one write.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.core import metering
from gateway.errors import LedgerUnavailable
from gateway.store import Store

# A write that succeeded this recently answers for the database without another.
FRESH_SECONDS = 1.0
# A probe write that takes longer than this counts as refused (a lock held elsewhere, a stall).
PROBE_TIMEOUT_SECONDS = 3.0


class Readiness:
    """The latest write outcome of this process, and the probe that refreshes it."""

    def __init__(self) -> None:
        self.ok_at = -FRESH_SECONDS
        self._probe: asyncio.Future[str | None] | None = None

    def wrote(self) -> None:
        """A write transaction committed."""
        self.ok_at = time.monotonic()

    def failed(self) -> None:
        """A write was refused by the database: the next `/readyz` finds out for itself."""
        self.ok_at = -FRESH_SECONDS

    async def check(self, store: Store, instance_id: str) -> str | None:
        """None when the database accepts writes; otherwise why not."""
        if time.monotonic() - self.ok_at < FRESH_SECONDS:
            return None
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._write(store, instance_id))
            self._probe.add_done_callback(self._probed)
        return await asyncio.shield(self._probe)

    def _probed(self, probe: asyncio.Future[str | None]) -> None:
        self._probe = None

    async def _write(self, store: Store, instance_id: str) -> str | None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                now = metering.now_us()
                await store.run(metering.heartbeat, instance_id, now, 0)
        except LedgerUnavailable as exc:
            self.failed()
            return exc.reason or exc.message
        except TimeoutError:
            self.failed()
            return f"a write did not complete within {PROBE_TIMEOUT_SECONDS:g} seconds"
        self.wrote()
        return None


def body(reason: str | None) -> tuple[dict[str, Any], int]:
    """The `/readyz` answer: its JSON and status."""
    if reason is None:
        return {"status": "ready"}, 200
    return {
        "status": "unavailable",
        "error": {
            "type": "ledger_unavailable",
            "message": f"The ledger database does not accept writes ({reason}); chat requests are refused "
            "until it does. Check the database (disk space, permissions, locks).",
            "reason": reason,
        },
    }, 503
