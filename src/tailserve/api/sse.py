"""Server-sent events as the OpenAI API frames them: `data: <json>\\n\\n` per chunk, `data: [DONE]` last.

`SSEResponse` guarantees its cleanup runs on every exit, including a response that never started
streaming (the client left first): that is where the server frees a request's engine work and the
gateway closes its upstream connection.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tailserve.api.errors import ApiError
from tailserve.api.http import CancelOnDisconnect, ClientGone

DONE = "data: [DONE]\n\n"
SSE_TYPE = "text/event-stream; charset=utf-8"
# No caching, and no buffering in a reverse proxy (nginx honours X-Accel-Buffering) between us and the client.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _bytes(chunk: str | bytes | memoryview) -> bytes | memoryview:
    return chunk.encode() if isinstance(chunk, str) else chunk


def sse(obj: Any) -> str:
    """One event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(err: ApiError) -> str:
    """An error after the stream started: its status is gone, so the body travels as an event."""
    return sse(err.body())


class SSEResponse(StreamingResponse):
    """A text/event-stream response that awaits `on_close` once the stream has ended, however it ended."""

    def __init__(
        self,
        content: AsyncIterator[str | bytes],
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**STREAM_HEADERS, **headers})
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        """As Starlette's, except that the head waits for the first event and goes out right before it,
        nothing awaited between the two writes: the client reads the head and the first event in one
        wake-up, not two (a gateway in front relays the first token one wake sooner)."""
        first = await anext(self.body_iterator, None)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if first is not None:
            await send({"type": "http.response.body", "body": _bytes(first), "more_body": True})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": _bytes(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with CancelOnDisconnect(receive):
                await self.stream_response(send)
        except ClientGone:
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # still running in a task being cancelled
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self.on_close()
