"""The gateway's HTTP/1.1 server: asyncio protocols parsed by httptools. The completion routes are
answered by the connection's own code; every other request is played into the FastAPI app (ASGI).

Why not uvicorn: behind a zero-work backend at c=1 (benchmarks/gateway_hop.py's fake), a relay written
on raw protocols added 0.32 ms to TTFT, the same relay as a bare ASGI app under uvicorn (uvloop,
httptools) 0.87 ms: ASGI's per-request task and message dicts, Starlette's request and streaming
response, and a loop turn per relayed chunk cost more than the gateway's whole routing decision. The
hot path here is one task per request; the first chunk goes out with the response head in one write.

What a client sees is what uvicorn gives it: keep-alive (closed after `KEEP_ALIVE` s idle), pipelined
requests answered in order, `Expect: 100-continue`, HTTP/1.0, a 400 for a malformed request, 413 for
a body over the limit and 431 for oversized headers (both in the OpenAI error envelope), and write
backpressure (a slow reader pauses the relay, so nothing buffers without bound). A client that
disconnects cancels its request's task: the handler's cleanup closes the upstream connection. As under
uvicorn, the end of the client's input counts as a disconnect (a half-closed socket is not told apart
from a gone one), so a backend's work for a client that left stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message

from tailserve.api.errors import ApiError, error_response

log = logging.getLogger("tailserve.gateway")

KEEP_ALIVE = 5.0  # s an idle connection stays open (uvicorn's default, which clients' pools expect)
MAX_HEAD = 64 * 1024  # bytes of request line and headers
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class Incoming:
    """One request as a route sees it: the whole body read, header names lower-cased."""

    method: str
    path: str
    raw_path: bytes
    query: bytes
    headers: dict[str, str]
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    http11: bool
    keep_alive: bool
    client: tuple[str, int] | None
    disconnected: Callable[[], bool] = field(default=lambda: False)
    refusal: Whole | None = None  # answered instead of routing: 413, 431


@dataclass
class Whole:
    """An answer sent at once."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Stream:
    """A 200 whose body is relayed as it comes (chunked); `close` runs once it has ended, however."""

    headers: dict[str, str]
    body: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


Handler = Callable[[Incoming], Awaitable[Whole | Stream]]


def error_whole(err: ApiError, request_id: str | None = None) -> Whole:
    """An ApiError as `api.errors.error_response` answers it (envelope, its headers, the request's id)."""
    r = error_response(err, request_id)
    return Whole(r.status_code, dict(r.headers), bytes(r.body))


def _head(status: int, headers: dict[str, str] | list[tuple[bytes, bytes]], framing: bytes) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
    items = headers.items() if isinstance(headers, dict) else headers
    for k, v in items:
        lines.append(b"%s: %s\r\n" % (k if isinstance(k, bytes) else k.encode("latin-1"),
                                       v if isinstance(v, bytes) else v.encode("latin-1")))  # fmt: skip
    lines.append(framing)
    return b"".join(lines)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Front:
    """The server: `routes` (path → handler, POST only) answered natively, the rest by `app`."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler], body_limit: int) -> None:
        self.app = app
        self.routes = routes
        self.body_limit = body_limit
        self.connections: set[_Connection] = set()

    async def serve(
        self,
        stop: asyncio.Event,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: Any = None,
        grace: float = 5.0,
        started: Callable[[], None] | None = None,
    ) -> None:
        """Serve until `stop` is set; then stop listening, let requests in flight finish for up to
        `grace` s, and close every connection."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=2048)
        else:
            server = await loop.create_server(lambda: _Connection(self), host, port, backlog=2048)
        if started is not None:
            started()
        try:
            await stop.wait()
        finally:
            server.close()
            for conn in list(self.connections):
                conn.shutdown()
            busy = [c.task for c in self.connections if c.task is not None]
            if busy:
                _, pending = await asyncio.wait(busy, timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)
            for conn in list(self.connections):
                conn.close()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time in order."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self.queue: deque[Incoming] = deque()
        self.gone = False
        self.closing = False  # the connection ends once what was asked before is answered
        self.refusal_due: Whole | None = None  # bad bytes after good requests: answered after theirs
        self._writable: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._lost: asyncio.Future[None] = self.loop.create_future()
        self._begin()

    # -- the transport's callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not asyncio's class
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.front.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._disarm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The upgrade is not taken: what was asked is answered, then the connection ends.
            self.closing = True
            if self.task is None and not self.queue:
                self.close()
        except httptools.HttpParserError:
            err = error_whole(ApiError(400, "the request is not valid HTTP/1.1", code="invalid_request"))
            if self.task is None and not self.queue:
                self._write_whole(err, None)
                self.close()
            else:  # the requests before the bad bytes are answered first, in order
                self.refusal_due = err
                self.transport.pause_reading()
        if self.task is None and not self.gone:
            # Waiting on the client (the rest of a request, or a refused body being read and dropped):
            # it must send something every KEEP_ALIVE seconds, or the connection ends.
            self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.front.connections.discard(self)
        self._disarm_idle()
        if not self._lost.done():
            self._lost.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- the parser's callbacks --

    def _begin(self) -> None:
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.refusal: Whole | None = None
        self.answered = False  # the refusal went out before the body (which is then read and dropped)

    def on_message_begin(self) -> None:
        self._begin()

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        if self.head_size <= MAX_HEAD:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size <= MAX_HEAD:
            self.raw_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        limit = self.front.body_limit
        if self.head_size > MAX_HEAD:
            self.refusal = error_whole(
                ApiError(431, "the request's headers are too large", code="headers_too_large")
            )
            return
        declared = next((v for k, v in self.raw_headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.refusal = _too_large(limit)
            if self.task is None and not self.queue:  # answered now, not after the body was sent
                self._write_whole(self.refusal, None)
                self.closing = self.answered = True
        elif self.task is None and not self.queue and _expects_continue(self.raw_headers):
            self.transport.write(CONTINUE)  # (not for a pipelined request: it would come out of turn)

    def on_body(self, data: bytes) -> None:
        if self.refusal is not None:
            return
        self.body_size += len(data)
        if self.body_size > self.front.body_limit:
            self.refusal = _too_large(self.front.body_limit)
            self.body.clear()
        else:
            self.body.append(data)

    def on_message_complete(self) -> None:
        if self.answered:
            self.close()
            return
        url = httptools.parse_url(self.url)
        headers: dict[str, str] = {}
        for k, v in self.raw_headers:
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        request = Incoming(
            method=self.parser.get_method().decode("ascii"),
            path=unquote(url.path.decode("latin-1")),
            raw_path=url.path,
            query=url.query or b"",
            headers=headers,
            raw_headers=self.raw_headers,
            body=b"".join(self.body),
            http11=self.parser.get_http_version() == "1.1",
            keep_alive=self.parser.should_keep_alive() and self.refusal is None,
            client=self.client,
            disconnected=lambda: self.gone,
            refusal=self.refusal,
        )
        self.queue.append(request)
        if self.task is None:
            self._next()
        elif len(self.queue) > 1 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining ahead waits for its answers

    # -- running requests --

    def _next(self) -> None:
        if self.gone or self.transport is None or self.transport.is_closing():
            return
        if self.queue:
            self._disarm_idle()
            self.task = self.loop.create_task(self._run(self.queue.popleft()))
            self.task.add_done_callback(self._done)
        elif self.refusal_due is not None:
            self._write_whole(self.refusal_due, None)
            self.close()
        elif self.closing:
            self.close()
        else:
            self._arm_idle()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("request failed after its answer began", exc_info=task.exception())
            self.close()
            return
        if self.transport is not None and not self.gone:
            self.transport.resume_reading()
        self._next()

    async def _run(self, request: Incoming) -> None:
        try:
            handler = self.front.routes.get(request.path)
            if request.refusal is not None:
                self._write_whole(request.refusal, request)
            elif handler is None:
                await self._asgi(request)
            elif request.method != "POST":
                self._write_whole(
                    error_whole(ApiError(405, "Method Not Allowed", headers={"Allow": "POST"})), request
                )
            else:
                await self._native(handler, request)
        except asyncio.CancelledError:
            if not self.gone:
                raise  # the server is stopping
        if not request.keep_alive:
            self.close()

    async def _native(self, handler: Handler, request: Incoming) -> None:
        try:
            reply = await handler(request)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            log.exception("unhandled error")
            reply = error_whole(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))
        if isinstance(reply, Whole):
            self._write_whole(reply, request)
            return
        await self._stream(reply, request)

    async def _stream(self, reply: Stream, request: Incoming) -> None:
        assert self.transport is not None
        chunked = request.http11
        if not chunked:
            request.keep_alive = False  # an HTTP/1.0 body ends when the connection does
        head = _head(200, reply.headers, b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n")
        try:
            async for data in reply.body:
                if not data:
                    continue
                out = _chunk(data) if chunked else data
                if head:
                    out, head = head + out, b""
                self.transport.write(out)
                if self._writable is not None and not self._writable.done():
                    await self._writable
                if self.gone:
                    return
            self.transport.write(head + (b"0\r\n\r\n" if chunked else b""))
        finally:
            with contextlib.suppress(RuntimeError):  # still running in a task being cancelled
                await reply.body.aclose()  # type: ignore[attr-defined]
            await reply.close()

    def _write_whole(self, reply: Whole, request: Incoming | None) -> None:
        """`reply` with its length; `request` None: an answer before (or instead of) a whole request,
        after which the connection ends."""
        if self.transport is None or self.gone or self.transport.is_closing():
            return
        headers = {**reply.headers, "content-length": str(len(reply.body))}
        if request is None or not request.keep_alive:
            headers["connection"] = "close"
        body = b"" if request is not None and request.method == "HEAD" else reply.body
        self.transport.write(_head(reply.status, headers, b"\r\n") + body)

    async def _asgi(self, request: Incoming) -> None:
        """`request` through the ASGI app: one body message, then a disconnect once the client leaves."""
        assert self.transport is not None
        transport = self.transport
        sent_body = False
        state: dict[str, Any] = {"head": None, "chunked": False, "done": False}

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await self._lost
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if self.gone:
                raise OSError("the client disconnected")
            if message["type"] == "http.response.start":
                headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
                framing = b"\r\n"
                if not any(k == b"content-length" for k, _ in headers):
                    if request.http11:
                        state["chunked"] = True
                        framing = b"transfer-encoding: chunked\r\n\r\n"
                    else:
                        request.keep_alive = False
                if not request.keep_alive:
                    headers.append((b"connection", b"close"))
                state["head"] = _head(message["status"], headers, framing)
                return
            if message["type"] != "http.response.body" or state["head"] is None or state["done"]:
                return
            data = b"" if request.method == "HEAD" else message.get("body", b"")
            more = message.get("more_body", False)
            out = state["head"] + (_chunk(data) if state["chunked"] and data else data)
            state["head"] = b""
            if not more:
                state["done"] = True
                if state["chunked"]:
                    out += b"0\r\n\r\n"
            if out:
                transport.write(out)
            if self._writable is not None and not self._writable.done():
                await self._writable

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if request.http11 else "1.0",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.raw_headers,
            "client": request.client,
            "server": transport.get_extra_info("sockname"),
            "state": {},
        }
        try:
            await self.front.app(scope, receive, send)
        except OSError:
            return  # the client left while the app was sending
        except Exception as e:
            log.exception("unhandled error")
            if state["head"] is None and not state["done"]:
                err = ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")
                self._write_whole(error_whole(err), request)
                return
            request.keep_alive = False
            return
        if not state["done"]:
            request.keep_alive = False  # the app ended without finishing its answer

    # -- the connection's end --

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self._idle = self.loop.call_later(KEEP_ALIVE, self.close)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def shutdown(self) -> None:
        """The server is stopping: an idle connection closes now, a busy one after its answer."""
        self.closing = True
        self.queue.clear()
        if self.task is None:
            self.close()

    def close(self) -> None:
        self.closing = True
        self._disarm_idle()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _expects_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)


def _too_large(limit: int) -> Whole:
    return error_whole(
        ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
    )
