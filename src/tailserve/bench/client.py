"""One streaming request, measured from the client's side, into a RequestRecord.

Time stamps are `time.perf_counter()` taken the moment each HTTP chunk arrives, before any JSON is
parsed, so parsing cost never shows up as latency. A token is a non-empty content delta;
when a server packs several tokens into one SSE event, the gaps measured are per event (the record
keeps both counts so the report can say so).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tailserve.bench.http import StreamClient

SHED_STATUSES = (429, 503)


@dataclass
class ClientConfig:
    """How requests are sent; one per run."""

    base_url: str
    model: str
    endpoint: str = "chat"  # chat | completions
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout: float = 300.0  # seconds for one whole request
    keep_alive: bool = False  # reuse connections (llama.cpp closes them after each stream anyway)
    read_delay: float = 0.1  # slow readers sleep this long after each HTTP chunk (about one event)
    count_tokens: Callable[[str], int] | None = None  # a tokenizer, when the server gives no usage


@dataclass
class RequestRecord:
    """What happened to one request; every reported number derives from these fields."""

    id: int
    session: int
    turn: int
    tag: str
    approx_prompt_tokens: int
    max_tokens: int
    status: str = "pending"  # ok | shed | error | timeout | disconnected | cancelled
    http_status: int | None = None
    error: str | None = None
    start: float = 0.0  # perf_counter when the request was sent
    end: float | None = None  # perf_counter when the stream ended (or was dropped)
    token_times: list[float] = field(default_factory=list)  # one per non-empty content event
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None
    token_source: str = "chunks"  # usage | tokenizer | chunks
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.start if self.end is not None else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def tpot(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1): the mean time per token after the first."""
        n, ttft, e2e = self.output_tokens, self.ttft, self.e2e
        if n is None or n < 2 or ttft is None or e2e is None:
            return None
        return (e2e - ttft) / (n - 1)

    def to_json(self, t0: float) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "id": self.id,
            "session": self.session,
            "turn": self.turn,
            "tag": self.tag,
            "status": self.status,
            "http_status": self.http_status,
            "error": self.error,
            "start_s": r(self.start - t0),
            "ttft_s": r(self.ttft),
            "e2e_s": r(self.e2e),
            "tpot_s": r(self.tpot),
            "itl_s": [round(x, 6) for x in self.itl],
            "prompt_tokens": self.prompt_tokens,
            "approx_prompt_tokens": self.approx_prompt_tokens,
            "output_tokens": self.output_tokens,
            "chunks": len(self.token_times),
            "token_source": self.token_source,
        }


def request_body(cfg: ClientConfig, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, dict]:
    """The (path, JSON body) of one streaming request; completions get the chat flattened to text."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        body["messages"] = messages
        return "/v1/chat/completions", body
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    body["prompt"] = "\n\n".join([*parts, "Assistant:"])
    return "/v1/completions", body


async def send(
    client: StreamClient,
    cfg: ClientConfig,
    rec: RequestRecord,
    messages: list[dict[str, str]],
    disconnect_after: int | None = None,
    slow_read: bool = False,
) -> None:
    """Send one request and fill `rec` in place (so a cancelled request still leaves its record)."""
    path, body = request_body(cfg, messages, rec.max_tokens)
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "X-Request-ID": f"tailserve-bench-{rec.id}",
    }
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    rec.start = time.perf_counter()
    try:
        await asyncio.wait_for(
            _stream(
                client,
                path,
                json.dumps(body).encode(),
                headers,
                rec,
                disconnect_after,
                slow_read,
                cfg.read_delay,
            ),
            cfg.timeout,
        )
    except asyncio.TimeoutError:
        rec.status, rec.error = "timeout", f"timeout: no complete answer within {cfg.timeout:g} s"
    except (OSError, EOFError, ValueError) as e:  # connection trouble, malformed stream
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:300]
    if rec.end is None and rec.status != "cancelled":
        rec.end = time.perf_counter()
    _count_tokens(cfg, rec)


async def _stream(
    client: StreamClient,
    path: str,
    body: bytes,
    headers: dict[str, str],
    rec: RequestRecord,
    disconnect_after: int | None,
    slow_read: bool,
    read_delay: float,
) -> None:
    times = rec.token_times
    pieces: list[str] = []
    finished = False
    try:
        async with client.post(path, body, headers) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                detail = (await resp.read(4096)).decode(errors="replace")
                rec.end = time.perf_counter()
                rec.status = "shed" if resp.status in SHED_STATUSES else "error"
                rec.error = f"HTTP {resp.status}: {detail[:200]}"
                return
            buf = b""
            async for data in resp.chunks():
                now = time.perf_counter()
                lines = (buf + data).split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        finished = True
                        continue
                    ev = json.loads(payload)
                    err = ev.get("error")
                    if err:
                        rec.status = "error"
                        msg = err.get("message", err) if isinstance(err, dict) else err
                        rec.error = f"stream error: {msg}"[:300]
                        rec.end = now
                        return
                    for choice in ev.get("choices") or ():
                        delta = choice.get("delta") or choice
                        piece = delta.get("content") or delta.get("text") or delta.get("reasoning_content")
                        if piece:
                            times.append(now)
                            pieces.append(piece)
                        if choice.get("finish_reason"):
                            finished = True
                    usage = ev.get("usage")
                    if usage:
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.output_tokens = usage.get("completion_tokens")
                if disconnect_after is not None and len(times) >= disconnect_after:
                    rec.status, rec.end = "disconnected", now
                    return  # leaving the context closes the connection mid-stream
                if slow_read:
                    await asyncio.sleep(read_delay)
            rec.end = time.perf_counter()
            rec.status = "ok" if finished else "error"
            if not finished:
                rec.error = "incomplete stream: it ended without a finish_reason or [DONE]"
    except asyncio.CancelledError:
        rec.status = "cancelled"
        raise
    finally:
        rec.text = "".join(pieces)


def _count_tokens(cfg: ClientConfig, rec: RequestRecord) -> None:
    """Output tokens: the server's usage, else the tokenizer over the text, else one per event."""
    if rec.output_tokens is not None:
        rec.token_source = "usage"
    elif cfg.count_tokens is not None and rec.text:
        rec.output_tokens, rec.token_source = cfg.count_tokens(rec.text), "tokenizer"
    else:
        rec.output_tokens, rec.token_source = len(rec.token_times), "chunks"
