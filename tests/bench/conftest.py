"""A fake OpenAI-compatible streaming server with injected delays, token counts and failures.

Raw asyncio HTTP/1.1 in a thread (keep-alive, chunked SSE), so the tests know exactly what the
server did: when each token left, which requests it answered with an error, and which streams the
client dropped before the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


@dataclass
class Behaviour:
    ttft: float | Sequence[float] = 0.05  # seconds before the first token; a sequence cycles by arrival
    itl: float = 0.01  # seconds between events
    tokens: int | None = None  # output tokens; None = the request's max_tokens
    tokens_per_event: int = 1
    statuses: dict[int, int] = field(default_factory=dict)  # arrival ordinal -> status to answer with
    stream_errors: dict[int, int] = field(default_factory=dict)  # arrival ordinal -> tokens, then an error
    usage: bool = True  # honour stream_options.include_usage
    context_len: int = 4096
    server_ttft_scale: float = 1.0  # what /metrics reports, as a multiple of the injected TTFT
    metrics: bool = True
    chunked: bool = True  # False: an HTTP/1.0-style body that ends when the connection closes


class FakeServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        self.arrivals = 0
        self.bodies: list[dict] = []
        self.emits: dict[str, list[float]] = {}  # X-Request-ID -> perf_counter of each token event sent
        self.disconnects: list[tuple[str, int]] = []  # (request id, tokens sent before the drop)
        self.completed: list[str] = []
        self.connections = 0
        reg = CollectorRegistry()
        self._reg = reg
        self._ttft = Histogram(
            "tailserve:time_to_first_token_seconds",
            "TTFT",
            registry=reg,
            buckets=(0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0),
        )
        self._queries = Counter("tailserve:prefix_cache_queries", "q", registry=reg)
        self._hits = Counter("tailserve:prefix_cache_hits", "h", registry=reg)
        self._draft = Counter("tailserve:spec_decode_num_draft_tokens", "d", registry=reg)
        self._accepted = Counter("tailserve:spec_decode_num_accepted_tokens", "a", registry=reg)
        self._ttfts = itertools.cycle(
            behaviour.ttft if isinstance(behaviour.ttft, Sequence) else [behaviour.ttft]
        )
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                line, *rest = head.split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if path == "/v1/models":
                    card = {"id": "fake-model", "object": "model", "max_model_len": self.b.context_len}
                    await _send(writer, 200, json.dumps({"object": "list", "data": [card]}).encode())
                elif path == "/metrics" and self.b.metrics:
                    await _send(writer, 200, generate_latest(self._reg), "text/plain; version=0.0.4")
                elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                    rid = headers.get("x-request-id", str(self.arrivals))
                    chat = path.endswith("chat/completions")
                    if not await self._generate(rid, json.loads(body), reader, writer, chat):
                        return
                else:
                    await _send(writer, 404, b'{"error": {"message": "not found"}}')
                if headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _generate(
        self, rid: str, body: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chat: bool
    ) -> bool:
        """Stream one answer; False when the client went away (the connection is done)."""
        i = self.arrivals
        self.arrivals += 1
        self.bodies.append(body)
        ttft = next(self._ttfts)
        if i in self.b.statuses:
            status = self.b.statuses[i]
            await _send(writer, status, json.dumps({"error": {"message": f"injected {status}"}}).encode())
            return True
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        prompt_tokens = round(len(text.split()) * 1.1)
        if prompt_tokens > self.b.context_len:
            await _send(writer, 400, b'{"error": {"message": "prompt longer than the context"}}')
            return True
        n = self.b.tokens or body["max_tokens"]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + (b"Transfer-Encoding: chunked\r\n\r\n" if self.b.chunked else b"Connection: close\r\n\r\n")
        )
        obj = "chat.completion.chunk" if chat else "text_completion"

        def frame(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n" if self.b.chunked else data

        def event(payload: dict) -> bytes:
            return frame(b"data: " + json.dumps({"object": obj, **payload}).encode() + b"\n\n")

        def choice(piece: str, finish: str | None = None) -> dict:
            c = {"delta": {"content": piece}} if chat else {"text": piece}
            return {"choices": [{"index": 0, **c, "finish_reason": finish}]}

        if chat:  # the role-only first event carries no token
            writer.write(
                event({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            )
        await asyncio.sleep(ttft)
        self._ttft.observe(ttft * self.b.server_ttft_scale)
        self._queries.inc(prompt_tokens)
        self._hits.inc(prompt_tokens / 2)
        self._draft.inc(n)
        self._accepted.inc(n * 0.75)
        emits = self.emits.setdefault(rid, [])
        for sent in range(0, n, self.b.tokens_per_event):
            if sent:
                await asyncio.sleep(self.b.itl)
            if reader.at_eof() or writer.is_closing():
                self.disconnects.append((rid, sent))
                return False
            if self.b.stream_errors.get(i) == sent:
                writer.write(event({"error": {"message": "injected mid-stream error", "code": 500}}))
                break
            k = min(self.b.tokens_per_event, n - sent)
            emits.append(time.perf_counter())  # before the write: the client may run first
            writer.write(event(choice("".join(f" w{sent + j}" for j in range(k)))))
            try:
                await writer.drain()
            except ConnectionError:
                self.disconnects.append((rid, sent))
                return False
        else:
            writer.write(event(choice("", "length")))
        if self.b.usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
            }
            writer.write(event({"choices": [], "usage": usage}))
        writer.write(frame(b"data: [DONE]\n\n") + (b"0\r\n\r\n" if self.b.chunked else b""))
        await writer.drain()
        self.completed.append(rid)
        return self.b.chunked


async def _send(
    writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "application/json"
) -> None:
    extra = "Retry-After: 1\r\n" if status in (429, 503) else ""
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    """Call it with Behaviour's fields to get a started server; all stop at the end of the test."""
    started: list[FakeServer] = []

    def make(**behaviour: Any) -> FakeServer:
        started.append(FakeServer(Behaviour(**behaviour)).start())
        return started[-1]

    yield make
    for s in started:
        s.stop()
