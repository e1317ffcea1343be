"""`/readyz`: ready while the ledger database accepts writes, not merely while it answers.

A database that answers reads can still refuse every write (disk full, read-only, locked by
another process past the busy timeout), and then every chat request fails with 503. So `/readyz`
writes: this process's heartbeat row, one small transaction (on SQLite it joins the group commit
of the requests in flight). Probes that arrive together share one write. Once the database takes
writes again, the next probe says so: readiness recovers by itself.

Not the outcome of recent requests' writes instead: those lag. A request admitted a moment before
the disk filled says nothing of the next one, and a readiness that trusted it would keep sending
traffic to a gateway that can only refuse it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.core import expiry, metering
from gateway.errors import LedgerUnavailable
from gateway.store import Store

log = logging.getLogger(__name__)

# A probe write that takes longer than this counts as refused (a lock held elsewhere, a stall).
PROBE_TIMEOUT_SECONDS = 2.0


class Readiness:
    """The write probe of `/readyz`, shared by the probes that arrive while it runs."""

    def __init__(self) -> None:
        self._probe: asyncio.Future[str | None] | None = None

    async def check(self, store: Store, instance_id: str) -> str | None:
        """None when the database accepts writes; otherwise why not."""
        if self._probe is None:
            self._probe = asyncio.ensure_future(_write(store, instance_id))
            self._probe.add_done_callback(self._probed)
        return await asyncio.shield(self._probe)

    def _probed(self, probe: asyncio.Future[str | None]) -> None:
        self._probe = None


async def _write(store: Store, instance_id: str) -> str | None:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            now = metering.now_us()
            await store.run(expiry.heartbeat, instance_id, now, 0)
    except LedgerUnavailable as exc:
        return why(exc.reason)
    except TimeoutError:
        return f"a write did not complete within {PROBE_TIMEOUT_SECONDS:g} seconds"
    except Exception as exc:
        # Whatever else refused the write, the gateway cannot charge: not ready either.
        log.warning("readiness write failed: %r", exc)
        return why(str(getattr(exc, "orig", None) or exc))
    return None


# What a driver's message says, in words for the `/readyz` body: the message itself may name hosts
# and files, and is logged instead (`store.units.unavailable`).
_REASONS = (
    (("locked", "busy"), "the database is locked by another connection"),
    (("read-only", "readonly"), "the database is read-only"),
    (("disk", "full", "space"), "the database's disk is full"),
)


def why(driver_message: str) -> str:
    """A short, safe reason for a refused write."""
    text = driver_message.lower()
    for words, reason in _REASONS:
        if any(word in text for word in words):
            return reason
    return "the database cannot be reached or refused the write"


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
