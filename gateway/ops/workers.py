"""`gateway serve --workers N`: N processes serving one port, one parent keeping them running.

The parent migrates once, then starts each worker as `python -m gateway serve` with hidden options
(its index, the server's metrics directory, a pipe whose end of file tells it the parent is gone).
Each worker binds the port with SO_REUSEPORT, so the kernel spreads connections across them, and
runs on uvloop as a single `serve` does. A worker that dies is started again, after a delay that
doubles while it keeps dying young. SIGTERM or SIGINT to the parent is passed on to every worker;
the parent waits for them all and exits.

Every worker beats for its own instance id; only worker 0 releases the holds of dead processes
and reads the budget gauges from the database. A worker writes its metrics to its own file in the
server's directory every second, when scraped, and when it stops; a scrape adds every worker's
file up (`metrics.merge`). A worker started in a dead one's place goes on from its file's counters,
so no counter of the server ever goes down. A worker killed outright loses at most its last
second of counts; what a scrape showed was written first, so it is never taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.ops import metrics as m
from gateway.ops.settings import Settings

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_SECONDS = 1.0
# Restart delays: the first, its doubling while a worker keeps dying young, and the longest.
RESTART_DELAY_SECONDS = 0.5
RESTART_DELAY_MAX_SECONDS = 30.0
# A worker that ran this long before dying was not crash-looping: its next delay starts over.
STEADY_AFTER_SECONDS = 10.0
WORKER_HEADER = "X-Gateway-Worker"
# How a worker stopped on request ends: 0, or killed by the signal passed on while it was still
# starting (its handlers not yet installed: it had served nothing).
_STOPPED = (0, -signal.SIGTERM, -signal.SIGINT)


@dataclass(frozen=True)
class Worker:
    """What a worker process knows of its place in the server."""

    index: int  # 0 .. count - 1; worker 0 also sweeps holds and refreshes the budget gauges
    count: int
    directory: Path  # the server's metrics files, one a worker
    parent_fd: int | None = None  # read end of a pipe the parent holds open

    @property
    def sweeper(self) -> bool:
        """Whether this worker does the server-wide work: hold expiry and budget gauges."""
        return self.index == 0


# ------------------------------------------------------------------ inside a worker


class MetricsFiles:
    """A worker's metrics file, the counters it took over from its predecessor, everyone's for a scrape."""

    def __init__(self, worker: Worker, metrics: m.Metrics) -> None:
        self.worker = worker
        self.metrics = metrics
        self.path = self.file(worker.index)
        # What the worker that had this index before counted, if one did.
        self.inherited = m.totals(self._read(worker.index))

    def file(self, index: int) -> Path:
        """The metrics file of worker `index`."""
        return self.worker.directory / f"worker-{index}.json"

    def write(self) -> m.Snapshot:
        """Write this worker's metrics (its predecessor's counts included); returns them."""
        own = m.snapshot(self.metrics.registry)
        if self.inherited:
            own = m.merge([own, self.inherited])
        scratch = self.path.with_suffix(".tmp")
        # Written even when unchanged: a cleaner of old files in /tmp must not take an idle one.
        scratch.write_text(json.dumps(own, separators=(",", ":")), encoding="utf-8")
        # Atomic: another worker reads the old file or the new one, never half of one.
        os.replace(scratch, self.path)
        return own

    def server(self) -> bytes:
        """The whole server's metrics: this worker's as of now, the others' as last written."""
        own = self.write()
        snaps = [own if i == self.worker.index else self._read(i) for i in range(self.worker.count)]
        return m.exposition(m.merge(snaps))

    def _read(self, index: int) -> m.Snapshot:
        try:
            snap: m.Snapshot = json.loads(self.file(index).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("metrics of worker %d unreadable: %s", index, exc)
            return []
        return snap

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: write now, every SNAPSHOT_INTERVAL_SECONDS, and once more at the end."""
        self.write()
        task = asyncio.get_running_loop().create_task(self._every_interval())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.write()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_SECONDS)
            try:
                self.write()
            except OSError:
                log.exception("metrics not written")

    async def view(self, request: web.Request) -> web.Response:
        """GET /metrics: Prometheus exposition of the whole server's metrics."""
        return web.Response(body=self.server(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def tag_responses(app: web.Application) -> None:
    """Name the worker process that answers, in a header of every response."""
    pid = str(os.getpid())

    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = pid

    app.on_response_prepare.append(tag)


def watch_parent(worker: Worker, stop: Callable[[], None]) -> None:
    """Call `stop` when the parent is gone (its end of the pipe closes), so no worker outlives it."""
    fd = worker.parent_fd
    if fd is None:
        return
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(fd, 1):
            loop.remove_reader(fd)
            log.warning("worker %d: the parent process is gone; stopping", worker.index)
            stop()

    loop.add_reader(fd, readable)


# ------------------------------------------------------------------ the parent


def serve(settings: Settings, config: str | None) -> int:
    """Run `settings.workers` workers on one port until SIGINT or SIGTERM; 0 if all stopped cleanly."""
    asyncio.run(_port_is_free(settings.host, settings.port))
    directory = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    try:
        return asyncio.run(Supervisor(settings, config, directory).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _port_is_free(host: str, port: int) -> None:
    """Raise OSError if anything listens on the port already.

    The workers' SO_REUSEPORT would otherwise share it, silently, with another server of the
    same user; a socket without SO_REUSEPORT cannot bind where anything listens.
    """
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port, reuse_address=True)
    server.close()
    await server.wait_closed()


class Supervisor:
    """Starts the workers, starts again any that dies, and stops them all on a signal."""

    def __init__(self, settings: Settings, config: str | None, directory: Path) -> None:
        self.settings = settings
        self.config = config
        self.directory = directory
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        """Supervise until a signal has stopped every worker."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, sig)
        # The parent never writes to it: when it exits, for whatever reason, the workers read EOF.
        read_end, write_end = os.pipe()
        try:
            s = self.settings
            log.info(
                "gateway serving on http://%s:%d with %d workers, forwarding to %s",
                s.host,
                s.port,
                s.workers,
                s.upstream_url,
            )
            codes = await asyncio.gather(*(self._keep(i, read_end) for i in range(s.workers)))
        finally:
            os.close(read_end)
            os.close(write_end)
        failed = [(i, code) for i, code in enumerate(codes) if code not in _STOPPED]
        for index, code in failed:
            log.error("worker %d %s while stopping", index, _ended(code))
        return 1 if failed else 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Pass the signal on to every worker, and start none again."""
        self.stopping.set()
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    def argv(self, index: int, parent_fd: int) -> list[str]:
        """The command line of worker `index`."""
        argv = [sys.executable, "-m", "gateway", "serve", "--no-migrate"]
        if self.config:
            argv += ["--config", self.config]
        return argv + [
            f"--workers={self.settings.workers}",
            f"--worker-index={index}",
            f"--worker-dir={self.directory}",
            f"--parent-fd={parent_fd}",
        ]

    async def _keep(self, index: int, parent_fd: int) -> int:
        """Keep worker `index` running until stopped; the exit code of its last process."""
        loop = asyncio.get_running_loop()
        young_deaths = 0
        while True:
            started = loop.time()
            # Its own process group: a terminal's ^C reaches the parent, which passes it on.
            process = await asyncio.create_subprocess_exec(
                *self.argv(index, parent_fd),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(parent_fd,),
                process_group=0,
            )
            self.processes[index] = process
            if self.stopping.is_set():
                process.terminate()
            code = await process.wait()
            if self.stopping.is_set():
                return code
            young_deaths = 0 if loop.time() - started >= STEADY_AFTER_SECONDS else young_deaths + 1
            delay = min(RESTART_DELAY_SECONDS * 2**young_deaths, RESTART_DELAY_MAX_SECONDS)
            log.error(
                "worker %d (pid %d) %s; starting another in %.1f s", index, process.pid, _ended(code), delay
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return 0


def _ended(code: int) -> str:
    """How a process ended, from its return code."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with {code}"
