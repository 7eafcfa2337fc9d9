"""A small asyncio HTTP/1.1 GET client over keep-alive sockets, for the load generators.

Not an HTTP client library: at a few hundred requests a second, httpx (threads or asyncio)
took a sizeable share of the two cores the server under test runs on, and its AsyncClient in
one Python thread topped out at 137 req/s in the chaos prober (2026-11-30). This writes the
request line by hand and reads the status, Content-Length and body; nothing else (no chunked
bodies, no redirects), which is all `GET /recommend` needs.
"""

from __future__ import annotations

import asyncio

# what a request on a dead or confused connection raises; the request counts as failed
FAILED = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
          ValueError, IndexError)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class KeepAlivePool:
    """GETs over a pool of keep-alive connections to one `http://host:port`.

    A request takes an idle connection, or opens another when all are busy (an open-loop
    caller gets more concurrent requests from a slow server, never fewer), up to
    `max_connections`; past that it waits for one. A request that fails on a connection the
    server closed while it was idle (uvicorn closes them after 5 s) is sent once more on a new
    connection, as HTTP clients do."""

    def __init__(self, base: str, max_connections: int = 2048, timeout_s: float = 30.0) -> None:
        self.host, port = base.split("//")[1].rstrip("/").split(":")
        self.port = int(port)
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self.idle: list[Conn] = []
        self.opened = 0

    async def _ask(self, conn: Conn, path: str) -> tuple[int, bytes]:
        reader, writer = conn
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), self.timeout_s)
        return int(head.split(b" ", 2)[1]), body

    def _drop(self, conn: Conn) -> None:
        conn[1].close()
        self.opened -= 1

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body); status 0 when no answer came (refused, reset, timed out)."""
        while not self.idle and self.opened >= self.max_connections:
            await asyncio.sleep(0.001)
        conn = self.idle.pop() if self.idle else None
        if conn is not None:
            try:
                answer = await self._ask(conn, path)
                self.idle.append(conn)
                return answer
            except asyncio.TimeoutError:  # an OSError too (3.11+), but not a closed socket
                self._drop(conn)
                return 0, b""
            except (OSError, asyncio.IncompleteReadError):
                self._drop(conn)  # closed while idle: once more on a new connection
            except FAILED:
                self._drop(conn)
                return 0, b""
        self.opened += 1
        try:
            conn = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                          self.timeout_s)
        except FAILED:
            self.opened -= 1
            return 0, b""
        try:
            answer = await self._ask(conn, path)
        except FAILED:
            self._drop(conn)
            return 0, b""
        self.idle.append(conn)
        return answer

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()
        self.opened = 0


def model_version(body: bytes) -> int:
    """The `model_version` of a /recommend answer (compact JSON); -1 when there is none."""
    at = body.find(b'"model_version":')
    if at < 0:
        return -1
    try:
        return int(body[at + 16:].split(b",")[0].split(b"}")[0])
    except ValueError:
        return -1
