"""Real gateway processes for tests that need several of them, or need to kill one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    """A `python -m gateway serve` child process."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_gateway(database_url: str, upstream_url: str, log_dir: Path, **env: str) -> GatewayProcess:
    """Start a gateway on a free port against an already migrated database."""
    port = free_port()
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_LOG_LEVEL": "WARNING",
        **env,
    }
    log = log_dir / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--no-migrate"],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return GatewayProcess(process, f"http://127.0.0.1:{port}", log)


async def wait_ready(gateway: GatewayProcess, timeout: float = 20.0) -> None:
    """Wait until the gateway answers /readyz."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if gateway.process.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{gateway.log.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(gateway.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"gateway not ready in {timeout}s:\n{gateway.log.read_text()}")


@contextlib.contextmanager
def gateways(
    count: int, database_url: str, upstream_url: str, log_dir: Path, **env: str
) -> Iterator[list[GatewayProcess]]:
    """`count` gateway processes sharing one database; stopped on exit."""
    started: list[GatewayProcess] = []
    try:
        for _ in range(count):
            started.append(start_gateway(database_url, upstream_url, log_dir, **env))
        yield started
    finally:
        for gateway in started:
            gateway.stop()
