"""The gateway's HTTP/1.1 server (gateway/front.py) as a client on a raw socket sees it: keep-alive,
pipelining, 100-continue, HTTP/1.0, size limits and malformed input in the OpenAI envelope, write
backpressure, a disconnect that cancels the request's work, and a drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import uvloop
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tailserve.api.errors import install_error_handlers
from tailserve.gateway import front as front_module
from tailserve.gateway.front import Front, Incoming, Stream, Whole

LIMIT = 1000  # bytes of body


@dataclass
class Probe:
    """What the routes saw, written from the server's thread."""

    closed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    produced: int = 0
    hold: threading.Event = field(default_factory=threading.Event)


def build(probe: Probe) -> Front:
    async def ping(request) -> JSONResponse:
        return JSONResponse({"pong": True})

    app = Starlette(routes=[Route("/ping", ping)])
    install_error_handlers(app)

    async def echo(req: Incoming) -> Whole:
        return Whole(200, {"content-type": "application/json"}, req.body)

    async def boom(req: Incoming) -> Whole:
        raise RuntimeError("boom")

    async def slow(req: Incoming) -> Whole:
        try:
            while not probe.hold.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            probe.cancelled.append("slow")
            raise
        return Whole(200, {}, b"done")

    async def stream(req: Incoming) -> Stream:
        count = int(json.loads(req.body or b"{}").get("n", 3))

        async def body() -> AsyncIterator[bytes]:
            for i in range(count):
                probe.produced += 1
                yield b"x" * 65536 if count > 100 else f"data: {i}\n\n".encode()
                await asyncio.sleep(0)

        async def close() -> None:
            probe.closed.append("stream")

        return Stream({"content-type": "text/event-stream"}, body(), close)

    routes = {"/echo": echo, "/boom": boom, "/slow": slow, "/stream": stream}
    return Front(app, routes, LIMIT)  # type: ignore[dict-item]


@contextlib.contextmanager
def running(probe: Probe, grace: float = 1.0) -> Iterator[tuple[int, threading.Thread, list]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = uvloop.new_event_loop()
    up = threading.Event()
    box: list = []

    async def main() -> None:
        stop = asyncio.Event()
        box.append(stop)
        await build(probe).serve(stop, sock=sock, grace=grace, started=up.set)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert up.wait(5)
    try:
        yield sock.getsockname()[1], thread, [loop, box]
    finally:
        loop.call_soon_threadsafe(box[0].set)
        thread.join(timeout=10)
        assert not thread.is_alive()
        loop.close()
        sock.close()


class Conn:
    """A client socket that keeps what it read past one response for the next."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            assert self._more(), "closed mid-response"
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            assert self._more(), "closed mid-response"
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """One response (content-length, chunked, or until the connection ends)."""
        while b"\r\n\r\n" not in self.buf:
            assert self._more(), f"closed before a response head: {self.buf!r}"
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if status == 100:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line(), 16):
                body += self._take(size)
                self._take(2)
            self._take(2)
            return status, headers, body
        while self._more():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body


def post(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    with running(Probe()) as (port, _, _), Conn(port) as c:
        c.sendall(post("/echo", b'{"a":1}'))
        assert c.response()[2] == b'{"a":1}'
        c.sendall(
            post("/echo", b'{"b":2}') + post("/echo", b'{"c":3}') + b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        answers = [c.response() for _ in range(3)]
        assert [(st, body) for st, _, body in answers] == [
            (200, b'{"b":2}'),
            (200, b'{"c":3}'),
            (200, b'{"pong":true}'),
        ]


def test_idle_connection_is_closed_after_keep_alive(monkeypatch) -> None:
    monkeypatch.setattr(front_module, "KEEP_ALIVE", 0.2)
    with running(Probe()) as (port, _, _), Conn(port) as s:
        s.sendall(post("/echo", b"{}"))
        s.response()
        time.sleep(0.5)
        assert s.sock.recv(10) == b""


def test_a_request_that_stalls_midway_is_dropped(monkeypatch) -> None:
    monkeypatch.setattr(front_module, "KEEP_ALIVE", 0.2)
    with running(Probe()) as (port, _, _), Conn(port) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-le")
        time.sleep(0.5)
        assert s.sock.recv(10) == b""


def test_a_long_request_outlives_keep_alive(monkeypatch) -> None:
    monkeypatch.setattr(front_module, "KEEP_ALIVE", 0.2)
    probe = Probe()
    with running(probe) as (port, _, _), Conn(port) as s:
        s.sendall(post("/slow", b"{}"))
        time.sleep(0.6)
        probe.hold.set()
        assert s.response()[2] == b"done"


def test_expect_100_continue_then_answer() -> None:
    with running(Probe()) as (port, _, _), Conn(port) as s:
        body = b'{"x":1}'
        s.sendall(
            post("/echo", b"", "expect: 100-continue\r\n").replace(b"content-length: 0", b"content-length: 7")
        )
        assert s.response()[0] == 100
        s.sendall(body)
        assert s.response()[2] == body


def test_body_over_the_limit_is_413_before_it_is_sent_and_chunked_too() -> None:
    with running(Probe()) as (port, _, _):
        with Conn(port) as s:
            s.sendall(post("/echo", b"").replace(b"content-length: 0", b"content-length: 5000"))
            status, headers, body = s.response()
            assert status == 413 and headers["connection"] == "close"
            assert json.loads(body)["error"]["code"] == "request_too_large"
        with Conn(port) as s:
            big = b"y" * 1500
            chunked = f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n"
            head = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            s.sendall(head + chunked)
            status, _, body = s.response()
            assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_oversized_headers_431_and_malformed_400_in_the_envelope() -> None:
    with running(Probe()) as (port, _, _):
        with Conn(port) as s:
            s.sendall(post("/echo", b"{}", f"x-big: {'z' * (front_module.MAX_HEAD + 10)}\r\n"))
            status, _, body = s.response()
            assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large"
        with Conn(port) as s:
            s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            status, _, body = s.response()
            assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request"


def test_bad_bytes_after_a_good_request_are_answered_after_it() -> None:
    with running(Probe()) as (port, _, _), Conn(port) as s:
        s.sendall(post("/echo", b'{"a":1}') + b"\x00 not http\r\n\r\n")
        assert s.response()[:3:2] == (200, b'{"a":1}')
        status, headers, body = s.response()
        assert status == 400 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "invalid_request"


def test_method_not_allowed_unknown_route_and_handler_crash() -> None:
    with running(Probe()) as (port, _, _), Conn(port) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, _ = s.response()
        assert status == 405 and headers["allow"] == "POST"
        s.sendall(b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, body = s.response()
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        s.sendall(post("/boom", b"{}"))
        status, _, body = s.response()
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"


def test_stream_is_chunked_on_http11_and_ends_with_the_connection_on_http10() -> None:
    probe = Probe()
    with running(probe) as (port, _, _):
        with Conn(port) as s:
            s.sendall(post("/stream", b'{"n":3}'))
            status, headers, body = s.response()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        with Conn(port) as s:
            s.sendall(post("/stream", b'{"n":2}', version="1.0"))
            status, headers, body = s.response()
            assert "transfer-encoding" not in headers and body == b"data: 0\n\ndata: 1\n\n"
    assert probe.closed == ["stream", "stream"]


def test_disconnect_cancels_the_request_and_closes_its_stream() -> None:
    probe = Probe()
    with running(probe) as (port, _, _):
        with Conn(port) as s:
            s.sendall(post("/slow", b"{}"))
            time.sleep(0.1)
        end = time.monotonic() + 5
        while probe.cancelled != ["slow"]:
            assert time.monotonic() < end, "the handler was not cancelled"
            time.sleep(0.01)


def test_a_reader_that_stops_pauses_the_stream() -> None:
    probe = Probe()
    with running(probe) as (port, _, _), Conn(port) as s:
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(post("/stream", b'{"n":5000}'))  # 5000 chunks of 64 KiB: 320 MB if nothing paused
        time.sleep(1.0)
        assert probe.produced < 200, probe.produced
    end = time.monotonic() + 5
    while probe.closed != ["stream"]:
        assert time.monotonic() < end, "the stream was not closed after the client left"
        time.sleep(0.01)


def test_stop_lets_a_request_in_flight_finish_within_grace() -> None:
    probe = Probe()
    with running(probe, grace=5.0) as (port, thread, (loop, box)), Conn(port) as s:
        s.sendall(post("/slow", b"{}"))
        time.sleep(0.1)
        loop.call_soon_threadsafe(box[0].set)
        time.sleep(0.2)
        with pytest.raises(OSError):  # no longer listening
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        probe.hold.set()
        status, _, body = s.response()
        assert status == 200 and body == b"done"
        thread.join(timeout=5)
        assert not thread.is_alive()
