"""`SSEResponse` as an ASGI server sees it: the head waits for the first event and the two are sent
back to back (one wake-up for the reader), the rest as they come, and `on_close` runs however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tailserve.api.sse import SSEResponse


def test_head_waits_for_the_first_event_then_goes_with_it() -> None:
    async def run() -> tuple[list[dict[str, Any]], list[int], int]:
        gate = asyncio.Event()
        sent: list[dict[str, Any]] = []
        ticks: list[int] = []  # len(sent) at each loop turn
        closed = 0

        async def events() -> AsyncIterator[str]:
            await gate.wait()
            yield "data: 1\n\n"
            yield "data: 2\n\n"

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the client never leaves
            return {}

        async def on_close() -> None:
            nonlocal closed
            closed += 1

        response = SSEResponse(events(), {"x-request-id": "r"}, on_close)
        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        task = asyncio.create_task(response(scope, receive, send))
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == []  # no head before there is an event to send with it
        gate.set()
        while not task.done():
            ticks.append(len(sent))
            await asyncio.sleep(0)
        await task
        return sent, ticks, closed

    sent, ticks, closed = asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 3
    assert (dict(sent[0]["headers"])[b"content-type"]).startswith(b"text/event-stream")
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert 1 not in ticks  # the head was never left alone across a loop turn
    assert closed == 1
