"""What this server tells a router about its load: its queue, the predicted time before a new
request's prefill could start, and its prefill rate, on every response (`X-Tailserve-Load` header) and
at `GET /load`.

The rate is there because the wait alone misleads a prefix-aware router: a request whose prefix is
cached here prefills little of its prompt here and all of it elsewhere, and the router can only weigh
that (its uncached tokens at this rate) if it knows what a token costs here.

Both come from the admission counters and the engine's stats snapshot (no lock, no tokens read), so
publishing costs a few attribute reads per response. The header reaches a gateway at no extra round
trip on every answer it relays: its picture of this server is as fresh as its last request here;
`/load` is for a gateway that has sent nothing here lately.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tailserve.server.state import OpenAIServer

HEADER = b"x-tailserve-load"


def snapshot(server: OpenAIServer) -> dict[str, Any]:
    """Running and waiting requests, prompt tokens not yet prefilled, the predicted wait of a new
    request before its own prefill (the queue ahead of it at the measured prefill rate, plus one step),
    and that rate in prompt tokens per second (both None before the engine has measured it)."""
    adm, stats = server.admission, server.engine.stats
    pred = adm.predict(stats, 0)
    rate = adm.prefill_rate(stats)
    return {
        "running": stats.num_running,
        "waiting": adm.queued_requests(stats),
        "queued_tokens": adm.queued_tokens,
        "predicted_ttft_s": None if pred is None else round(pred[0] + stats.last_step_time, 6),
        "prefill_tokens_per_s": round(rate, 1) if rate > 0 else None,
    }


def header_value(snap: dict[str, Any]) -> bytes:
    """`running=N;waiting=N;ttft=SECONDS;rate=TOKENS_PER_S` (ttft and rate left out while unknown):
    routing/load.py reads it."""
    value = f"running={snap['running']};waiting={snap['waiting']}"
    if snap["predicted_ttft_s"] is not None:
        value += f";ttft={snap['predicted_ttft_s']:.4f}"
    if snap["prefill_tokens_per_s"] is not None:
        value += f";rate={snap['prefill_tokens_per_s']:.1f}"
    return value.encode()


class LoadHeader:
    """ASGI middleware: the header on every HTTP response, valued when its head is sent."""

    def __init__(self, app: ASGIApp, server: OpenAIServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_load(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (HEADER, header_value(snapshot(self.server)))]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_load)


def install_load(app: Starlette, server: OpenAIServer) -> None:
    """`GET /load` and the header on every response."""

    async def load(request: Request) -> JSONResponse:
        return JSONResponse(snapshot(server))

    app.add_route("/load", load, ["GET"])
    app.add_middleware(LoadHeader, server=server)
