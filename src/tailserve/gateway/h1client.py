"""The gateway's upstream HTTP/1.1 client: keep-alive connections over asyncio protocols, parsed by
httptools (C), with the slice of httpx's client API the gateway uses.

Why not httpx: profiled behind a zero-work backend, httpx → httpcore → h11 → anyio took about half of
the gateway's CPU per streamed request (context managers, cancel scopes and a pure-Python parser
around every chunk read), more than the gateway's own work. This client does one write per request
and hands each chunk on as the parser yields it, and it never asks for a compressed answer (the
relay passes bytes through, so a gzip body would reach the client without its header).

Errors are httpx's exception types (subclassed), so code written against httpx — the attempt loop,
the relay, the load poll — catches them unchanged.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import httpx

IDLE_EXPIRY = 4.0  # s: under uvicorn's 5 s keep-alive, so a pooled connection is not one it is closing
HIGH_WATER = 1 << 20  # bytes buffered from a backend before reading pauses (a slow client)


class ConnectError(httpx.ConnectError):
    pass


class ConnectTimeout(httpx.ConnectTimeout):
    pass


class PoolTimeout(httpx.PoolTimeout):
    pass


class ReadTimeout(httpx.ReadTimeout):
    pass


class RemoteProtocolError(httpx.RemoteProtocolError):
    pass


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: the server dropped it while idle."""


@dataclass
class Request:
    method: str
    url: str
    content: bytes
    headers: dict[str, str]
    timeout: httpx.Timeout


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(ReadTimeout("the backend sent nothing in time"))


class _Conn(asyncio.Protocol):
    """One connection, one exchange at a time; the parser's callbacks fill the current response."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.header_list: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.done = False
        self.got_bytes = False
        self.framed = False  # content-length or chunked: EOF before the end is an error
        self.keep_alive = False  # read at the head: the parser forgets it once the message is complete
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.error: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = RemoteProtocolError(f"malformed answer from the backend: {e}")
            self._close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.done and not self.framed and self.error is None:
            self.done = True  # a body delimited by the connection's end
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name, value))
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.done = True

    # the client's side
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def wait(self, timeout: float | None, ready: Callable[[], object]) -> None:
        """Until `ready()` holds, the connection ends, or `timeout` seconds pass (ReadTimeout)."""
        loop = asyncio.get_running_loop()
        while not ready() and not self.closed and self.error is None:
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
            try:
                await fut
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        if self.error is not None:
            raise self.error
        if not ready():
            if self.reused and not self.got_bytes:
                raise _Stale
            raise RemoteProtocolError("the backend closed the connection before the answer ended")

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        if self.buffered > HIGH_WATER and self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self.buffered = 0
        return data


class Response:
    """An answer whose body is read as it comes; `aclose` gives the connection back (or drops it)."""

    def __init__(self, client: Client, conn: _Conn, read_timeout: float | None) -> None:
        self._client = client
        self._conn = conn
        self._read_timeout = read_timeout
        self._closed = False
        self.status_code = conn.status
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in conn.header_list}
        self.content = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes (de-chunked, never decompressed) as they arrive."""
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    continue
                if conn.done:
                    return
                await conn.wait(self._read_timeout, lambda: conn.chunks or conn.done)
        except _Stale:  # not reachable once the head came; kept a protocol error for the caller
            raise RemoteProtocolError("the backend closed the connection") from None

    async def aread(self) -> bytes:
        parts = [chunk async for chunk in self.aiter_raw()]
        self.content = b"".join(parts)
        await self.aclose()
        return self.content

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client._release(self._conn, reusable=self._conn.done and not self._conn.chunks)


class Client:
    """Connections to any number of origins, at most `max_connections` at a time in all (None: no cap)."""

    def __init__(self, max_connections: int | None = None) -> None:
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._slots = asyncio.Semaphore(max_connections) if max_connections else None
        self._ssl: ssl.SSLContext | None = None
        self._live: set[_Conn] = set()

    def build_request(
        self, method: str, url: str, *, content: bytes = b"", headers: dict[str, str], timeout: httpx.Timeout
    ) -> Request:
        return Request(method, url, content, headers, timeout)

    async def get(self, url: str, timeout: float) -> Response:
        """A whole GET answer (its `content`/`text` read)."""
        response = await self.send(self.build_request("GET", url, headers={}, timeout=httpx.Timeout(timeout)))
        await response.aread()
        return response

    async def send(self, request: Request, stream: bool = True) -> Response:
        """Send `request`; the answer once its head and the body's first bytes have come, the body to
        follow on `aiter_raw` (always streamed: `stream` is httpx's signature)."""
        parts = urlsplit(request.url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{request.method} {target} HTTP/1.1\r\nhost: {parts.netloc}\r\n"]
        for k, v in request.headers.items():
            if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                raise httpx.LocalProtocolError(f"header {k!r} has a line break")
            head.append(f"{k}: {v}\r\n")
        head.append(f"content-length: {len(request.content)}\r\n\r\n")
        data = "".join(head).encode("latin-1") + request.content
        t = request.timeout
        if self._slots is not None:
            await self._take_slot(t.pool)
        try:
            for fresh in (False, True):
                conn = None if fresh else self._pooled(origin)
                if conn is None:
                    conn = await self._connect(origin, t.connect)
                self._live.add(conn)
                try:
                    conn.transport.write(data)  # type: ignore[union-attr]
                    # The head and the body's first bytes (or its end): one wake where a backend
                    # writes the head apart from the first chunk, as uvicorn does.
                    await conn.wait(t.read, lambda c=conn: c.head_done and (c.chunks or c.done))
                    return Response(self, conn, t.read)
                except _Stale:
                    self._drop(conn)
                    continue
                except BaseException:
                    self._drop(conn)
                    raise
            raise RemoteProtocolError("the backend closed the connection")  # two stale in a row
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    async def _take_slot(self, timeout: float | None) -> None:
        """A connection slot; `wait_for` only when none is free, since it runs the acquire as a task
        of its own, a loop turn (~0.2 ms of a zero-work hop) that a free slot does not need."""
        assert self._slots is not None
        if not self._slots.locked():
            await self._slots.acquire()  # free: returns without suspending
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise PoolTimeout("no connection to the backend free in time") from None

    def _pooled(self, origin: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_EXPIRY:
                conn.reused = True
                conn._begin()
                return conn
            conn._close()
        return None

    async def _connect(self, origin: tuple[str, str, int], timeout: float | None) -> _Conn:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(origin), host, port, ssl=context), timeout
            )
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"connecting to {host}:{port} took too long") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        return conn

    def _drop(self, conn: _Conn) -> None:
        self._live.discard(conn)
        conn._close()

    def _release(self, conn: _Conn, reusable: bool) -> None:
        self._live.discard(conn)
        if reusable and not conn.closed and conn.keep_alive:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            conn._close()
        if self._slots is not None:
            self._slots.release()

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn._close()
        self._idle.clear()
        for conn in list(self._live):
            conn._close()
        self._live.clear()
