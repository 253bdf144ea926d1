"""The gateway's HTTP server against arbitrary bytes (hypothesis): whatever a client sends, the server
answers with well-formed HTTP or closes the connection, never crashes or hangs, and keeps serving the
next client."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailserve.gateway import front as front_module
from tests.gateway.test_front import Conn, Probe, post, running

# A request line first, then pieces a request is made of, mixed with raw bytes: generated input gets
# past the first line into the parser's later states (headers, bodies, pipelining, upgrades).
LINES = st.sampled_from(
    [
        b"POST /echo HTTP/1.1\r\n",
        b"GET /ping HTTP/1.1\r\n",
        b"POST /stream HTTP/1.0\r\n",
        b"GET /echo HTTP/1.1\r\n",
    ]
)
PIECES = st.sampled_from(
    [
        b"POST /echo HTTP/1.1\r\n",
        b"host: x\r\n",
        b"content-length: 7\r\n",
        b"content-length: -1\r\n",
        b"content-length: 99999999999999999999\r\n",
        b"transfer-encoding: chunked\r\n",
        b"expect: 100-continue\r\n",
        b"connection: close\r\n",
        b"upgrade: h2c\r\nconnection: upgrade\r\n",
        b"\r\n",
        b"\r\n",
        b'{"n":2}',
        b"5\r\nhello\r\n0\r\n\r\n",
        b"zz\r\n",
        b"\x00\xff",
    ]
)
INPUT = st.tuples(LINES, st.lists(st.one_of(PIECES, st.binary(max_size=20)), max_size=10)).map(
    lambda t: t[0] + b"".join(t[1])
)


def _drain(port: int, data: bytes) -> bytes:
    """Send `data` and read until the server closes the connection: after its answers, or when the
    client has been quiet for KEEP_ALIVE (a request left incomplete). Not closing is a failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_arbitrary_bytes_get_http_or_a_close_and_the_server_lives_on(monkeypatch) -> None:
    monkeypatch.setattr(front_module, "KEEP_ALIVE", 0.1)
    answered = []
    with running(Probe()) as (port, thread, _):

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(INPUT)
        def one(data: bytes) -> None:
            out = _drain(port, data)
            assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
            assert thread.is_alive()
            answered.append(out[:12])

        one()
        assert sum(map(bool, answered)) >= 10, answered  # the input reached past the first bytes
        with Conn(port) as c:  # and a well-formed request still gets its answer
            c.sendall(post("/echo", b'{"ok":1}'))
            assert c.response()[:3:2] == (200, b'{"ok":1}')
