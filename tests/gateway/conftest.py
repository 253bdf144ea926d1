"""Fake OpenAI backends and a gateway in front of them, all in this process on 127.0.0.1.

A `Fake` answers each request by the next step of its `script` (then by `mode`): "ok", an HTTP status
("500", "429:2" = 429 with Retry-After 2), "hang" (never answers), "hang_mid" (one chunk, then
nothing), "cut_mid" (one chunk, then the connection drops). It records every request it got, and
counts the streams whose connection the gateway closed. `first_delay` stalls a stream before its first
chunk (a slow first token); `answers` maps a request's last message to the (content, finish_reason)
of its whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tailserve.gateway.app import Gateway, run_gateway
from tailserve.gateway.config import parse_config
from tailserve.gateway.pools import make_pools


@dataclass
class Fake:
    model: str = "m"
    owned_by: str = "fake"
    mode: str = "ok"
    script: list[str] = field(default_factory=list)
    chunks: int = 3
    gap: float = 0.0  # seconds between stream chunks
    delay: float = 0.0  # seconds before answering
    first_delay: float = 0.0  # seconds before a stream's first chunk
    answers: dict[str, tuple[str, str]] = field(default_factory=dict)
    waiting: float = 0.0  # the queue its /metrics reports
    load: str | None = None  # its X-Tailserve-Load header on answers, and (parsed) its /load JSON
    starting: int = 0  # /v1/models answers 503 this many times first, as a server loading its model
    requests: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    closed_streams: int = 0  # streams that ended because the other side went away
    url: str = ""

    def step(self) -> str:
        return self.script.pop(0) if self.script else self.mode

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            if self.starting > 0:
                self.starting -= 1
                return JSONResponse({"error": {"message": "loading"}}, status_code=503)
            return JSONResponse({"object": "list", "data": [{"id": self.model, "owned_by": self.owned_by}]})

        async def metrics(request: Request) -> Response:
            return PlainTextResponse(
                f'tailserve:num_requests_waiting{{model="{self.model}"}} {self.waiting}\n'
            )

        async def load(request: Request) -> Response:
            if self.load is None:
                return PlainTextResponse("no /load", status_code=404)
            fields = dict(p.split("=") for p in self.load.split(";"))
            return JSONResponse({"waiting": fields["waiting"], "predicted_ttft_s": fields["ttft"]})

        async def complete(request: Request) -> Response:
            response = await answer(request)
            if self.load is not None:
                response.headers["x-tailserve-load"] = self.load
            return response

        async def answer(request: Request) -> Response:
            body = await request.json()
            self.requests.append((body, dict(request.headers)))
            step = self.step()
            if self.delay:
                await asyncio.sleep(self.delay)
            if step == "hang":
                await asyncio.sleep(3600)
            if step[0].isdigit():
                status, _, retry_after = step.partition(":")
                headers = {"Retry-After": retry_after} if retry_after else {}
                err = {
                    "error": {
                        "message": f"fake {status}",
                        "type": "x",
                        "param": None,
                        "code": f"fake_{status}",
                    }
                }
                return JSONResponse(err, status_code=int(status), headers=headers)
            if not body.get("stream"):
                last = (body.get("messages") or [{}])[-1].get("content")
                content, finish = self.answers.get(last, ("hello", "stop"))
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
                return JSONResponse(
                    {"id": "fake", "object": "chat.completion", "model": body["model"], "choices": [choice]}
                )
            return StreamingResponse(self._stream(step, body), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/metrics", metrics),
                Route("/load", load),
                Route("/v1/chat/completions", complete, methods=["POST"]),
                Route("/v1/completions", complete, methods=["POST"]),
            ]
        )

    async def _stream(self, step: str, body: dict[str, Any]) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(self.first_delay)
            for i in range(self.chunks):
                chunk = {
                    "id": "fake",
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": f"t{i}"}}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
                if i == 0 and step == "hang_mid":
                    await asyncio.sleep(3600)
                if i == 0 and step == "cut_mid":
                    raise RuntimeError("the fake drops the connection")
                await asyncio.sleep(self.gap)
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.closed_streams += 1
            raise


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve(app: Any, lifespan: str = "off", send_buffer: int | None = None) -> Iterator[str]:
    """`app` on a thread of this process; its URL. Stopped on exit (bounded in time). `send_buffer`: the
    kernel's send buffer of every connection, in bytes (accepted sockets inherit the listener's)."""
    sock = _free_socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="error", lifespan=lifespan, timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end, "server did not start"
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_gateway(gw: Gateway) -> Iterator[str]:
    """`gw` served by its own front on a thread of this process (uvloop, as the CLI runs it); its URL.
    Stopped on exit, requests in flight given 1 s."""
    sock = _free_socket()
    loop = uvloop.new_event_loop()
    stop: asyncio.Event | None = None
    up = threading.Event()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await run_gateway(gw, stop, sock=sock, grace=1.0, started=up.set)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert up.wait(10), "gateway did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        assert not thread.is_alive(), "gateway did not stop"
        loop.close()
        sock.close()


@contextlib.contextmanager
def fakes(*fs: Fake) -> Iterator[list[Fake]]:
    with contextlib.ExitStack() as stack:
        for f in fs:
            f.url = stack.enter_context(serve(f.app()))
        yield list(fs)


@dataclass
class LiveGateway:
    url: str
    gateway: Gateway

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics").text
        want = "tailserve:gateway_" + name
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(want + "{") and not line.startswith(want + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def in_flight(self) -> int:
        return sum(u.backend.in_flight for p in self.gateway.pools.values() for u in p.upstreams.values())


def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def gateway(config: dict[str, Any], tracer_provider: Any = None) -> Iterator[LiveGateway]:
    """A gateway for `config`; backends' `kind` defaults to openai (no discovery round trip)."""
    config = {"poll_interval": 0, **config}
    for spec in config["models"].values():
        for b in spec.get("backends", []):
            b.setdefault("kind", "openai")
    cfg = parse_config(config)
    urls = {(m, i): [(b.url, b.kind)] for m, spec in cfg.models.items() for i, b in enumerate(spec.backends)}
    gw = Gateway(cfg, make_pools(cfg, urls), tracer_provider)  # type: ignore[arg-type]
    with serve_gateway(gw) as url:
        yield LiveGateway(url, gw)


def chat(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
