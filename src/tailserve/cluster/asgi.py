"""One HTTP request carried across the ingress → replica hop as plain data, and played into the
replica's own ASGI app (the single server's, unchanged) in process.

The ingress sends the request's scope and body; the replica answers with a stream whose first item is
the response start (status and headers) and whose other items are body bytes. A body item carries
everything the app sent since the last one: the first chunk goes out the moment it exists, and under
load several chunks share one Ray message instead of paying its overhead each (ray#52746).

When the stream is closed early (the client left, the ingress cancelled), the app sees
`http.disconnect`, exactly as under uvicorn: its own cleanup aborts the engine request and frees its
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

# Headers the hop does not carry: they describe the client's connection, not the request.
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"host"})
APP_EXIT_TIMEOUT = 10.0  # seconds the app gets to clean up after a disconnect


@dataclass
class Start:
    """The response's status line and headers, the stream's first item, with the body bytes the app had
    sent by then (a stream's first chunk travels with its headers)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


def request_scope(scope: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The picklable part of an HTTP scope, with `headers` in place of the client's."""
    keep = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path")
    out = {k: scope[k] for k in keep if k in scope}
    out["root_path"] = ""
    out["headers"] = [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]
    out["client"] = tuple(scope["client"]) if scope.get("client") else None
    return out


async def play(app: ASGIApp, scope: dict[str, Any], body: bytes) -> AsyncIterator[Start | bytes]:
    """Run `app` on the request; yield its Start, then its body in coalesced pieces."""
    out: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():  # as uvicorn does once the client has left (ASGI 2.4)
            raise OSError("the client disconnected")
        out.put_nowait(message)

    async def run() -> None:
        try:
            await app({**scope, "state": {}}, receive, send)
        except OSError:
            pass  # the client left while the app was sending: its cleanup has run
        finally:
            out.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        start: Start | None = None
        done = False
        while not done:
            message = await out.get()
            chunks: list[bytes] = []
            while True:
                if message is None:
                    done = True
                elif message["type"] == "http.response.start":
                    start = Start(message["status"], [(bytes(k), bytes(v)) for k, v in message["headers"]])
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))
                    done = not message.get("more_body", False)
                if done or out.empty():
                    break
                message = out.get_nowait()
            if start is not None:
                start.body = b"".join(chunks)
                yield start
                start = None
            elif any(chunks):
                yield b"".join(chunks)
    finally:
        gone.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), APP_EXIT_TIMEOUT)
        if not task.done():
            task.cancel()
