"""The gateway's upstream client (gateway/h1client.py) against a raw asyncio server that counts its
connections: a keep-alive answer leaves its connection for the next request, a `connection: close` one
does not. (A new connection per request put a TCP handshake and the backend's accept on every
request's critical path: httptools forgets `should_keep_alive` once a message is complete.)"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tailserve.gateway.h1client import Client

ANSWERS = {
    "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    "close": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
}


async def _exchange(answer: bytes, requests: int) -> tuple[list[bytes], int]:
    """`requests` GETs in turn through one Client; (their bodies, connections the server accepted)."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client(4)
    try:
        bodies = []
        for _ in range(requests):
            request = client.build_request(
                "GET", f"http://127.0.0.1:{port}/x", headers={}, timeout=httpx.Timeout(5.0)
            )
            response = await client.send(request)
            bodies.append(await response.aread())
        return bodies, accepted
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_keep_alive_answers_reuse_one_connection(framing: str) -> None:
    bodies, accepted = asyncio.run(_exchange(ANSWERS[framing], 5))
    assert bodies == [b"hello"] * 5
    assert accepted == 1


def test_connection_close_answer_is_not_reused() -> None:
    bodies, accepted = asyncio.run(_exchange(ANSWERS["close"], 3))
    assert bodies == [b"hello"] * 3
    assert accepted == 3
