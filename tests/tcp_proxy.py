"""A TCP proxy in front of PostgreSQL that a test can cut, trap and count round trips through."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class _Link:
    """One proxied connection."""

    client: asyncio.StreamWriter
    # The name of the prepared statement that holds the trap, once prepared: its execution (a Bind
    # of that statement; asyncpg may first prepare and run type introspection queries) comes next.
    marked: bytes | None = None
    swallow: bool = False  # the trap sprang: nothing more gets through


@dataclass
class TcpProxy:
    """127.0.0.1:<port> → target, one pair of sockets per connection; can be cut and restored.

    `trap` (bytes), when set, springs once: on the connection that prepares a statement containing
    it, the statement's execution reaches the database (and commits, a statement outside a
    transaction) but its answer never comes back, and the connection breaks.
    """

    target: tuple[str, int]
    port: int = 0
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    trap: bytes | None = None
    # Writes from the clients to the database: each is one round trip (a client sends, then waits).
    round_trips: int = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            db_r, db_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self.writers.update((client_w, db_w))
        link = _Link(client_w)
        for reader, writer, to_db in ((client_r, db_w, True), (db_r, client_w, False)):
            task = asyncio.get_running_loop().create_task(self._pipe(reader, writer, link, to_db))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, to_db: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if link.swallow:
                    continue
                writer.write(data)
                await writer.drain()
                if to_db:
                    self.round_trips += 1
                if to_db and self.trap is not None and self.trap in data and data[:1] == b"P":
                    link.marked = _names(data)[0]  # Parse: statement name, query
                elif (
                    to_db and link.marked is not None and data[:1] == b"B" and _names(data)[1] == link.marked
                ):
                    # Bind (portal, statement), Execute, Sync: the trap's statement runs.
                    self.trap, link.marked, link.swallow = None, None, True
                    # Long after the database has committed, the gateway's socket is reset.
                    asyncio.get_running_loop().call_later(0.5, link.client.transport.abort)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self.writers.discard(writer)

    async def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def restore(self) -> None:
        if self.server is None:
            await self.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _names(message: bytes) -> tuple[bytes, bytes]:
    """The first two NUL-terminated strings of a PostgreSQL message (after its type and length)."""
    parts = message[5:].split(b"\0", 2) + [b"", b""]
    return parts[0], parts[1]
