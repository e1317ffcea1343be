"""How many chat requests one process takes at once, and the open files that many need.

Each request in flight holds two sockets: its client's and its upstream connection. Past
`GATEWAY_MAX_CONCURRENT_REQUESTS` a request is refused at once with 503 `overloaded` (a counter
compared, nothing awaited), so a burst is turned away cheaply instead of queueing for the
upstream pool or failing with EMFILE half-way through.
"""

from __future__ import annotations

import functools
import logging
import resource

from gateway.errors import Overloaded, UpstreamRateLimited

log = logging.getLogger(__name__)

FDS_PER_REQUEST = 2
# Files besides the requests' sockets: listening socket, database, logs, idle keep-alive
# connections between requests, the event loop's own.
HEADROOM_FDS = 256
RETRY_AFTER_SECONDS = 1
# Connections the kernel queues for accepting (capped by net.core.somaxconn): asyncio's 100 or
# aiohttp's 128 overflow when thousands of clients connect within a second, and each dropped SYN
# costs its client a second or more before it tries again.
LISTEN_BACKLOG = 4096


class Gate:
    """Counts chat requests in flight against the process's limit."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def full(self) -> bool:
        """Whether one more request would go over the limit."""
        return self.active >= self.limit

    def refusal(self) -> Overloaded:
        """The 503 for a request over the limit, with its Retry-After."""
        error = Overloaded(
            f"This gateway process is serving its limit of {self.limit} concurrent requests "
            f"(GATEWAY_MAX_CONCURRENT_REQUESTS); nothing was charged. Retry in {RETRY_AFTER_SECONDS} s."
        )
        error.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return error


@functools.cache
def fit_open_files(wanted: int) -> int:
    """The concurrency limit this process can keep open files for, raising its soft limit if need be.

    The soft RLIMIT_NOFILE is raised towards the hard one when `wanted` requests need more; if even
    the hard limit is too low, the limit returned is what fits, and one log line says so.
    """
    needed = wanted * FDS_PER_REQUEST + HEADROOM_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fitted = max(1, (soft - HEADROOM_FDS) // FDS_PER_REQUEST)
    log.warning(
        "GATEWAY_MAX_CONCURRENT_REQUESTS=%d needs about %d open files but this process may open %d "
        "(ulimit -n, hard limit %s): serving at most %d concurrent requests, refusing more with 503",
        wanted,
        needed,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        fitted,
    )
    return fitted


class UpstreamCaps:
    """The upstream account's caps in this process (GATEWAY_UPSTREAM_MAX_CONCURRENT, _RPM): requests
    forwarded at once, and a GCRA of requests a minute; past either, 429 at once, never a queue.

    Per process, not shared through the database: with N processes (workers or replicas) each gets
    its share, so set them N times lower than the account's own limits.
    """

    __slots__ = ("active", "max_concurrent", "on", "rpm", "_tat")

    def __init__(self, max_concurrent: int | None, rpm: int | None) -> None:
        self.on = max_concurrent is not None or rpm is not None
        self.max_concurrent = max_concurrent
        self.rpm = rpm
        self.active = 0
        self._tat = 0

    def enter(self, now_us: int) -> None:
        """Count a request about to be admitted and forwarded, or raise the 429 of the cap it is past."""
        if self.max_concurrent is not None and self.active >= self.max_concurrent:
            raise self._refusal(
                f"GATEWAY_UPSTREAM_MAX_CONCURRENT ({self.max_concurrent} requests at once)", 1
            )
        if self.rpm is not None:
            inc = 60_000_000 // self.rpm
            start = max(self._tat, now_us)
            if start + inc - now_us > 60_000_000:
                wait = -(-(start + inc - 60_000_000 - now_us) // 1_000_000)
                raise self._refusal(f"GATEWAY_UPSTREAM_RPM ({self.rpm} requests a minute)", max(wait, 1))
            self._tat = start + inc
        self.active += 1

    def leave(self) -> None:
        """A request counted by `enter` is done with upstream."""
        self.active -= 1

    @staticmethod
    def _refusal(what: str, wait: int) -> UpstreamRateLimited:
        error = UpstreamRateLimited(
            f"This gateway's cap for the upstream account is reached: {what}. Nothing was forwarded "
            f"or charged. Retry in {wait} s.",
            retry_after=wait,
        )
        error.headers = {"Retry-After": str(wait)}
        return error
