"""Disconnect storms: many streams, each dropped by its client at a random moment, then the checks that
nothing leaked: nothing running, nothing waiting, no KV block held, and the next request served.

The moments a client can leave: right after sending the request (before any response: the server is
still admitting or prefilling it), right after the response headers (the first token is out), and
mid-stream after a random number of events. Half of the clients close politely (FIN), half reset the
connection (RST), as a killed process or a dropped network path would. The client is raw asyncio
sockets so it controls exactly when the connection ends.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tailserve.bench.prom import parse

MOMENTS = ("before_response", "after_headers", "mid_stream")
# The gauges a tailserve server exports that must read zero once it is idle.
IDLE_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


@dataclass
class StormResult:
    streams: int
    by_moment: Counter[str] = field(default_factory=Counter)
    finished_first: int = 0  # streams that ended before the client's chosen moment came
    refused: int = 0  # answered with an error status (e.g. 429 under the burst) before the moment
    errors: list[str] = field(default_factory=list)  # the client's own failures (connect, timeouts)
    seconds: float = 0.0


def _request(url: str, path: str, body: dict, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    data = json.dumps(body).encode()
    lines = [f"POST {parts.path.rstrip('/')}{path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += ["Content-Type: application/json", f"Content-Length: {len(data)}", "Connection: close"]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def drop_one(
    url: str, path: str, body: dict, headers: dict[str, str], moment: str, events: int, reset: bool
) -> str:
    """Send one streaming request and leave at `moment`; what happened: "dropped", "finished", "refused"."""
    host, port, raw = _request(url, path, body, headers)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        if moment == "before_response":
            return "dropped"
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return "refused"
        if moment == "after_headers":
            return "dropped"
        seen = 0
        while seen < events:
            chunk = await reader.read(65536)
            if not chunk or b"[DONE]" in chunk:
                return "finished"
            seen += chunk.count(b"data: ")
        return "dropped"
    finally:
        if reset:
            writer.transport.abort()
        else:
            writer.close()


async def storm(
    url: str,
    path: str,
    body: dict,
    streams: int,
    concurrency: int,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    max_events: int = 24,
    timeout: float = 60.0,
) -> StormResult:
    """`streams` requests of `body` (made streaming), `concurrency` at a time, each dropped at a seeded
    random moment; returns what the clients saw (the server's side is `idle_report`'s)."""
    rng = random.Random(seed)
    plan = [(rng.choice(MOMENTS), rng.randint(1, max_events), rng.random() < 0.5) for _ in range(streams)]
    result = StormResult(streams)
    gate = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        moment, events, reset = plan[i]
        async with gate:
            try:
                one = drop_one(url, path, {**body, "stream": True}, headers or {}, moment, events, reset)
                got = await asyncio.wait_for(one, timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                result.errors.append(f"{moment}: {type(e).__name__}: {e}")
                return
        if got == "dropped":
            result.by_moment[moment] += 1
        elif got == "finished":
            result.finished_first += 1
        else:
            result.refused += 1

    await asyncio.gather(*(one(i) for i in range(streams)))
    result.seconds = time.perf_counter() - t0
    return result


def idle_gauges(metrics_text: str) -> dict[str, float]:
    """The IDLE_GAUGES of a scrape (summed over labels); a server that lacks one reports none for it."""
    samples = parse(metrics_text)
    out: dict[str, float] = {}
    for (name, _), value in samples.items():
        short = name.rsplit(":", 1)[-1]
        if short in IDLE_GAUGES:
            out[short] = out.get(short, 0.0) + value
    return out
