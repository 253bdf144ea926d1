"""A minimal HTTP/1.1 client for streaming POSTs, on asyncio streams.

Why not httpx here: a load generator's own cost per request lands in the latencies it measures.
Measured on this project's 2-core machine (one token per request, a fresh connection each), httpx
spends ~1.6 ms of CPU per streamed request and this ~0.55 ms (0.3 ms against 1.1 ms with
keep-alive); at concurrency 32 with requests starting together, the difference alone adds tens of
milliseconds to the TTFT of the last one. It also gives exact control of the socket: a dropped
stream really closes the connection, and a slow reader gets small socket and stream buffers, so
its slowness reaches the server as soon as the server's own send buffer is full.
httpx still serves the one-off GETs (/v1/models, /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class Response:
    """The status, and the body as it arrives (de-chunked)."""

    def __init__(self, reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.complete = False  # the whole body was read: the connection may be reused
        self._reader = reader
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left = int(length) if length is not None and not self._chunked else None
        self.reusable = headers.get("connection", "").lower() != "close" and (
            self._chunked or self._left is not None
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        r = self._reader
        if self._chunked:
            while True:
                line = await r.readline()
                if not line:
                    raise ConnectionError("connection closed before the end of the body")
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    while (await r.readline()).strip():  # trailers, then the blank line
                        pass
                    self.complete = True
                    return
                data = await r.readexactly(size)
                await r.readexactly(2)
                yield data
        elif self._left is not None:
            while self._left > 0:
                data = await r.read(min(self._left, 1 << 16))
                if not data:
                    raise ConnectionError("connection closed before the end of the body")
                self._left -= len(data)
                yield data
            self.complete = True
        else:  # delimited by the connection's end
            while data := await r.read(1 << 16):
                yield data
            self.complete = True

    async def read(self, limit: int = 1 << 16) -> bytes:
        """The body (up to `limit` bytes; the rest is left unread)."""
        out = b""
        async for data in self.chunks():
            out += data
            if len(out) >= limit:
                break
        return out


class StreamClient:
    """Streams POSTs to one server; a fresh connection each, or reused ones with `keep_alive`.

    `rcvbuf` (bytes) shrinks the socket's receive buffer and the stream's read buffer, so a client
    that reads slowly stops the server's sends instead of having everything buffered for it.
    """

    def __init__(self, base_url: str, keep_alive: bool = False, rcvbuf: int | None = None) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.host_header = u.netloc.rsplit("@", 1)[-1]
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.keep_alive = keep_alive
        self.rcvbuf = rcvbuf
        self._idle: list[_Conn] = []
        self._addrinfo: tuple | None = None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        if self._addrinfo is None:  # resolved once: a lookup per request would be measured too
            self._addrinfo = (await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM))[0]
        family, kind, proto, _, addr = self._addrinfo
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            await loop.sock_connect(sock, addr)
            reader, writer = await asyncio.open_connection(
                sock=sock,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl else None,
                limit=self.rcvbuf or (1 << 16),
            )
        except BaseException:
            sock.close()
            raise
        return _Conn(reader, writer)

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn, True
            conn.close()
        return await self._connect(), False

    @contextlib.asynccontextmanager
    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[Response]:
        """POST and yield the response once its headers are in; leaving closes or pools it."""
        lines = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += [f"Content-Length: {len(body)}", "Accept-Encoding: identity"]
        if not self.keep_alive:
            lines.append("Connection: close")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in range(2):
            conn, reused = await self._acquire()
            try:
                conn.writer.write(request)
                await conn.writer.drain()
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionError("the server closed the connection without answering")
                break
            except (OSError, EOFError):
                conn.close()
                if reused and attempt == 0:
                    continue  # a pooled connection the server had already closed: retry fresh
                raise
            except BaseException:  # cancelled, timed out: never leave the socket open
                conn.close()
                raise
        resp: Response | None = None
        try:
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            status = int(parts[1])
            headers_in: dict[str, str] = {}
            while (line := await conn.reader.readline()).strip():
                k, _, v = line.decode("latin-1").partition(":")
                headers_in[k.strip().lower()] = v.strip()
            resp = Response(conn.reader, status, headers_in)
            yield resp
        finally:
            if self.keep_alive and resp is not None and resp.complete and resp.reusable:
                self._idle.append(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
