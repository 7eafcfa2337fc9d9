"""The load generators' HTTP client (bench/rawhttp.py) against a real socket server: keep-alive
reuse, a connection the server closed while idle sent again, a refused port a failed request
(status 0) that leaves no connection counted."""

from __future__ import annotations

import asyncio

from bench.rawhttp import KeepAlivePool, model_version
from freshrec.services import free_port


async def _serve(close_after: int) -> tuple[asyncio.AbstractServer, list[int], str]:
    """An HTTP/1.1 server answering {"model_version":N} (N counts requests) that closes each
    connection after `close_after` answers, as uvicorn closes idle ones; returns the server,
    the connections it accepted (one entry each) and its base URL."""
    accepted: list[int] = []
    served = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        for _ in range(close_after):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            served[0] += 1
            body = b'{"user_id":"u1","items":[],"model_version":%d}' % served[0]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    return server, accepted, f"http://127.0.0.1:{port}"


def test_requests_share_a_connection_and_come_back_in_order() -> None:
    async def run() -> list[tuple[int, bytes]]:
        server, accepted, base = await _serve(close_after=100)
        pool = KeepAlivePool(base)
        answers = [await pool.get("/recommend?user_id=u1&k=10") for _ in range(5)]
        assert len(accepted) == 1 and pool.opened == 1
        pool.close()
        server.close()
        return answers

    answers = asyncio.run(run())
    assert [code for code, _ in answers] == [200] * 5
    assert [model_version(body) for _, body in answers] == [1, 2, 3, 4, 5]


def test_a_connection_closed_while_idle_is_not_a_failed_request() -> None:
    async def run() -> list[int]:
        server, accepted, base = await _serve(close_after=1)
        pool = KeepAlivePool(base)
        codes = []
        for _ in range(4):
            codes.append((await pool.get("/recommend"))[0])
            await asyncio.sleep(0.05)  # the server closes it meanwhile
        assert len(accepted) == 4 and pool.opened == 1
        pool.close()
        server.close()
        return codes

    assert asyncio.run(run()) == [200] * 4


def test_no_server_is_a_failed_request_and_no_connection_left_counted() -> None:
    async def run() -> tuple[list[int], int]:
        pool = KeepAlivePool(f"http://127.0.0.1:{free_port()}", max_connections=2)
        codes = [(await pool.get("/recommend"))[0] for _ in range(3)]
        return codes, pool.opened

    # before, a refused connection stayed counted: two of them and the pool waited forever
    assert asyncio.run(asyncio.wait_for(run(), 10)) == ([0, 0, 0], 0)


def test_model_version_of_an_answer() -> None:
    assert model_version(b'{"items":["1"],"model_version":42}') == 42
    assert model_version(b'{"model_version":7,"items":[]}') == 7
    assert model_version(b"") == -1
    assert model_version(b'{"detail":"no model"}') == -1
